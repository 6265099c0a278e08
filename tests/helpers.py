"""Test helpers (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import gzip
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from search.idx import IDX_DTYPES


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


def store_embeddings(dataset, version, vectors, *, splits=None, labels=None):
    """Rows for many placeholder images with the given vectors (normalised), the
    version's HNSW index, fresh planner statistics. Returns the unit vectors."""
    from django.db import connection

    from search.indexing import ensure_hnsw_index
    from search.models import Embedding, Image

    vectors = np.asarray(vectors, dtype=np.float32)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    n = len(vectors)
    images = Image.objects.bulk_create([
        Image(dataset=dataset, file=f"f/{i}.png", thumbnail=f"t/{i}.jpg", sha256=f"{i:064x}",
              split=splits[i] if splits else "train", label=labels[i] if labels else None,
              width=1, height=1, original_filename=f"{i}.png") for i in range(n)
    ])
    Embedding.objects.bulk_create([Embedding(image=im, dataset=dataset, model_version=version, vector=v)
                                   for im, v in zip(images, vectors)])
    ensure_hnsw_index(version)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE search_embedding")
        cursor.execute("ANALYZE search_image")
    return vectors


def wait_for(predicate, timeout: float = 60, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write `array` as an IDX file (the tests' fixtures; search/idx.py reads them). dtype must
    be one of IDX_DTYPES' (native or big-endian); gzipped when `compress`, or
    when it is None and the name ends in .gz."""
    path = Path(path)
    code = {np.dtype(v).newbyteorder("="): k for k, v in IDX_DTYPES.items()}.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX has no element type for {array.dtype}")
    data = (bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
            + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes())
    if compress or (compress is None and path.suffix == ".gz"):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
