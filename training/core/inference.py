"""Running a model version's network: load it once per process, embed batches.

No network is built at import time. `network_for(version)` builds it the
first time a process needs it and keeps it, keyed by the version and its
weights, so a web process or a worker pays the load once.

Bulk embedding can run the network through `torch.compile` (PyTorch's
compiler; on the CPU, inductor's C++ kernels): `network_for(version,
compiled_batch=B)` compiles it for batches of B once per process (29 s cold
for EfficientNet-Lite0 on 2 cores, 5 s from inductor's on-disk cache), and
`embed_batch(..., pad_to=B)` pads a shorter last batch so that no second
shape is compiled. Measured in docs/benchmarks.md: 1.15-1.5x the eager
forward pass on the CPU (113-118 against 80-98 images/s). Jobs use it from
CBIR_COMPILE_MIN_IMAGES images (compile_for)."""

from __future__ import annotations

import logging
import threading
import time
from functools import lru_cache
from typing import cast

import numpy as np
import torch

from training.core import runtime
from training.core.allocator import apply_in_process
from training.core.networks.base import EmbeddingNet, WeightsUnavailable
from training.core.networks.registry import build_network
from training.core.precision import autocast, autocast_dtype, precision_name
from training.core.preprocessing import Preprocessing

_lock = threading.Lock()
logger = logging.getLogger(__name__)


def resolve_device(choice: str | None = None) -> torch.device:
    """The torch device to run on: `choice` or CBIR_DEVICE ("auto": CUDA when
    PyTorch sees a GPU, else the CPU). Raises RuntimeError for "cuda" without one."""
    choice = choice or runtime.current().device
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

    configured = runtime.current().loader_workers
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
    apply_in_process()  # a process outside Django (a notebook) too: training/core/allocator.py
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


@lru_cache(maxsize=2)
def _compiled_network(key: tuple, batch: int, channels: int, size: int) -> tuple[torch.nn.Module, torch.device]:
    model, device = _cached_network(key)
    start = time.perf_counter()
    try:
        compiled = cast(torch.nn.Module, torch.compile(model))  # an OptimizedModule for a module
        embed_batch(compiled, device, torch.zeros(batch, channels, size, size))  # compiles, for this shape
    except Exception as exc:  # noqa: BLE001 - no compiler, an unsupported op: the eager network still works
        logger.warning("torch.compile failed for %s, embedding with the eager network: %s: %s",
                       key[1], type(exc).__name__, exc)
        return model, device
    logger.info("compiled %s for batches of %d in %.1f s", key[1], batch, time.perf_counter() - start)
    return compiled, device


def network_for(version, *, compiled_batch: int = 0) -> tuple[torch.nn.Module, torch.device]:
    """The version's network in eval mode and its device, built once per process.

    compiled_batch > 0: the same network through torch.compile, compiled (on
    the first call, in this process) for batches of exactly that many images
    of the version's input size; pass embed_batch(..., pad_to=compiled_batch).
    Should compiling fail, the eager network is returned and a warning logged.
    Raises WeightsUnavailable when the version's weights file is missing."""
    key = (version.pk, version.architecture, version.weights_source, version.weights_path,
           version.weights_sha256, _freeze(version.config or {}))
    with _lock:
        if compiled_batch > 0:
            preprocessing = preprocessing_for(version)
            return _compiled_network(key, int(compiled_batch), 1 if preprocessing.grayscale else 3,
                                     preprocessing.size)
        return _cached_network(key)


def compile_for(images: int) -> bool:
    """Whether a job embedding `images` images compiles the network: at least
    CBIR_COMPILE_MIN_IMAGES (0: never). About 29 s of compiling (cold) per
    worker process pays for itself from roughly 7,500 images in that process
    at the CPU speeds of docs/benchmarks.md (12.5 ms an image eager, 8.5 ms
    compiled); a job spread over W workers compiles W times."""
    threshold = runtime.current().compile_min_images
    return threshold > 0 and images >= threshold


def preprocessing_for(version) -> Preprocessing:
    return Preprocessing.from_dict(version.preprocessing or {})


@torch.inference_mode()
def embed_batch(model: torch.nn.Module, device: torch.device, batch: torch.Tensor, *, pad_to: int = 0) -> np.ndarray:
    """(N, C, H, W) preprocessed tensors → (N, dimension) float32 unit vectors.

    pad_to > N: the batch is padded with zero images to pad_to rows and only
    the first N outputs are returned (a compiled network then sees one shape;
    in eval mode rows do not affect each other)."""
    n = batch.shape[0]
    if pad_to > n:
        batch = torch.cat([batch, batch.new_zeros((pad_to - n, *batch.shape[1:]))])
    batch = batch.to(device, non_blocking=True)
    if batch.dim() == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with autocast(device, autocast_dtype(device)):
        out = model(batch)
    return out[:n].float().cpu().numpy()


def embedding_precision(device: torch.device) -> str:
    """The precision embed_batch runs the network in on `device`: "bfloat16",
    "float16" or "float32" (training.core.precision, CBIR_CPU_PRECISION)."""
    return precision_name(autocast_dtype(device))


def feature_cache_of(version) -> str:
    """The backbone feature cache file a head version was trained on
    (metrics["training"]["features"]["path"], training.core.features), or ""
    for a version that is not a head or whose training recorded none."""
    if version.architecture != "head":
        return ""
    features = ((getattr(version, "metrics", None) or {}).get("training") or {}).get("features") or {}
    return str(features.get("path") or "")


@torch.inference_mode()
def embed_from_feature_cache(version, rows) -> tuple[list[int], np.ndarray]:
    """A head version's embeddings of the images whose backbone features its
    training cached, without running the backbone: the head over the cached
    features (the frozen backbone in the published file is the one the cache
    was made with: the cache file's name is the digest of its weights and
    preprocessing). rows: (image id, content sha256) pairs. Returns
    (positions in rows that were found, (n, dimension) float32 unit vectors);
    ([], empty) for a version that is not a head or has no cache, and rows
    whose file changed since (another sha256) are not found: the caller
    embeds those through the network. Measured in docs/benchmarks.md
    ("Publishing a head")."""
    from training.core.features import read_cached

    path = feature_cache_of(version)
    if not path:
        return [], np.empty((0, int(version.dimension)), dtype=np.float32)
    positions, features = read_cached(path, rows)
    if not positions:
        return [], np.empty((0, int(version.dimension)), dtype=np.float32)
    model, device = network_for(version)
    head = cast(torch.nn.Module, model.head)
    out = [head(features[lo:lo + 4096].to(device)).float().cpu() for lo in range(0, len(features), 4096)]
    return positions, torch.cat(out).numpy()


def embed_query(version, rgb) -> np.ndarray:
    """One query image's embedding: a PIL RGB image (any size) → (dimension,)
    float32 unit vector, through the version's eager network (built once per
    process, network_for). `version`: a ModelVersion or anything with its
    fields (architecture, weights_source, weights_path, weights_sha256,
    config, preprocessing). Raises WeightsUnavailable when its weights file is missing."""
    model, device = network_for(version)
    tensor = preprocessing_for(version)(rgb)[None]
    return embed_batch(model, device, tensor)[0]
