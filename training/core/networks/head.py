"""A projection head on a frozen, pretrained backbone: backbone → head → embedding.

The registered architecture "head" (training/core/networks/registry.py) builds any
registered backbone that has pretrained weights (efficientnet_lite0 by
default, or a `timm:<model>`) and puts a small trainable projection on its
pooled features. Head-only training (`manage.py train --head-only`) embeds the
dataset once with the frozen backbone, caches those features on disk
(training/core/features.py) and trains only the head on them, in seconds; the
published model version holds backbone and head in one file and runs like
any other network (upload → backbone → head → pgvector).

Head kinds:
- "linear": features → L2-normalise → Linear(D_in, dimension).
- "mlp": features → L2-normalise → Linear(D_in, hidden) → ReLU → Linear(hidden, dimension).
The output is L2-normalised by EmbeddingNet.forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.core.networks.base import EmbeddingNet

HEADS = ("linear", "mlp")
DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_DIMENSION = 256
DEFAULT_HIDDEN = 1024


class ProjectionHead(nn.Module):
    """(N, in_features) float32 backbone features → (N, dimension) float32
    unit vectors. The input is L2-normalised first, so the head sees the
    cosine geometry the frozen backbone is searched with."""

    def __init__(self, in_features: int, dimension: int = DEFAULT_DIMENSION, kind: str = "linear",
                 hidden: int = DEFAULT_HIDDEN) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, not {kind!r}")
        if dimension < 1 or hidden < 1 or in_features < 1:
            raise ValueError(f"head sizes must be positive (in {in_features}, out {dimension}, hidden {hidden})")
        self.dimension = int(dimension)
        self.kind = kind
        if kind == "linear":
            self.layers: nn.Module = nn.Linear(in_features, self.dimension)
        else:
            self.layers = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, self.dimension))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Unnormalised projection (N, dimension)."""
        return self.layers(F.normalize(features.float(), dim=1, eps=1e-12))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(features), dim=1, eps=1e-12)


class HeadNet(EmbeddingNet):
    """`backbone` (an EmbeddingNet) followed by a ProjectionHead on its
    `features()`. Input: (N, C, H, W) float32 images preprocessed with the
    backbone's Preprocessing (stored on the version as this network's);
    output: (N, dimension) float32 unit vectors."""

    architecture = "head"

    def __init__(self, backbone: EmbeddingNet, backbone_name: str, kind: str = "linear",
                 dimension: int = DEFAULT_DIMENSION, hidden: int = DEFAULT_HIDDEN) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = ProjectionHead(backbone.dimension, dimension, kind, hidden)
        self.dimension = int(dimension)
        self.preprocessing = backbone.preprocessing
        self.weights_info = backbone.weights_info
        self.config = {"backbone": backbone_name, "head": kind, "dimension": self.dimension}
        if kind == "mlp":
            self.config["hidden"] = int(hidden)
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)


    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.project(self.backbone.features(x))

    def train(self, mode: bool = True) -> HeadNet:
        """The backbone stays in eval mode (frozen: BatchNorm statistics and dropout off)."""
        super().train(mode)
        self.backbone.eval()
        return self


def build(backbone_network: EmbeddingNet, backbone: str, *, head: str = "linear",
          dimension: int = DEFAULT_DIMENSION, hidden: int = DEFAULT_HIDDEN) -> HeadNet:
    """backbone_network (built by the registry, pretrained or random) → a new,
    random head (seeded by the caller). The registry's "head" builder
    (training/core/networks/registry.py) resolves the backbone name."""
    return HeadNet(backbone_network, backbone, head, int(dimension), int(hidden))
