"""Siamese networks: one embedding module applied to both images of a pair,
so the two branches share their weights by construction.

`siamese` is the study's own network, trained from scratch on grayscale input:

    conv 11x11/96, stride 2, padding 5   224 -> 112   ReLU, LRN
    max-pool 3, stride 2                 112 -> 55
    conv 5x5/256, padding 2              55  -> 55    ReLU, LRN
    max-pool 3, stride 2                 55  -> 27
    conv 3x3/384, padding 1              27  -> 27    ReLU
    conv 3x3/256, padding 1              27  -> 27    ReLU
    max-pool 3, stride 1                 27  -> 25
    conv 3x3/128, padding 1              25  -> 25    ReLU
    flatten (128 x 25 x 25 = 80,000) -> fully connected -> 500-d embedding

The study gives 80,000 inputs to the fully connected layer at 224x224, i.e. a
25x25 final map. With AlexNet's stride 4 on the first convolution and two
3/2 poolings the map is at most 13x13, so the first convolution has stride 2
(padding 5, which halves 224 exactly) and the third pooling has stride 1.

`siamese_pretrained` is a Siamese head on a pretrained backbone:
EfficientNet-Lite0's 1280-d pooled features -> Linear-ReLU-Linear projection.
"""

from __future__ import annotations

import torch
from torch import nn

from training.core.networks.base import EmbeddingNet
from training.core.networks.efficientnet_lite0 import EfficientNetLite0
from training.core.preprocessing import HALF_MEAN, HALF_STD, Preprocessing

SIAMESE_DIMENSION = 500
PRETRAINED_DIMENSION = 256


def _lrn() -> nn.LocalResponseNorm:
    # AlexNet's constants (Krizhevsky et al. 2012).
    return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)


class SiameseNet(EmbeddingNet):
    """The study's Siamese branch. Input (N, 1, size, size); output (N, dimension)."""

    architecture = "siamese"

    def __init__(self, weights: str = "random", dimension: int = SIAMESE_DIMENSION, size: int = 224) -> None:
        super().__init__()
        if weights != "random":
            raise ValueError(
                "the siamese network is trained from scratch and has no pretrained weights; "
                "use weights='random' (or the 'siamese_pretrained' architecture for a pretrained backbone)"
            )
        dimension, size = int(dimension), int(size)
        if dimension < 1:
            raise ValueError(f"dimension must be positive, not {dimension}")
        self.dimension = dimension
        self.config = {"dimension": dimension, "size": size}
        self.preprocessing = Preprocessing(size=size, grayscale=True)
        self.body = nn.Sequential(
            nn.Conv2d(1, 96, kernel_size=11, stride=2, padding=5), nn.ReLU(inplace=True), _lrn(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(96, 256, kernel_size=5, padding=2), nn.ReLU(inplace=True), _lrn(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=1),
            nn.Conv2d(256, 128, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Flatten(),
        )
        self.fc = nn.Linear(self._flattened_size(size), dimension)

    def _flattened_size(self, size: int) -> int:
        """Length of the flattened final map for size x size input, found by a
        dummy forward so it always agrees with the layers above."""
        try:
            with torch.no_grad():
                return int(self.body(torch.zeros(1, 1, size, size)).shape[1])
        except RuntimeError as exc:  # the map shrank to nothing
            raise ValueError(f"input size {size} is too small for the siamese network (at least 29)") from exc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class SiamesePretrained(EmbeddingNet):
    """EfficientNet-Lite0 backbone + projection MLP. Input (N, 3, size, size); output (N, dimension)."""

    architecture = "siamese_pretrained"

    def __init__(self, weights: str = "pretrained", dimension: int = PRETRAINED_DIMENSION,
                 hidden: int = 512, size: int = 224) -> None:
        super().__init__()
        dimension, hidden, size = int(dimension), int(hidden), int(size)
        if dimension < 1 or hidden < 1:
            raise ValueError(f"dimension and hidden must be positive, not {dimension} and {hidden}")
        self.dimension = dimension
        self.config = {"dimension": dimension, "hidden": hidden, "size": size}
        # The backbone raises its own clear errors for bad or unavailable weights.
        self.backbone = EfficientNetLite0(weights)
        self.weights_info = self.backbone.weights_info
        self.projection = nn.Sequential(
            nn.Linear(self.backbone.dimension, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dimension),
        )
        # The backbone's weights expect inputs in [-1, 1]; the pooled head accepts any size.
        self.preprocessing = Preprocessing(size=size, mean=HALF_MEAN, std=HALF_STD)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone.features(x))


def build_siamese(weights: str = "random", **config) -> SiameseNet:
    unknown = set(config) - {"dimension", "size"}
    if unknown:
        raise ValueError(f"siamese takes the settings dimension and size, got unknown {sorted(unknown)}")
    return SiameseNet(weights, **config)


def build_siamese_pretrained(weights: str = "pretrained", **config) -> SiamesePretrained:
    unknown = set(config) - {"dimension", "hidden", "size"}
    if unknown:
        raise ValueError(
            f"siamese_pretrained takes the settings dimension, hidden and size, got unknown {sorted(unknown)}"
        )
    return SiamesePretrained(weights, **config)
