"""A very small CNN (a few thousand parameters) for tests and smoke runs on a
CPU. It has no pretrained weights: ask for weights="random"."""

from __future__ import annotations

import torch
from torch import nn

from training.core.networks.base import EmbeddingNet
from training.core.preprocessing import Preprocessing


class TinyCNN(EmbeddingNet):
    architecture = "tiny"

    def __init__(self, weights: str = "random", dimension: int = 32, size: int = 32, seed: int = 0) -> None:
        super().__init__()
        if weights != "random":
            raise ValueError("the tiny network has no pretrained weights; use weights='random'")
        self.dimension = int(dimension)
        self.config = {"dimension": self.dimension, "size": int(size), "seed": int(seed)}
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # same seed, same network: tests can rebuild it
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, self.dimension),
        )
        torch.random.set_rng_state(generator_state)
        self.preprocessing = Preprocessing(size=int(size))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def build(weights: str = "random", **config) -> TinyCNN:
    return TinyCNN(weights, **config)
