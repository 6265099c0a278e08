"""Cached backbone features for head-only training.

A frozen backbone's features of a dataset's images are computed once and
kept on disk, so every later head training with the same backbone (same
weights, same preprocessing) reads them instead of running the backbone:

    CBIR_WEIGHTS_DIR/features/<backbone>-<key>.pt

where <key> is the first 16 hex digits of the SHA-256 of the backbone's
name, build settings, weights file SHA-256 (or timm tag) and preprocessing.
The file holds {"format", "key", "ids" (N,) int64 image ids, "sha256" (N
content hashes), "features" (N, D) float32 (the backbone's pooled
`features()`, before L2 normalisation)}. An image whose id is missing, or
whose content hash changed, is (re-)embedded; the others are reused. Writes
are atomic (training.core.loop.save_atomically), after every chunk of images, so an
interrupted caching run keeps what it had done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from training.core import runtime
from training.core.data import ImageListDataset
from training.core.loop import save_atomically
from training.core.networks.base import EmbeddingNet
from training.core.precision import autocast, autocast_dtype
from training.core.preprocessing import Preprocessing

logger = logging.getLogger(__name__)
FORMAT = 1
CHUNK = 2048  # images embedded between two saves of the cache file

# (image id, file path, content sha256)
Row = tuple[int, str, str]


def cache_key(backbone_name: str, backbone: EmbeddingNet, preprocessing: Preprocessing) -> dict:
    """What the cached features depend on (JSON-ready)."""
    info = backbone.weights_info
    return {"format": FORMAT, "backbone": backbone_name, "config": backbone.config, "weights_source": info.source,
            "weights_sha256": info.sha256, "weights_detail": info.detail,
            "preprocessing": preprocessing.to_dict()}


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", key["backbone"]).strip("-")
    return runtime.current().weights_dir / "features" / f"{safe}-{digest}.pt"


def _load(path: Path, key: dict) -> tuple[list[int], list[str], torch.Tensor | None]:
    if not path.exists():
        return [], [], None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
        logger.warning("feature cache %s unreadable (%s); embedding again", path, exc)
        return [], [], None
    if data.get("key") != key:
        logger.warning("feature cache %s was made for other settings; embedding again", path)
        return [], [], None
    return [int(i) for i in data["ids"].tolist()], list(data["sha256"]), data["features"].float()


@torch.inference_mode()
def _embed(backbone: EmbeddingNet, preprocessing: Preprocessing, paths: Sequence[str], device: torch.device,
           batch_size: int, num_workers: int) -> torch.Tensor:
    dataset = ImageListDataset([(path, None) for path in paths], preprocessing, augment=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    out = []
    dtype = autocast_dtype(device)  # bfloat16 on CPUs that have it (training.core.precision)
    for images, _ in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            out.append(backbone.features(images).float().cpu())
    return torch.cat(out) if out else torch.empty(0, backbone.dimension)


def read_cached(path: str | Path, rows: Sequence[tuple[int, str]]) -> tuple[list[int], torch.Tensor]:
    """The cached features of those of `rows` ((image id, content sha256)) that
    the cache file at `path` holds with the same content hash: (positions in
    `rows`, (n, D) float32 features in that order). ([], (0, 0)) when the file
    is missing or unreadable (then every row goes through the backbone). The
    file is read once per (path, size, mtime) in a process (read_cached keeps
    the last one: ~50 MB for 10,000 × 1,280 features)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return [], torch.empty(0, 0)
    index, stored = _indexed(str(path), stat.st_size, stat.st_mtime_ns)
    if stored is None:
        return [], torch.empty(0, 0)
    positions, found = [], []
    for position, (image_id, sha) in enumerate(rows):
        entry = index.get(int(image_id))
        if entry is not None and entry[1] == sha:
            positions.append(position)
            found.append(entry[0])
    return positions, stored[torch.tensor(found, dtype=torch.int64)] if found else stored[:0]


