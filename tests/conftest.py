"""Shared fixtures: a temporary MEDIA_ROOT and weights folder for every test,
tiny images, and a tiny model version (random weights, 32-d)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")


@pytest.fixture(autouse=True)
def _isolated_storage(settings, tmp_path_factory):
    settings.MEDIA_ROOT = tmp_path_factory.mktemp("media")
    settings.CBIR_WEIGHTS_DIR = tmp_path_factory.mktemp("weights")
    settings.CBIR_LOADER_WORKERS = 0
    return settings.MEDIA_ROOT


def image_bytes(color=(200, 30, 30), size=(32, 32), fmt="PNG", mode="RGB", pattern: int | None = None) -> bytes:
    """A small image; `pattern` seeds random noise so images differ in content."""
    if pattern is not None:
        rng = np.random.default_rng(pattern)
        array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        array[..., 0] = np.clip(array[..., 0].astype(int) // 2 + color[0] // 2, 0, 255)
        image = PILImage.fromarray(array, "RGB")
    else:
        image = PILImage.new("RGB", size, color)
    if mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.fixture
def make_image_bytes():
    return image_bytes


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Two labelled classes of distinct noisy images plus junk: 6 red, 6 blue,
    one exact duplicate, one text file, one truncated PNG."""
    root = tmp_path / "photos"
    for label, color in (("red", (250, 20, 20)), ("blue", (20, 20, 250))):
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(6):
            (folder / f"{label}-{i}.png").write_bytes(image_bytes(color, pattern=hash((label, i)) % 10_000))
    (root / "red" / "copy-of-red-0.png").write_bytes((root / "red" / "red-0.png").read_bytes())
    (root / "notes.txt").write_text("not an image")
    good = image_bytes((1, 2, 3), size=(64, 64), pattern=99)
    (root / "blue" / "broken.png").write_bytes(good[: len(good) // 2])
    return root


@pytest.fixture
def dataset(db):
    from search.models import Dataset

    return Dataset.objects.create(name="test-set")


@pytest.fixture
def tiny_version(db):
    """A model version of the tiny CNN with saved random weights (explicitly asked for)."""
    from search.indexing import get_or_create_version

    return get_or_create_version("tiny", random_weights=True, config={"dimension": 32, "size": 32})


@pytest.fixture
def indexed(db, dataset, image_folder, tiny_version):
    """The image folder imported and indexed with the tiny version, which is active."""
    from search.indexing import build_index
    from search.ingest import import_folder

    import_folder(image_folder, dataset, labels_from_folders=True)
    build_index(dataset, tiny_version)
    tiny_version.activate()
    return dataset
