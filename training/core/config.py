"""The settings of a training run, validated once (TrainConfig), against the
network registry: which settings an architecture takes, its default
objective and whether it has pretrained weights all come from its
`Architecture` record (training/core/networks/registry.py)."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any

import torch

from training.core.loop import VAL_PRECISION
from training.core.networks import head as head_network
from training.core.networks.base import EmbeddingNet
from training.core.networks.registry import (
    ARCHITECTURES,
    MAX_DIMENSION,
    build_network,
    get_architecture,
    sizable_architectures,
)
from training.core.objectives import OBJECTIVES as REGISTERED_OBJECTIVES

# "auto" (the architecture's default) and the registered objectives (training/core/objectives.py).
OBJECTIVES = ("auto", *REGISTERED_OBJECTIVES)
HEAD_OBJECTIVES = tuple(sorted(name for name, o in REGISTERED_OBJECTIVES.items() if o.head))
MAX_PROCESSES = 64
LABELLED_OBJECTIVES = tuple(sorted(name for name, o in REGISTERED_OBJECTIVES.items() if o.needs_labels))
SCHEDULERS = ("none", "cosine")
# What a head-only run learns from: class labels (default), relevance marks
# alone, or both (training/core/mark_training.py; the marks come with TrainingData).
MARKS = ("none", "only", "with_labels")
# Whose marks: everyone's (anonymous sessions too, the default) or signed-in users' (and API tokens') only.
MARKS_FROM = ("everyone", "signed-in")
SELECT_BY = ("val_loss", VAL_PRECISION)  # which epoch a run keeps: training.core.loop.best_epoch
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, not {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"{name} must be {bound}, not {value}")
    return value


@dataclass
class TrainConfig:
    """Everything that decides a training run. Constructing one validates it
    (ValueError with a message a user can act on) and resolves "auto" and
    unset values, so `asdict(config)` is what was actually run.

    - objective "auto": autoencoder → reconstruction; siamese, siamese_pretrained
      → contrastive (pairs from labels when the train split has ≥2 labels with
      ≥2 images each, else two augmentations of one image); every other
      architecture → classification (a cosine classifier over the labels).
      "triplet" (batch-hard, P×K batches) is the other labelled choice.
    - pretrained None → True where the architecture has pretrained weights.
    - image_size: input side (smaller is much faster on a CPU); for networks
      whose builder takes no size (vgg16, resnet50, efficientnet_lite0, all
      globally pooled) only the preprocessing changes.
    - batch_size counts images, or pairs for the contrastive objective.
    - num_workers None → training.core.inference.loader_workers (CBIR_LOADER_WORKERS; 0 on a CPU by default).
    - architecture "head" (head-only training, training/core/head_training.py):
      `backbone` (default efficientnet_lite0, or any timm:<model>; must have
      pretrained weights) is frozen and its features cached; only a `head`
      ("linear", default, or "mlp") of `embedding_dim` (default 256) trains,
      with a labelled objective (default normalized_softmax). Augmentation is
      off (the features are computed once). backbone and head are None for
      every other architecture.
    - augment None → on, except for head-only training.
    - processes: training processes on this host (DistributedDataParallel,
      one per GPU, or gloo on the CPU; training/core/distributed.py). The batch
      size is the global one and must divide evenly among the processes.
    - select_by: which epoch is kept (published): "val_loss", the lowest
      validation loss (the study's protocol, default), or "val_precision_at_10",
      the highest validation P@10 (each validation image a query against the
      train images, exact cosine). The second is for head-only training only,
      where it ranks cached features: on Fashion-MNIST (14,035 queries against
      41,852 features, 2 CPU cores) an epoch took 8.6-9.9 s with it against
      3.4-5.7 s without; for that head the loss's epoch retrieves worse
      (docs/study.md).
    """

    architecture: str
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-4
    embedding_dim: int | None = None
    objective: str = "auto"
    pretrained: bool | None = None
    scheduler: str = "none"
    early_stopping_patience: int = 3
    time_limit_s: float | None = None
    augment: bool | None = None
    num_workers: int | None = None
    image_size: int | None = None
    seed: int = 0
    backbone: str | None = None
    head: str | None = None
    processes: int = 1
    select_by: str = "val_loss"
    marks: str = "none"
    marks_from: str = "everyone"

    def __post_init__(self) -> None:
        architecture = get_architecture(self.architecture)  # UnknownArchitecture (a ValueError) names the known ones
        _check_int("epochs", self.epochs, 1, 10_000)
        _check_int("batch_size", self.batch_size, 2, 4096)
        if isinstance(self.learning_rate, bool) or not isinstance(self.learning_rate, (int, float)) \
                or not math.isfinite(self.learning_rate) or not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be a number above 0 and at most 1, not {self.learning_rate!r}")
        self.learning_rate = float(self.learning_rate)
        takes = architecture.settings
        if self.embedding_dim is not None:
            _check_int("embedding_dim", self.embedding_dim, 1, MAX_DIMENSION)
            if "dimension" not in takes:
                sizable = sizable_architectures("dimension")
                raise ValueError(f"{self.architecture} has a fixed {architecture.default_dimension}-d embedding; "
                                 f"embedding_dim applies to {', '.join(sizable)}")
        if self.image_size is not None:
            _check_int("image_size", self.image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.objective == "auto":
            self.objective = architecture.default_objective
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        _check_int("early_stopping_patience", self.early_stopping_patience, 0, 10_000)
        if self.time_limit_s is not None:
            if isinstance(self.time_limit_s, bool) or not isinstance(self.time_limit_s, (int, float)) \
                    or not self.time_limit_s > 0:
                raise ValueError(f"time_limit_s must be a number of seconds above 0, not {self.time_limit_s!r}")
            self.time_limit_s = float(self.time_limit_s)
        if self.num_workers is not None:
            _check_int("num_workers", self.num_workers, 0, 64)
        _check_int("seed", self.seed, 0, 2**31 - 1)
        available = architecture.pretrained is not None
        if self.pretrained is None:
            self.pretrained = available
        if not isinstance(self.pretrained, bool):
            raise ValueError(f"pretrained must be true or false, not {self.pretrained!r}")
        if self.pretrained and not available:
            raise ValueError(f"{self.architecture} has no pretrained weights: it is trained from scratch "
                             f"(leave pretrained unset or false)")
        self._check_head(architecture)
        if self.augment is None:
            self.augment = not self.head_only
        if not isinstance(self.augment, bool):
            raise ValueError(f"augment must be true or false, not {self.augment!r}")
        if self.head_only and self.augment:
            raise ValueError("augment does not apply to head-only training: the backbone's features are computed "
                             "once, without augmentation")
        if self.select_by not in SELECT_BY:
            raise ValueError(f"select_by must be one of {', '.join(SELECT_BY)}, not {self.select_by!r}")
        if self.select_by == VAL_PRECISION and not self.head_only:
            raise ValueError(f"select_by {VAL_PRECISION} applies to head-only training (it ranks the cached "
                             "features every epoch); a full network keeps the epoch with the lowest val_loss")
        if self.marks not in MARKS:
            raise ValueError(f"marks must be one of {', '.join(MARKS)}, not {self.marks!r}")
        if self.marks_from not in MARKS_FROM:
            raise ValueError(f"marks_from must be one of {', '.join(MARKS_FROM)}, not {self.marks_from!r}")
        if self.marks != "none" and not self.head_only:
            raise ValueError("marks apply to head-only training (--head-only): the head trains on cached features "
                             "of the marked images")
        if self.marks != "none" and self.select_by != "val_loss":
            raise ValueError("training on marks keeps the epoch with the lowest validation loss on the val split's "
                             "marks (select_by val_loss)")
        _check_int("processes", self.processes, 1, MAX_PROCESSES)
        if self.processes > 1:
            if self.head_only:
                raise ValueError("processes: head-only training runs in one process (it takes seconds)")
            if self.objective == "triplet":
                raise ValueError("processes: triplet training (P×K batches) runs in one process")
            if self.batch_size % self.processes:
                raise ValueError(f"batch_size {self.batch_size} must divide evenly among {self.processes} processes")
        # Build the network on the meta device (no memory, no weights) so that
        # settings the architecture refuses (an autoencoder size not a multiple
        # of 16, a siamese input too small) fail here, before any job exists.
        with torch.device("meta"):
            model = build_network(self.architecture, weights="random", **self.build_kwargs())
        if self.objective == "reconstruction" and not hasattr(model, "reconstruct"):
            raise ValueError(f"the reconstruction objective needs a network with a decoder (autoencoder), "
                             f"not {self.architecture}")

    @property
    def head_only(self) -> bool:
        """Whether only a projection head trains, on cached features of a frozen backbone."""
        return self.architecture == "head"

    def _check_head(self, architecture) -> None:
        """Resolve and check backbone and head (only for the "head" architecture)."""
        if not self.head_only:
            if self.backbone is not None or self.head is not None:
                raise ValueError("backbone and head apply to head-only training (architecture 'head', --head-only)")
            return
        self.backbone = self.backbone or architecture.defaults["backbone"]
        self.head = self.head or architecture.defaults["head"]
        backbone = get_architecture(self.backbone)  # UnknownArchitecture names the known ones
        if self.backbone == "head" or backbone.pretrained is None:
            with_weights = ", ".join(n for n in sorted(ARCHITECTURES) if get_architecture(n).pretrained and n != "head")
            raise ValueError(f"backbone {self.backbone} has no pretrained weights; head-only training needs a "
                             f"pretrained backbone ({with_weights}, or timm:<model name>)")
        if self.head not in head_network.HEADS:
            raise ValueError(f"head must be one of {', '.join(head_network.HEADS)}, not {self.head!r}")
        if not self.pretrained:
            raise ValueError("pretrained: head-only training freezes the backbone, so it needs its pretrained weights")
        if self.objective not in HEAD_OBJECTIVES:
            raise ValueError(f"objective {self.objective} does not apply to head-only training; choose one of "
                             f"{', '.join(HEAD_OBJECTIVES)}")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each setting's default, as written once above: the admin form's
        initial values and the train command's defaults read these."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

    @classmethod
    def from_params(cls, params: dict) -> TrainConfig:
        """From a job's params (or any dict): unknown keys are an error, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "architecture" not in params:
            raise ValueError("a training run needs an architecture")
        return cls(**params)

    def build_kwargs(self) -> dict:
        """The settings the network is built with (what ModelVersion.config rebuilds)."""
        takes = get_architecture(self.architecture).settings
        kwargs: dict = {}
        if self.embedding_dim is not None and "dimension" in takes:
            kwargs["dimension"] = self.embedding_dim
        if self.image_size is not None and "size" in takes:
            kwargs["size"] = self.image_size
        if self.head_only:
            kwargs.update(backbone=self.backbone, head=self.head)
        return kwargs

    def build_model(self) -> EmbeddingNet:
        """The network to train: pretrained or (explicitly) random initial weights,
        seeded, with the input size applied. Raises WeightsUnavailable when
        pretrained weights cannot be had."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = build_network(self.architecture, weights="pretrained" if self.pretrained else "random",
                                  **self.build_kwargs())
        return apply_image_size(model, self.image_size)

    def model_key(self) -> dict:
        """What a checkpoint must agree on to be resumed with this config
        (select_by too: a history scored by one rule cannot be continued by the other)."""
        return {k: getattr(self, k) for k in ("architecture", "embedding_dim", "image_size", "objective", "backbone",
                                              "head", "select_by")}


def apply_image_size(model: EmbeddingNet, image_size: int | None) -> EmbeddingNet:
    """Networks whose builder takes no size are globally pooled: any input side
    works, so only the preprocessing (stored on the ModelVersion) changes."""
    if image_size is not None and model.preprocessing.size != image_size:
        model.preprocessing = replace(model.preprocessing, size=int(image_size))
    return model


def check_pretrained_available(config: TrainConfig) -> None:
    """Fail early (WeightsUnavailable, naming the file and where it goes) when
    the run starts from pretrained weights that cannot be had; the job would
    fail anyway. The architecture's registry record says how to check."""
    pretrained = get_architecture(config.backbone if config.head_only and config.backbone
                                  else config.architecture).pretrained
    if config.pretrained and pretrained is not None:
        pretrained.check()
