"""A convolutional autoencoder, trained without labels by reconstruction.

Encoder: four 3x3 stride-2 convolutions (width, 2*width, 4*width, dimension
channels), so a size x size input becomes a (dimension, size/16, size/16)
bottleneck. Decoder: four 4x4 stride-2 transposed convolutions back to
(3, size, size). The embedding is the bottleneck global-average-pooled to
`dimension` values.

The reconstruction target is the normalised input itself (what
`Preprocessing.to_tensor` returns), so the decoder's last layer has no
activation: normalised pixels are not bounded to [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from training.core.networks.base import EmbeddingNet
from training.core.preprocessing import Preprocessing

DIMENSION = 256
STAGES = 4  # stride-2 stages; input sides must be multiples of 2**STAGES


class ConvAutoencoder(EmbeddingNet):
    """Input (N, 3, size, size). features: (N, dimension); reconstruct: (N, 3, size, size)."""

    architecture = "autoencoder"

    def __init__(self, weights: str = "random", dimension: int = DIMENSION, size: int = 224, width: int = 32) -> None:
        super().__init__()
        if weights != "random":
            raise ValueError(
                "the autoencoder is trained from scratch and has no pretrained weights; use weights='random'"
            )
        dimension, size, width = int(dimension), int(size), int(width)
        if size < 2**STAGES or size % 2**STAGES:
            raise ValueError(f"autoencoder input size must be a positive multiple of {2**STAGES}, not {size}")
        if dimension < 1 or width < 1:
            raise ValueError(f"dimension and width must be positive, not {dimension} and {width}")
        self.dimension = dimension
        self.config = {"dimension": dimension, "size": size, "width": width}
        self.preprocessing = Preprocessing(size=size)
        channels = [3, width, 2 * width, 4 * width, dimension]
        encoder: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            encoder += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.ReLU(inplace=True)]
        self.encoder = nn.Sequential(*encoder)
        decoder: list[nn.Module] = []
        reversed_channels = channels[::-1]
        for c_in, c_out in zip(reversed_channels[:-1], reversed_channels[1:]):
            # kernel 4, stride 2, padding 1 exactly doubles the side.
            decoder += [nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1), nn.ReLU(inplace=True)]
        self.decoder = nn.Sequential(*decoder[:-1])  # no activation on the output (see module docstring)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> bottleneck (N, dimension, H/16, W/16)."""
        return self.encoder(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.encode(x)).flatten(1)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 3, H, W), an estimate of the normalised input."""
        return self.decoder(self.encode(x))


def build(weights: str = "random", **config) -> ConvAutoencoder:
    unknown = set(config) - {"dimension", "size", "width"}
    if unknown:
        raise ValueError(f"autoencoder takes the settings dimension, size and width, got unknown {sorted(unknown)}")
    return ConvAutoencoder(weights, **config)