@lru_cache(maxsize=1)
def _indexed(path: str, _size: int, _mtime_ns: int) -> tuple[dict[int, tuple[int, str]], torch.Tensor | None]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        ids, hashes, stored = data["ids"].tolist(), list(data["sha256"]), data["features"].float()
    except Exception as exc:  # noqa: BLE001 - a damaged cache is not fatal: the backbone runs instead
        logger.warning("feature cache %s unreadable (%s); running the backbone instead", path, exc)
        return {}, None
    return {int(i): (n, sha) for n, (i, sha) in enumerate(zip(ids, hashes))}, stored


class FeatureCache:
    """The on-disk features of one backbone (one weights file, one preprocessing).

    cache = FeatureCache("efficientnet_lite0", net.backbone, net.preprocessing)
    features, stats = cache.features_for(rows, device)   # (len(rows), D) float32, in rows' order
    """

    def __init__(self, backbone_name: str, backbone: EmbeddingNet, preprocessing: Preprocessing) -> None:
        self.backbone = backbone
        self.preprocessing = preprocessing
        self.key = cache_key(backbone_name, backbone, preprocessing)
        self.path = cache_path(self.key)

    def cached_hashes(self) -> dict[int, str]:
        """image id → content sha256 of every image the cache holds features of."""
        ids, hashes, _ = _load(self.path, self.key)
        return dict(zip(ids, hashes))

    def features_for(self, rows: Sequence[Row], device: torch.device, *, batch_size: int = 64, num_workers: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, dict]:
        """Features (len(rows), D) float32 for `rows` (id, path, sha256), in that
        order, embedding only the images the cache lacks (or whose content
        changed). Returns (features, {"cached": n reused, "embedded": n new,
        "seconds": embedding time, "path": cache file}). Raises
        training.core.data.UnreadableImage for a file that cannot be decoded."""
        import time

        ids, hashes, stored = _load(self.path, self.key)
        index = {image_id: (i, sha) for i, (image_id, sha) in enumerate(zip(ids, hashes))}
        missing = [row for row in rows if index.get(row[0], (None, None))[1] != row[2]]
        started = time.perf_counter()
        if missing:
            self.backbone.to(device).eval()
            done = 0
            for start in range(0, len(missing), CHUNK):
                chunk = missing[start:start + CHUNK]
                new = _embed(self.backbone, self.preprocessing, [path for _, path, _ in chunk], device,
                             batch_size, num_workers)
                ids, hashes, stored = self._merge(ids, hashes, stored, chunk, new)
                save_atomically({"format": FORMAT, "key": self.key, "ids": torch.tensor(ids, dtype=torch.int64),
                                 "sha256": hashes, "features": stored}, self.path)
                done += len(chunk)
                if progress is not None:
                    progress(done, len(missing))
            index = {image_id: (i, sha) for i, (image_id, sha) in enumerate(zip(ids, hashes))}
        assert stored is not None or not rows
        positions = torch.tensor([index[row[0]][0] for row in rows], dtype=torch.int64)
        features = stored[positions] if stored is not None else torch.empty(0, self.backbone.dimension)
        stats = {"cached": len(rows) - len(missing), "embedded": len(missing),
                 "seconds": round(time.perf_counter() - started, 3), "path": str(self.path)}
        return features, stats

    @staticmethod
    def _merge(ids: list[int], hashes: list[str], stored: torch.Tensor | None, rows: Sequence[Row],
               new: torch.Tensor) -> tuple[list[int], list[str], torch.Tensor]:
        """The cache's entries with `rows` added or replaced by `new` features."""
        ids, hashes = list(ids), list(hashes)
        position = {image_id: i for i, image_id in enumerate(ids)}
        stored = new[:0].clone() if stored is None else stored.clone()
        appended = []
        for (image_id, _, sha), vector in zip(rows, new):
            if image_id in position:
                stored[position[image_id]] = vector
                hashes[position[image_id]] = sha
            else:
                position[image_id] = len(ids)
                ids.append(image_id)
                hashes.append(sha)
                appended.append(vector)
        if appended:
            stored = torch.cat([stored, torch.stack(appended)])
        return ids, hashes, stored
