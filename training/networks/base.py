"""What every network in the registry is: a module mapping a batch of
preprocessed images (N, C, H, W) to L2-normalised embeddings (N, dimension)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.preprocessing import Preprocessing


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
class Architecture:
    """A registry entry: how to build a network and what it outputs."""

    name: str
    builder: object  # callable(weights: str, **config) -> EmbeddingNet
    description: str
    default_dimension: int
    needs_labels: bool = False
    defaults: dict = field(default_factory=dict)
