"""VGG16 with ImageNet weights from torchvision.

Embedding: the last convolutional block's 512 feature maps, global-average
pooled to 512-d. The study's 4096-d fully connected output cannot be indexed
(pgvector's HNSW stops at 4,000 dimensions on halfvec), and pooled conv
features retrieve at least as well while being 8x smaller.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import VGG16_Weights, vgg16

from training.core.networks import torchvision_weights
from training.core.networks.base import EmbeddingNet
from training.core.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

DIMENSION = 512


class VGG16(EmbeddingNet):
    architecture = "vgg16"

    def __init__(self, weights: str = "pretrained") -> None:
        super().__init__()
        self.dimension = DIMENSION
        net = vgg16(weights=None)
        if weights == "pretrained":
            state, self.weights_info = torchvision_weights.load_state_dict(VGG16_Weights.IMAGENET1K_V1, "VGG16")
            net.load_state_dict(state)
        elif weights != "random":
            raise ValueError(f"weights must be 'pretrained' or 'random', not {weights!r}")
        self.features_net = net.features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.preprocessing = Preprocessing(size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features_net(x)).flatten(1)


def build(weights: str = "pretrained", **config) -> VGG16:
    if config:
        raise ValueError(f"vgg16 takes no settings, got {sorted(config)}")
    return VGG16(weights)
