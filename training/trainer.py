"""Training a registered network on a dataset's images, as a plain function.

    config = TrainConfig("autoencoder", epochs=5, image_size=64)
    result = train(dataset, config, checkpoint_dir=path)          # resumable
    version = create_version_from_checkpoint(config, result.best_path, dataset,
                                             result.history, result.seconds)
    index_and_evaluate(version, dataset)                          # embed + P@10

`run_training_job(job_id)` is the same sequence for a Celery worker (the
`run_training` task), with progress, cancellation and the job row; the
`train` management command runs it in the foreground. See docs/training.md.

Which images: the dataset's `train` split trains, its `val` split gives the
validation loss that picks the best epoch and stops training early; the
`test` split is left for evaluation.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from django.conf import settings
from django.db import IntegrityError, close_old_connections, connection, transaction
from django.utils import timezone
from PIL import Image as PILImage
from torch.utils.data import DataLoader

from search.models import Dataset, Image, Job, Split
from training.data import ImageListDataset, PairDataset
from training.inference import loader_workers, resolve_device
from training.loop import evaluate, load_checkpoint, mixed_precision, save_atomically, save_checkpoint, train_one_epoch
from training.models import ModelVersion
from training.networks.base import EmbeddingNet, WeightsUnavailable, sha256_of
from training.networks.registry import MAX_DIMENSION, build_network, get_architecture
from training.objectives import (
    ClassificationObjective,
    ContrastiveObjective,
    ReconstructionObjective,
    TripletObjective,
)
from training.samplers import PKSampler, group_by_label, make_augmented_pairs, make_pairs

logger = logging.getLogger(__name__)

OBJECTIVES = ("auto", "reconstruction", "contrastive", "classification", "triplet")
LABELLED_OBJECTIVES = ("classification", "triplet")
SCHEDULERS = ("none", "cosine")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024
VALIDATION_EVERY = 5  # when the val split is empty: every 5th training image validates instead

# progress(epoch, n_epochs, batch, n_batches, history): called after every
# batch (epoch and batch 1-based, history = finished epochs) and once more
# after each epoch's validation (batch == n_batches, history including it).
Progress = Callable[[int, int, int, int, list], None]


class TrainingStopped(Exception):
    """should_stop() said so (the job was cancelled, or another worker took it over)."""


# --- Configuration ------------------------------------------------------------

def has_pretrained_weights(architecture: str) -> bool:
    """Whether the architecture's builder starts from pretrained weights by default."""
    builder = get_architecture(architecture).builder
    parameter = inspect.signature(builder).parameters.get("weights")
    return parameter is not None and parameter.default == "pretrained"


def architecture_settings(architecture: str) -> set[str]:
    """The build settings an architecture takes (dimension, size, ...)."""
    keys = set(get_architecture(architecture).defaults)
    if architecture == "tiny":  # registered without defaults, but takes both
        keys |= {"dimension", "size"}
    return keys


