"""Test helpers (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image as PILImage


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
