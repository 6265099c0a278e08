"""ResNet50 with ImageNet weights from torchvision; embedding: the 2048-d
global-average-pooled output of the last residual stage."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50

from training.core.networks import torchvision_weights
from training.core.networks.base import EmbeddingNet
from training.core.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

DIMENSION = 2048


class ResNet50(EmbeddingNet):
    architecture = "resnet50"

    def __init__(self, weights: str = "pretrained") -> None:
        super().__init__()
        self.dimension = DIMENSION
        net = resnet50(weights=None)
        if weights == "pretrained":
            state, self.weights_info = torchvision_weights.load_state_dict(ResNet50_Weights.IMAGENET1K_V2, "ResNet50")
            net.load_state_dict(state)
        elif weights != "random":
            raise ValueError(f"weights must be 'pretrained' or 'random', not {weights!r}")
        net.fc = nn.Identity()
        self.backbone = net
        self.preprocessing = Preprocessing(size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def build(weights: str = "pretrained", **config) -> ResNet50:
    if config:
        raise ValueError(f"resnet50 takes no settings, got {sorted(config)}")
    return ResNet50(weights)