def default_objective(architecture: str) -> str:
    if architecture == "autoencoder":
        return "reconstruction"
    if architecture in ("siamese", "siamese_pretrained"):
        return "contrastive"
    return "classification"


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
    - num_workers None → training.inference.loader_workers (CBIR_LOADER_WORKERS; 0 on a CPU by default).
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
    augment: bool = True
    num_workers: int | None = None
    image_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        architecture = get_architecture(self.architecture)  # UnknownArchitecture (a ValueError) names the known ones
        _check_int("epochs", self.epochs, 1, 10_000)
        _check_int("batch_size", self.batch_size, 2, 4096)
        if isinstance(self.learning_rate, bool) or not isinstance(self.learning_rate, (int, float)) \
                or not math.isfinite(self.learning_rate) or not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be a number above 0 and at most 1, not {self.learning_rate!r}")
        self.learning_rate = float(self.learning_rate)
        takes = architecture_settings(self.architecture)
        if self.embedding_dim is not None:
            _check_int("embedding_dim", self.embedding_dim, 1, MAX_DIMENSION)
            if "dimension" not in takes:
                sizable = sorted(a for a in _all_architectures() if "dimension" in architecture_settings(a))
                raise ValueError(f"{self.architecture} has a fixed {architecture.default_dimension}-d embedding; "
                                 f"embedding_dim applies to {', '.join(sizable)}")
        if self.image_size is not None:
            _check_int("image_size", self.image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.objective == "auto":
            self.objective = default_objective(self.architecture)
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        _check_int("early_stopping_patience", self.early_stopping_patience, 0, 10_000)
        if self.time_limit_s is not None:
            if isinstance(self.time_limit_s, bool) or not isinstance(self.time_limit_s, (int, float)) \
                    or not self.time_limit_s > 0:
                raise ValueError(f"time_limit_s must be a number of seconds above 0, not {self.time_limit_s!r}")
            self.time_limit_s = float(self.time_limit_s)
        if not isinstance(self.augment, bool):
            raise ValueError(f"augment must be true or false, not {self.augment!r}")
        if self.num_workers is not None:
            _check_int("num_workers", self.num_workers, 0, 64)
        _check_int("seed", self.seed, 0, 2**31 - 1)
        available = has_pretrained_weights(self.architecture)
        if self.pretrained is None:
            self.pretrained = available
        if not isinstance(self.pretrained, bool):
            raise ValueError(f"pretrained must be true or false, not {self.pretrained!r}")
        if self.pretrained and not available:
            raise ValueError(f"{self.architecture} has no pretrained weights: it is trained from scratch "
                             f"(leave pretrained unset or false)")
        # Build the network on the meta device (no memory, no weights) so that
        # settings the architecture refuses (an autoencoder size not a multiple
        # of 16, a siamese input too small) fail here, before any job exists.
        with torch.device("meta"):
            model = build_network(self.architecture, weights="random", **self.build_kwargs())
        if self.objective == "reconstruction" and not hasattr(model, "reconstruct"):
            raise ValueError(f"the reconstruction objective needs a network with a decoder (autoencoder), "
                             f"not {self.architecture}")

    @classmethod
    def from_params(cls, params: dict) -> "TrainConfig":
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
        takes = architecture_settings(self.architecture)
        kwargs: dict = {}
        if self.embedding_dim is not None and "dimension" in takes:
            kwargs["dimension"] = self.embedding_dim
        if self.image_size is not None and "size" in takes:
            kwargs["size"] = self.image_size
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
        """What a checkpoint must agree on to be resumed with this config."""
        return {k: getattr(self, k) for k in ("architecture", "embedding_dim", "image_size", "objective")}


def _all_architectures() -> list[str]:
    from training.networks.registry import ARCHITECTURES

    return list(ARCHITECTURES)


def apply_image_size(model: EmbeddingNet, image_size: int | None) -> EmbeddingNet:
    """Networks whose builder takes no size are globally pooled: any input side
    works, so only the preprocessing (stored on the ModelVersion) changes."""
    if image_size is not None and model.preprocessing.size != image_size:
        model.preprocessing = replace(model.preprocessing, size=int(image_size))
    return model


def check_pretrained_available(config: TrainConfig) -> None:
    """Fail early (WeightsUnavailable) when pretrained torchvision weights are
    missing from the cache and the site is offline; the job would fail anyway."""
    if not config.pretrained or config.architecture not in ("vgg16", "resnet50"):
        return
    from torchvision.models import ResNet50_Weights, VGG16_Weights

    from training.networks import torchvision_weights

    weights = VGG16_Weights.IMAGENET1K_V1 if config.architecture == "vgg16" else ResNet50_Weights.IMAGENET1K_V2
    path = torchvision_weights.cache_path(weights)
    if not path.exists() and torchvision_weights.offline():
        raise WeightsUnavailable(
            f"{config.architecture} ImageNet weights are not in the torch cache ({path}) and the site is offline "
            f"(CBIR_OFFLINE): put the file there, or train from random initial weights (untick 'pretrained', "
            f"--random-weights)")


# --- Which images -----------------------------------------------------------

Item = tuple[str, str | None]  # (file path, label or None)


def _split_items(dataset: Dataset, split: str) -> list[tuple[int, str, str | None]]:
    media = Path(settings.MEDIA_ROOT)
    rows = Image.objects.filter(dataset=dataset, split=split).order_by("pk").values_list("pk", "file", "label")
    return [(pk, str(media / name), label or None) for pk, name, label in rows]


def check_dataset(dataset: Dataset, config: TrainConfig) -> None:
    """ValueError when the dataset's train split cannot train `config`'s objective
    (counted from the rows; unreadable files are only found when training)."""
    labels = list(Image.objects.filter(dataset=dataset, split=Split.TRAIN).values_list("label", flat=True))
    _check_train_labels(dataset.name, config, [label or None for label in labels])


def _check_train_labels(name: str, config: TrainConfig, labels: list[str | None]) -> None:
    counts = Counter(label for label in labels if label is not None)
    hint = ("label the images (import with labels from folders), or train an architecture that needs no labels "
            "(autoencoder, siamese)")
    if config.objective == "classification" and len(counts) < 2:
        raise ValueError(f"{config.architecture} trains a classifier over the labels, but the train split of "
                         f"{name!r} has {len(counts)} labelled class(es); it needs at least 2: {hint}")
    if config.objective == "triplet" and sum(1 for n in counts.values() if n >= 2) < 2:
        raise ValueError(f"triplet training needs at least 2 classes with 2 or more images in the train split of "
                         f"{name!r} (it has {sum(1 for n in counts.values() if n >= 2)}): {hint}")
    if len(labels) < 2:
        raise ValueError(f"the train split of dataset {name!r} holds {len(labels)} usable image(s); training "
                         f"needs at least 2 (import more images)")
    if config.objective == "contrastive" and not _pairs_from_labels(labels) and not config.augment:
        raise ValueError(f"the train split of {name!r} has too few labels for labelled pairs, so positive pairs "
                         f"are two augmentations of one image: turn augmentation on, or label the images")


def _pairs_from_labels(labels: list) -> bool:
    """Labelled pairs need at least two labels with two or more images each."""
    groups = group_by_label(labels)
    return sum(1 for indices in groups.values() if len(indices) >= 2) >= 2


def _readable(items: list[tuple[int, str, str | None]], warnings: list[str]) -> list[tuple[int, str, str | None]]:
    """Leave out files that are missing or not images (header check; a full
    decode would cost as much as an epoch)."""
    good = []
    for pk, path, label in items:
        try:
            with PILImage.open(path) as image:
                image.verify()
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds; each is reported
            warnings.append(f"image {pk} ({path}) left out: {type(exc).__name__}: {exc}")
        else:
            good.append((pk, path, label))
    return good


# --- Results ----------------------------------------------------------------

@dataclass
class TrainResult:
    best_path: Path
    last_path: Path
    history: list[dict]
    best_epoch: int
    best_val_loss: float
    seconds: float  # training time over all runs (resumed ones included)
    stop_reason: str  # "completed", "early_stopping", "time_limit"
    objective: str
    classes: list[str] | None = None
    pairs: str | None = None  # contrastive: "labels" or "augmented"
    n_train: int = 0
    n_val: int = 0
    resumed_from_epoch: int = 0
    device: str = "cpu"
    warnings: list[str] = field(default_factory=list)

    @property
    def seconds_per_epoch(self) -> float:
        return self.seconds / len(self.history) if self.history else 0.0

    def summary(self) -> dict:
        """JSON-ready numbers for a job's result and a version's metrics."""
        return {"history": self.history, "best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
                "seconds": round(self.seconds, 3), "seconds_per_epoch": round(self.seconds_per_epoch, 3),
                "stop_reason": self.stop_reason, "objective": self.objective, "pairs": self.pairs,
                "n_train": self.n_train, "n_val": self.n_val, "classes": len(self.classes or []),
                "device": self.device, "resumed_from_epoch": self.resumed_from_epoch, "warnings": self.warnings[:50]}


# --- The data plan: loaders and the objective ---------------------------------

def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 100_003 + epoch) % (2**63 - 1)


