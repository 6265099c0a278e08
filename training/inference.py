"""Running a model version's network: load it once per process, embed batches.

No network is built at import time. `network_for(version)` builds it the
first time a process needs it and keeps it, keyed by the version and its
weights, so a web process or a worker pays the load once."""

from __future__ import annotations

import logging
import threading
from functools import lru_cache

import numpy as np
import torch
from django.conf import settings

from training.loop import autocast, autocast_dtype
from training.networks.base import EmbeddingNet, WeightsUnavailable
from training.networks.registry import build_network
from training.preprocessing import Preprocessing

_lock = threading.Lock()
logger = logging.getLogger(__name__)


def resolve_device(choice: str | None = None) -> torch.device:
    choice = choice or getattr(settings, "CBIR_DEVICE", "auto")
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("CBIR_DEVICE=cuda but PyTorch sees no CUDA device")
        return torch.device("cuda")
    if choice == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def loader_workers(device: torch.device) -> int:
    """DataLoader processes to use on `device` (CBIR_LOADER_WORKERS, -1 = automatic)."""
    import os

    configured = int(getattr(settings, "CBIR_LOADER_WORKERS", -1))
    if configured >= 0:
        return configured
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


def build_for_version(architecture: str, weights_source: str, weights_path: str, config: dict) -> EmbeddingNet:
    """Rebuild the network a ModelVersion describes."""
    if weights_source in ("checkpoint", "random") and weights_path:
        model = build_network(architecture, weights="random", **config)
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=False)
        except FileNotFoundError:
            raise WeightsUnavailable(f"the weights file {weights_path} of this model version is missing") from None
        model.load_state_dict(state["model"] if "model" in state else state)
        return model
    if weights_source == "random":
        return build_network(architecture, weights="random", **config)
    return build_network(architecture, weights="pretrained", **config)


@lru_cache(maxsize=4)
def _cached_network(key: tuple) -> tuple[EmbeddingNet, torch.device]:
    _pk, architecture, weights_source, weights_path, _sha, config_items = key
    model = build_for_version(architecture, weights_source, weights_path, dict(config_items))
    device = resolve_device()
    model = model.to(device).eval()
    # channels_last: measured 1.5-4x faster for these convnets on the CPU, and the layout Tensor Cores want.
    model = model.to(memory_format=torch.channels_last)
    logger.info("loaded %s (%s weights) on %s, %d torch thread(s)", architecture, weights_source, device,
                torch.get_num_threads())
    return model, device


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def network_for(version) -> tuple[EmbeddingNet, torch.device]:
    key = (version.pk, version.architecture, version.weights_source, version.weights_path,
           version.weights_sha256, _freeze(version.config or {}))
    with _lock:
        return _cached_network(key)


def preprocessing_for(version) -> Preprocessing:
    return Preprocessing.from_dict(version.preprocessing or {})


@torch.inference_mode()
def embed_batch(model: EmbeddingNet, device: torch.device, batch: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) preprocessed tensors → (N, dimension) float32 unit vectors."""
    batch = batch.to(device, non_blocking=True)
    if batch.dim() == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with autocast(device, autocast_dtype(device)):
        out = model(batch)
    return out.float().cpu().numpy()
