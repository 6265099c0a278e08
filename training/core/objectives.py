"""Training objectives: `objective(model, batch, device) -> scalar loss`, one
per way of training an embedding. All are nn.Modules so the loop can switch
them between train and eval mode and checkpoint any parameters they own.

    objective                  batch (from)                          network
    ReconstructionObjective    (x, label) ImageListDataset           autoencoder (needs .reconstruct)
    ContrastiveObjective       (x1, x2, same) PairDataset            any, e.g. siamese
    TripletObjective           (x, label) ImageListDataset+PKSampler any, labelled images only
    ClassificationObjective    (x, label) ImageListDataset           any, labelled images only
    MetricLossObjective        (x, label) ImageListDataset or cached  any, labelled images only
                               features (FeatureDataset)

`x` is whatever the trained module takes: images for a whole network,
cached backbone features for a projection head (head-only training).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from torch import nn

from training.core.losses import contrastive_loss, triplet_loss
from training.core.networks.base import EmbeddingNet


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _labelled(batch: Any, device: torch.device, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = batch[0], torch.as_tensor(batch[1])
    if bool((labels < 0).any()):
        raise ValueError(f"{what} needs labelled images, but the batch holds unlabelled ones (label -1)")
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


class ReconstructionObjective(nn.Module):
    """Mean squared error between model.reconstruct(x) and the (normalised) input x."""

    def forward(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        x = _images(batch).to(device, non_blocking=True)
        return F.mse_loss(model.reconstruct(x).float(), x.float())  # type: ignore[operator]  # nn.Module attribute


class ContrastiveObjective(nn.Module):
    """contrastive_loss over a (x1, x2, same) batch; both images go through
    the one network in a single forward (shared weights, shared batch statistics)."""

    def __init__(self, margin: float = 0.5) -> None:
        super().__init__()
        self.margin = float(margin)

    def forward(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        x1, x2, same = batch
        embeddings = model(torch.cat([x1, x2]).to(device, non_blocking=True))
        emb_a, emb_b = embeddings.chunk(2)
        return contrastive_loss(emb_a, emb_b, torch.as_tensor(same).to(device), margin=self.margin)


class TripletObjective(nn.Module):
    """triplet_loss over a labelled (x, label) batch, best drawn with PKSampler."""

    def __init__(self, margin: float = 0.2, mining: str = "batch_hard") -> None:
        super().__init__()
        if mining not in ("batch_hard", "batch_all"):
            raise ValueError(f"mining must be 'batch_hard' or 'batch_all', not {mining!r}")
        self.margin, self.mining = float(margin), mining

    def forward(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        x, labels = _labelled(batch, device, "triplet training")
        return triplet_loss(model(x), labels, margin=self.margin, mining=self.mining)


class ClassificationObjective(nn.Module):
    """Cross-entropy of a cosine classifier over the L2-normalised embedding:
    logits = scale * cos(embedding, class weight). Training through the
    normalised embedding shapes the very cosine geometry retrieval uses.

    Owns the class weights (num_classes, dimension): put this module's
    parameters in the optimizer next to the network's, move it to the device,
    and pass it as `objective=` to save/load_checkpoint. The network itself is
    not a submodule (its parameters would be counted twice).
    """

    def __init__(self, embedding_net: EmbeddingNet, num_classes: int, scale: float = 16.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"classification needs at least two classes, got {num_classes}")
        self.scale = float(scale)
        self.head = nn.Linear(embedding_net.dimension, int(num_classes), bias=False)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, dimension) normalised embeddings -> (N, num_classes)."""
        return self.scale * F.linear(embeddings, F.normalize(self.head.weight, dim=1))

    def forward(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        x, labels = _labelled(batch, device, "classification training")
        return F.cross_entropy(self.logits(model(x).float()), labels)


# objective name → pytorch-metric-learning loss class (each owns per-class weights or proxies).
METRIC_LOSSES = {
    "normalized_softmax": pml_losses.NormalizedSoftmaxLoss,  # Zhai & Wu 2018, "Classification is a Strong Baseline"
    "arcface": pml_losses.ArcFaceLoss,  # Deng et al. 2019, additive angular margin
    "proxy_anchor": pml_losses.ProxyAnchorLoss,  # Kim et al. 2020
}


class MetricLossObjective(nn.Module):
    """A pytorch-metric-learning loss with per-class parameters on the
    embeddings of a labelled (x, label) batch: `loss(model(x), labels)`.

    name: "normalized_softmax" (cosine softmax, temperature 0.05), "arcface"
    (margin 28.6°, scale 64) or "proxy_anchor" (margin 0.1, alpha 32), with
    the library's defaults (https://kevinmusgrave.github.io/pytorch-metric-learning/losses/).
    The loss's weights (dimension × num_classes) are this module's parameters:
    put them in the optimizer and pass the module as `objective=` to
    save/load_checkpoint, as for ClassificationObjective. Raises ValueError for
    an unknown name or fewer than two classes."""

    def __init__(self, name: str, num_classes: int, dimension: int) -> None:
        super().__init__()
        if name not in METRIC_LOSSES:
            raise ValueError(f"unknown metric loss {name!r}; known: {', '.join(METRIC_LOSSES)}")
        if num_classes < 2:
            raise ValueError(f"{name} needs at least two classes, got {num_classes}")
        self.name = name
        self.loss = METRIC_LOSSES[name](num_classes=int(num_classes), embedding_size=int(dimension))

    def forward(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        x, labels = _labelled(batch, device, f"{self.name} training")
        return self.loss(model(x).float(), labels)


# --- The registry -----------------------------------------------------------------

@dataclass(frozen=True)
class Objective:
    """A registered training objective, as architectures are registered
    (training/core/networks/registry.py); the config, the admin form, the
    train command's choices and docs/training.md read these records.

    - description: one line for people (form choices, docs);
    - needs_labels: trains only on labelled images;
    - plan: how batches are drawn (training.core.plan): "pairs" (PairDataset:
      (x1, x2, same)), "pk" (labelled (x, label) batches of P classes × K
      images, PKSampler) or "images" ((x, label) batches, shuffled);
    - per_class: owns a learned weight or proxy per class of the train split
      (so the classes are fixed when training starts and checked on resume);
    - head: usable for head-only training on cached features;
    - build(model, num_classes): the objective module (model has `.dimension`)."""

    name: str
    description: str
    needs_labels: bool
    plan: str
    per_class: bool
    head: bool
    build: Callable[[nn.Module, int], nn.Module]


def _metric_loss(name: str) -> Callable[[nn.Module, int], nn.Module]:
    return lambda model, classes: MetricLossObjective(name, classes, int(model.dimension))  # type: ignore[arg-type]


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("reconstruction", "reconstruction (autoencoder, no labels)", False, "images", False, False,
              lambda model, classes: ReconstructionObjective()),
    Objective("contrastive", "contrastive pairs (labels, or two augmentations of one image)", False, "pairs", False,
              False, lambda model, classes: ContrastiveObjective()),
    Objective("classification", "classification over the labels (cosine classifier)", True, "images", True, True,
              lambda model, classes: ClassificationObjective(model, num_classes=classes)),  # type: ignore[arg-type]
    Objective("triplet", "triplet, batch-hard over P×K batches (labels)", True, "pk", False, True,
              lambda model, classes: TripletObjective()),
    Objective("normalized_softmax", "normalized softmax (cosine softmax, pytorch-metric-learning; labels)", True,
              "images", True, True, _metric_loss("normalized_softmax")),
    Objective("arcface", "ArcFace, additive angular margin (pytorch-metric-learning; labels)", True, "images", True,
              True, _metric_loss("arcface")),
    Objective("proxy_anchor", "Proxy Anchor (pytorch-metric-learning; labels)", True, "images", True, True,
              _metric_loss("proxy_anchor")),
)}
OBJECTIVES_NEEDING_LABELS = frozenset(name for name, o in OBJECTIVES.items() if o.needs_labels)
CLASS_OBJECTIVES = frozenset(name for name, o in OBJECTIVES.items() if o.per_class)


def get_objective(name: str) -> Objective:
    """The registered objective `name`; ValueError naming the known ones otherwise."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}") from None