class _Plan:
    """Datasets, loaders and the objective for one run. Every epoch's shuffle,
    pairs and augmentations depend only on (seed, epoch), so a resumed run
    repeats exactly what an uninterrupted one would have done."""

    def __init__(self, dataset: Dataset, config: TrainConfig, model: EmbeddingNet, device: torch.device) -> None:
        self.config = config
        self.warnings: list[str] = []
        self.classes: list[str] | None = None
        self.pairs: str | None = None
        train = _readable(_split_items(dataset, Split.TRAIN), self.warnings)
        val = _readable(_split_items(dataset, Split.VAL), self.warnings)
        objective = config.objective
        if objective in LABELLED_OBJECTIVES:
            unlabelled = sum(1 for _, _, label in train if label is None)
            if unlabelled:
                self.warnings.append(f"{unlabelled} unlabelled training image(s) left out ({objective} needs labels)")
            train = [row for row in train if row[2] is not None]
        _check_train_labels(dataset.name, config, [label for _, _, label in train])
        if objective == "classification":
            self.classes = sorted({label for _, _, label in train})
            unseen = [row for row in val if row[2] not in self.classes]
            if unseen:
                self.warnings.append(f"{len(unseen)} validation image(s) left out: their label is unlabelled or "
                                     f"not in the train split, so the classifier cannot score them")
            val = [row for row in val if row[2] in self.classes]
        elif objective == "triplet":
            val = [row for row in val if row[2] is not None]
        needed = 2 if objective == "contrastive" else 1  # a pair needs two images
        if len(val) < needed:
            val = train[VALIDATION_EVERY - 1::VALIDATION_EVERY]
            if len(val) < needed:
                val = train[-needed:]
            held = {row[0] for row in val}
            train = [row for row in train if row[0] not in held]
            self.warnings.append(f"the val split has no usable image; {len(val)} training image(s) validate instead")
            _check_train_labels(dataset.name, config, [label for _, _, label in train])
        self.n_train, self.n_val = len(train), len(val)
        train_items: list[tuple[str, str | None]] = [(path, label) for _, path, label in train]
        val_items: list[tuple[str, str | None]] = [(path, label) for _, path, label in val]

        preprocessing = model.preprocessing
        workers = loader_workers(device) if config.num_workers is None else config.num_workers
        self.loader_args = {"num_workers": workers, "pin_memory": device.type == "cuda",
                            "prefetch_factor": 2 if workers else None}
        self.generator = torch.Generator()
        self.val_generator = torch.Generator()
        batch = config.batch_size

        if objective == "contrastive":
            self.objective: torch.nn.Module = ContrastiveObjective()
            train_labels = [label for _, label in train_items]
            self.pairs = "labels" if _pairs_from_labels(train_labels) else "augmented"
            self._train_items, self._train_labels = train_items, train_labels
            self.n_pairs = len(train_items)
            self.n_batches = math.ceil(self.n_pairs / batch)
            val_labels = [label for _, label in val_items]
            if self.pairs == "labels" and _pairs_from_labels(val_labels):
                val_pairs = make_pairs(val_labels, max(len(val_items), 16), seed=config.seed)
                val_augment = False
            else:  # too few labelled validation images: the same kind of pairs as without labels
                val_pairs = make_augmented_pairs(len(val_items), seed=config.seed, n_pairs=max(len(val_items), 16))
                val_augment = True
            self.val_loader = DataLoader(PairDataset(val_items, val_pairs, preprocessing, augment=val_augment),
                                         batch_size=batch, shuffle=False, generator=self.val_generator,
                                         **self.loader_args)
            self._preprocessing = preprocessing
            return

        # The classifier's classes are fixed above (they are checked again on resume).
        mapping = {label: i for i, label in enumerate(self.classes)} if self.classes is not None else None
        train_set = ImageListDataset(train_items, preprocessing, augment=config.augment, label_to_index=mapping)
        val_set = ImageListDataset(val_items, preprocessing, augment=False, label_to_index=mapping)
        if objective == "triplet":
            self.objective = TripletObjective()
            k = 4 if batch >= 8 else 2
            eligible = sum(1 for indices in group_by_label(train_set.labels).values() if len(indices) >= 2)
            p = max(2, min(batch // k, eligible))
            self.sampler = PKSampler(train_set.labels, p=p, k=k, seed=config.seed)
            self.train_loader = DataLoader(train_set, batch_sampler=self.sampler, generator=self.generator,
                                           **self.loader_args)
            # Batch-hard over big validation batches: every anchor finds its hardest pair among many.
            val_batch = min(max(batch, 64), 256)
        else:
            self.sampler = None
            if objective == "classification":
                self.objective = ClassificationObjective(model, num_classes=len(self.classes or []))
            else:
                self.objective = ReconstructionObjective()
            # A last batch of one image breaks BatchNorm in training mode: drop it then.
            self.train_loader = DataLoader(train_set, batch_size=batch, shuffle=True, generator=self.generator,
                                           drop_last=len(train_set) % batch == 1, **self.loader_args)
            val_batch = batch
        self.val_loader = DataLoader(val_set, batch_size=val_batch, shuffle=False, generator=self.val_generator,
                                     **self.loader_args)
        self.n_batches = len(self.train_loader)

    def train_loader_for(self, epoch: int) -> DataLoader:
        """The loader for 0-based `epoch`, its randomness seeded by (seed, epoch)."""
        seed = _epoch_seed(self.config.seed, epoch)
        self.generator.manual_seed(seed)
        torch.manual_seed(seed)  # augmentations drawn in this process (num_workers=0)
        if self.config.objective != "contrastive":
            if self.sampler is not None:
                self.sampler.set_epoch(epoch)
            return self.train_loader
        if self.pairs == "labels":
            pairs = make_pairs(self._train_labels, self.n_pairs, seed=seed)
        else:
            pairs = make_augmented_pairs(len(self._train_items), seed=seed, n_pairs=self.n_pairs)
        augment = self.config.augment or self.pairs == "augmented"
        return DataLoader(PairDataset(self._train_items, pairs, self._preprocessing, augment=augment),
                          batch_size=self.config.batch_size, shuffle=False, generator=self.generator,
                          **self.loader_args)

    def validate(self, model: torch.nn.Module, device: torch.device, autocast_dtype) -> float:
        """The validation loss, identical for identical weights (fixed seeds, RNG state restored)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.val_generator.manual_seed(self.config.seed)
            return evaluate(model, self.objective, self.val_loader, device, autocast_dtype=autocast_dtype)


# --- Training -----------------------------------------------------------------

def _learning_rate(config: TrainConfig, epoch: int) -> float:
    """Learning rate for 0-based `epoch`: constant, or cosine from the base to 0
    over the planned epochs. A function of the epoch, so resuming needs no scheduler state."""
    if config.scheduler == "cosine":
        return config.learning_rate * 0.5 * (1 + math.cos(math.pi * epoch / config.epochs))
    return config.learning_rate


def _stop_reason(config: TrainConfig, history: list[dict]) -> str | None:
    """Why no further epoch should run, judged from the history alone (so a
    resumed run reaches the same decision)."""
    if not history:
        return None
    if len(history) >= config.epochs:
        return "completed"
    best_epoch = _best(history)[0]
    if config.early_stopping_patience and len(history) - best_epoch >= config.early_stopping_patience:
        return "early_stopping"
    if config.time_limit_s is not None:
        spent = sum(h["seconds"] for h in history)
        # Never start an epoch that is not expected to finish in time (the first always runs).
        if spent + spent / len(history) > config.time_limit_s:
            return "time_limit"
    return None


def _best(history: list[dict]) -> tuple[int, float]:
    finite = [h for h in history if math.isfinite(h["val_loss"])]
    if not finite:
        return 0, math.inf
    best = min(finite, key=lambda h: (h["val_loss"], h["epoch"]))
    return best["epoch"], best["val_loss"]


def _checkpoint_config(config: TrainConfig, plan: _Plan) -> dict:
    return {"train": asdict(config), "classes": plan.classes, "pairs": plan.pairs}


def _resume(last: Path, config: TrainConfig, plan: _Plan, model, optimizer) -> tuple[int, list[dict]]:
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    saved = checkpoint.get("config") or {}
    saved_train = saved.get("train") or {}
    mismatched = {k: (saved_train.get(k), v) for k, v in config.model_key().items() if saved_train.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
        raise ValueError(f"{last} was made with other settings ({details}); resume with the same settings, "
                         f"or start again without resuming")
    if saved.get("classes") != plan.classes:
        raise ValueError(f"{last} was trained on other classes than the dataset's train split now holds; "
                         f"start again without resuming")
    load_checkpoint(last, model, optimizer, objective=plan.objective)
    return int(checkpoint["epoch"]), list(checkpoint["history"])


def train(dataset: Dataset, config: TrainConfig, *, checkpoint_dir: str | os.PathLike[str],
          progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
          resume: bool = True) -> TrainResult:
    """Train `config.architecture` on the dataset's train split, validating on
    its val split after every epoch.

    Writes checkpoint_dir/last.pt after every epoch and checkpoint_dir/best.pt
    whenever the validation loss is the lowest so far (weights, optimizer and
    objective state, epoch, config, history). With resume=True an existing
    last.pt is continued (same architecture, size, dimension, objective and
    classes required); with resume=False old checkpoints are removed first.

    Stops after `epochs`, or `early_stopping_patience` epochs without a better
    validation loss, or before an epoch that would overrun `time_limit_s`.
    should_stop() is asked between batches; when true, TrainingStopped is
    raised (the last finished epoch stays in last.pt).
    """
    # Seeded, and the caller's random state is given back afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _train(dataset, config, Path(checkpoint_dir), progress, should_stop, resume)


def _train(dataset: Dataset, config: TrainConfig, checkpoint_dir: Path, progress: Progress | None,
           should_stop: Callable[[], bool] | None, resume: bool) -> TrainResult:
    last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
    if not resume:
        for path in (last_path, best_path):
            path.unlink(missing_ok=True)
    device = resolve_device()
    model = config.build_model().to(device)
    plan = _Plan(dataset, config, model, device)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    plan.objective.to(device)
    parameters = list(model.parameters()) + list(plan.objective.parameters())
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
    autocast_dtype, scaler = mixed_precision(device)
    start_epoch, history = 0, []
    if resume and last_path.exists():
        start_epoch, history = _resume(last_path, config, plan, model, optimizer)
        logger.info("resuming %s from epoch %d", checkpoint_dir, start_epoch)
    checkpoint_config = _checkpoint_config(config, plan)
    n_batches = plan.n_batches

    def stop_check() -> None:
        if should_stop is not None and should_stop():
            raise TrainingStopped("training was stopped")

    epoch = start_epoch
    while _stop_reason(config, history) is None:
        stop_check()
        lr = _learning_rate(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loader = plan.train_loader_for(epoch)

        def on_batch(index: int, total: int, loss: float, _epoch: int = epoch) -> None:
            if progress is not None:
                progress(_epoch + 1, config.epochs, index + 1, total, history)
            stop_check()

        started = time.perf_counter()
        train_loss = train_one_epoch(model, plan.objective, optimizer, loader, device, scaler=scaler,
                                     autocast_dtype=autocast_dtype, on_batch=on_batch)
        val_loss = plan.validate(model, device, autocast_dtype)
        seconds = time.perf_counter() - started
        best_before = _best(history)[1]
        is_best = math.isfinite(val_loss) and val_loss < best_before
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                        "seconds": round(seconds, 3), "lr": lr, "best": is_best})
        best_val = min(best_before, val_loss) if math.isfinite(val_loss) else best_before
        if is_best:
            save_checkpoint(best_path, model, optimizer, epoch + 1, checkpoint_config, best_val, history,
                            objective=plan.objective)
        save_checkpoint(last_path, model, optimizer, epoch + 1, checkpoint_config, best_val, history,
                        objective=plan.objective)
        epoch += 1
        if progress is not None:
            progress(epoch, config.epochs, n_batches, n_batches, history)

    best_epoch, best_val_loss = _best(history)
    if not best_epoch or not best_path.exists():
        raise ValueError("no epoch gave a finite validation loss, so there are no weights to keep; "
                         "try a lower learning rate")
    return TrainResult(
        best_path=best_path, last_path=last_path, history=history, best_epoch=best_epoch,
        best_val_loss=best_val_loss, seconds=sum(h["seconds"] for h in history),
        stop_reason=_stop_reason(config, history) or "completed", objective=config.objective,
        classes=plan.classes, pairs=plan.pairs, n_train=plan.n_train, n_val=plan.n_val,
        resumed_from_epoch=start_epoch, device=str(device), warnings=plan.warnings)


# --- Publishing: a model version from the best checkpoint ---------------------

def _file_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "dataset"


def create_version_from_checkpoint(config: TrainConfig, best_path: str | os.PathLike[str], dataset: Dataset,
                                   history: list[dict], training_seconds: float, *,
                                   extra_metrics: dict | None = None, notes: str = "") -> ModelVersion:
    """A new, inactive ModelVersion "<arch>-<dataset>-ft-<n>" holding the best
    checkpoint's embedding network (only: a classification head lives in the
    objective, so it is not in the file), saved under CBIR_WEIGHTS_DIR/trained/.

    Its config is the build settings, so training.inference.build_for_version
    rebuilds exactly this network (weights="random", then the saved state)."""
    checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)
    best_epoch, best_val_loss = _best(history)
    training = {
        "history": history, "best_epoch": best_epoch, "best_val_loss": best_val_loss,
        "seconds": round(float(training_seconds), 3),
        "seconds_per_epoch": round(float(training_seconds) / len(history), 3) if history else None,
        "pretrained": bool(config.pretrained), "objective": config.objective, "dataset": dataset.name,
        "config": asdict(config),
    }
    training.update(extra_metrics or {})
    return _publish(config, checkpoint["model"], f"{config.architecture}-{dataset.name}"[:90] + "-ft-",
                    ModelVersion.WeightsSource.CHECKPOINT, {"training": training},
                    notes or (f"{config.architecture} trained on {dataset.name} ({config.objective}, "
                              f"{len(history)} epoch(s), from {'pretrained' if config.pretrained else 'random'} "
                              f"weights)"))


def create_initial_version(config: TrainConfig, dataset: Dataset) -> ModelVersion:
    """A new, inactive ModelVersion "<arch>-<dataset>-init-<n>" of the very
    network a run with `config` starts from (same seed, same input size,
    pretrained or random weights), to measure what training changed."""
    model = config.build_model()
    source = ModelVersion.WeightsSource.CHECKPOINT if config.pretrained else ModelVersion.WeightsSource.RANDOM
    return _publish(config, model.state_dict(), f"{config.architecture}-{dataset.name}"[:88] + "-init-", source,
                    {"baseline": {"config": asdict(config), "pretrained": bool(config.pretrained),
                                  "dataset": dataset.name}},
                    f"the untrained starting point of {config.architecture} runs on {dataset.name} "
                    f"({'pretrained' if config.pretrained else 'random'} weights, seed {config.seed})")


def _publish(config: TrainConfig, state_dict: dict, prefix: str, source: str, metrics: dict,
             notes: str) -> ModelVersion:
    """Save the embedding network's weights under CBIR_WEIGHTS_DIR/trained/ and
    make an inactive version "<prefix><n>" (the next free n) that rebuilds it."""
    model = build_network(config.architecture, weights="random", **config.build_kwargs())
    model = apply_image_size(model, config.image_size)
    model.load_state_dict(state_dict)  # strict: proves the file rebuilds this network
    folder = Path(settings.CBIR_WEIGHTS_DIR) / "trained"
    for _attempt in range(20):
        n = ModelVersion.objects.filter(name__startswith=prefix).count() + 1
        while ModelVersion.objects.filter(name=f"{prefix}{n}").exists():
            n += 1
        name = f"{prefix}{n}"
        path = folder / f"{_file_safe(name)}.pt"
        save_atomically({"model": state_dict, "architecture": config.architecture, "config": model.config}, path)
        try:
            with transaction.atomic():
                return ModelVersion.objects.create(
                    name=name, architecture=config.architecture, config=model.config, weights_source=source,
                    weights_path=str(path.resolve()), weights_sha256=sha256_of(path), dimension=model.dimension,
                    preprocessing=model.preprocessing.to_dict(), metrics=_json_safe(metrics), notes=notes)
        except IntegrityError:  # another run took the name meanwhile: next number
            path.unlink(missing_ok=True)
    raise RuntimeError(f"could not find a free model version name starting {prefix!r}")


def _json_safe(value):
    """Plain JSON (inf/NaN become null), so the JSONField and the job page can hold it."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.loads(json.dumps(clean(value), default=str))


def evaluate_if_available(version: ModelVersion, dataset: Dataset, k: int = 10) -> dict | None:
    """Category retrieval of the new version on the dataset's labelled test
    images (training.evaluation.retrieval), saved on the version under
    metrics["evaluation"][dataset name]. None when that module does not exist;
    {"skipped": reason} when the dataset cannot be evaluated (no labels, no
    test images): that is not a failure of the training."""
    try:
        from training.evaluation import retrieval
    except ModuleNotFoundError as exc:
        if exc.name in ("training.evaluation.retrieval", "training.evaluation"):
            return None
        raise
    try:
        retrieval.check_evaluable(version, dataset)
    except retrieval.EvaluationError as exc:
        return {"skipped": str(exc)}
    result = retrieval.evaluate_version(version, dataset, k=k)
    retrieval.save_evaluation(version, result)
    return result


def evaluation_summary(evaluation: dict | None) -> dict | None:
    """The headline numbers of an evaluation, for a job's result and a command's output."""
    if evaluation is None or "skipped" in evaluation:
        return evaluation
    keys = ("k", "precision_at_k", "recall_at_k", "map_at_k", "n_queries", "against")
    return {key: evaluation.get(key) for key in keys}


def index_and_evaluate(version: ModelVersion, dataset: Dataset, *, progress=None) -> tuple[Any, dict | None]:
    """Embed the dataset with the new version (and build its HNSW index; it
    becomes active only if no version is), then evaluate it if evaluation exists."""
    from search.indexing import build_index

    report = build_index(dataset, version, **({"progress": progress} if progress else {}))
    return report, evaluate_if_available(version, dataset)


# --- The job ------------------------------------------------------------------

S = Job.Status


def checkpoint_dir_for(job_id: int) -> Path:
    """On CBIR_WEIGHTS_DIR, which every worker shares: a job re-queued onto
    another worker resumes from the same last.pt."""
    return Path(settings.CBIR_WEIGHTS_DIR) / "jobs" / str(job_id)


class _Heartbeat:
    """Keeps the job's heartbeat fresh from a thread while the task runs, so a
    long batch, validation or embedding pass is never mistaken for a dead
    worker; it dies with the process, which is exactly when recovery should act."""

    def __init__(self, job_id: int, claimed_at) -> None:
        self.job_id, self.claimed_at = job_id, claimed_at
        self.interval = max(0.5, min(30.0, settings.CBIR_JOB_STALE_SECONDS / 4))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cbir-train-heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                try:
                    Job.objects.filter(pk=self.job_id, status=S.RUNNING, started=self.claimed_at).update(
                        heartbeat=timezone.now())
                except Exception:  # noqa: BLE001 - a database hiccup: the next beat tries again
                    logger.exception("training heartbeat for job %s failed", self.job_id)
                    close_old_connections()
        finally:
            connection.close()

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def run_training_job(job_id: int) -> str:
    """Run a training job: claim it, train (resuming from its last checkpoint
    when the job was re-queued after its worker died), publish the best
    epoch as a new inactive model version, embed the dataset with it, evaluate
    it when evaluation is available, and record everything on the job row."""
    from search import jobs

    job = Job.objects.select_related("dataset").filter(pk=job_id).first()
    if job is None:
        return "gone"
    claimed_at = timezone.now()
    # The claim's timestamp marks this run: if the job is re-queued and claimed
    # by another worker, this run sees a different `started` and stops.
    if not jobs.transition(job_id, S.RUNNING, expect=[S.QUEUED], started=claimed_at):
        return "not claimed"
    jobs.add_log(job_id, f"started on {jobs.worker_name()}")

    def still_mine() -> bool:
        return Job.objects.filter(pk=job_id, status=S.RUNNING, started=claimed_at).exists()

    last_check = [0.0, True]

    def should_stop() -> bool:
        now = time.monotonic()
        if now - last_check[0] >= 0.5:  # a query per batch would slow tiny models down
            last_check[0], last_check[1] = now, still_mine()
        return not last_check[1]

    def fail(message: str) -> None:
        if jobs.transition(job_id, S.FAILED, expect=[S.RUNNING], error=message[:5000]):
            jobs.add_log(job_id, f"failed: {message}")

    try:
        with _Heartbeat(job_id, claimed_at):
            outcome = _run_training(job, jobs, should_stop)
    except TrainingStopped:
        jobs.add_log(job_id, "stopped; the last finished epoch is kept in its checkpoint")
        return "stopped"
    except Exception as exc:
        from celery.exceptions import SoftTimeLimitExceeded

        if isinstance(exc, SoftTimeLimitExceeded):
            fail(f"the task ran past CBIR_TRAIN_TIME_LIMIT ({settings.CBIR_TRAIN_TIME_LIMIT} s); the last finished "
                 f"epoch is kept, and Run again continues from it")
        else:
            fail(f"{type(exc).__name__}: {exc}")
        raise
    return outcome


def _run_training(job: Job, jobs, should_stop) -> str:
    job_id = job.pk
    dataset = job.dataset
    if dataset is None:
        raise ValueError("the job's dataset was deleted")
    config = TrainConfig.from_params(dict(job.params))
    version = ModelVersion.objects.filter(jobs__pk=job_id).first()
    summary: dict = {}
    if version is None:
        check_dataset(dataset, config)
        directory = checkpoint_dir_for(job_id)
        resuming = (directory / "last.pt").exists()
        jobs.add_log(job_id, f"{'resuming' if resuming else 'training'} {config.architecture} on {dataset.name}: "
                             f"{config.objective}, {config.epochs} epoch(s), "
                             f"{'pretrained' if config.pretrained else 'random'} initial weights")
        state = {"last_write": 0.0, "epochs": -1}

        def progress(epoch: int, n_epochs: int, batch: int, n_batches: int, history: list) -> None:
            now = time.monotonic()
            new_epoch = len(history) != state["epochs"]
            if not new_epoch and batch < n_batches and now - state["last_write"] < 1.0:
                return
            state["last_write"] = now
            done = (epoch - 1) * n_batches + batch
            message = f"epoch {epoch}/{n_epochs}, batch {batch}/{n_batches}"
            if history:
                message += f"; val loss {history[-1]['val_loss']:.4g}"
            jobs.set_progress(job_id, min(done, n_epochs * n_batches), n_epochs * n_batches, message)
            if new_epoch:
                state["epochs"] = len(history)
                Job.objects.filter(pk=job_id).update(result=_json_safe({"phase": "training", "history": history}))
                if history and history[-1]["epoch"] == epoch:
                    h = history[-1]
                    jobs.add_log(job_id, f"epoch {h['epoch']}: train loss {h['train_loss']:.4g}, "
                                         f"val loss {h['val_loss']:.4g}{' (best)' if h['best'] else ''}, "
                                         f"{h['seconds']:.1f} s")

        result = train(dataset, config, checkpoint_dir=directory, progress=progress, should_stop=should_stop)
        for warning in result.warnings[:20]:
            jobs.add_log(job_id, warning)
        summary = result.summary()
        version = create_version_from_checkpoint(
            config, result.best_path, dataset, result.history, result.seconds,
            extra_metrics={k: summary[k] for k in ("stop_reason", "pairs", "n_train", "n_val", "classes", "device")},
            notes=f"trained by job #{job_id}")
        # Recorded at once: a re-run after a crash from here on reuses this version.
        Job.objects.filter(pk=job_id).update(model_version=version,
                                             result=_json_safe({**summary, "phase": "embedding",
                                                                "version": version.name, "version_id": version.pk}))
        jobs.add_log(job_id, f"best epoch {result.best_epoch} (val loss {result.best_val_loss:.4g}, "
                             f"{result.stop_reason}); saved as model version {version.name}")
    else:
        previous = Job.objects.get(pk=job_id).result or {}
        summary = {k: v for k, v in previous.items() if k not in ("phase",)}
        summary.setdefault("history", (version.metrics or {}).get("training", {}).get("history"))
        jobs.add_log(job_id, f"model version {version.name} was already trained; embedding with it")
    if should_stop():
        raise TrainingStopped()

    def embed_progress(done: int, total: int, message: str) -> None:
        if done % 50 == 0 or done == total:
            jobs.set_progress(job_id, done, total, f"embedding {dataset.name}: {message}")

    report, evaluation = index_and_evaluate(version, dataset, progress=embed_progress)
    final = {**summary, "phase": "done", "version": version.name, "version_id": version.pk,
             "embedded": report.embedded, "embed_failed": len(report.failed)}
    if evaluation is not None:
        final["evaluation"] = evaluation_summary(evaluation)
        jobs.add_log(job_id, f"evaluation skipped: {evaluation['skipped']}" if "skipped" in evaluation else
                     f"precision@{evaluation.get('k')} on the test split: {evaluation.get('precision_at_k') or 0:.4f}")
    if not jobs.transition(job_id, S.SUCCEEDED, expect=[S.RUNNING], result=_json_safe(final),
                           message=f"trained {version.name}", progress_done=1, progress_total=1):
        return "stopped"
    jobs.add_log(job_id, f"done: {version.name}, {report.embedded} image(s) embedded"
                         + (f", {len(report.failed)} unreadable" if report.failed else ""))
    return "done"
