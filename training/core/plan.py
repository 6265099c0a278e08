"""The data plan of a training run: which images train and validate (the
dataset's train and val splits), whether the objective can train on them,
and the loaders and objective for every epoch."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable
from typing import Any

import torch
from PIL import Image as PILImage
from torch.utils.data import DataLoader, DistributedSampler

from training.core.config import LABELLED_OBJECTIVES, TrainConfig
from training.core.data import ImageListDataset, PairDataset, TrainingData
from training.core.inference import loader_workers
from training.core.loop import evaluate
from training.core.networks.base import CLASS_OBJECTIVES, EmbeddingNet
from training.core.objectives import (
    METRIC_LOSSES,
    ClassificationObjective,
    ContrastiveObjective,
    MetricLossObjective,
    ReconstructionObjective,
    TripletObjective,
)
from training.core.samplers import PKSampler, SameShuffleSampler, group_by_label, make_augmented_pairs, make_pairs

VALIDATION_EVERY = 5  # when the val split is empty: every 5th training image validates instead

def check_train_labels(name: str, config: TrainConfig, labels: list[str | None]) -> None:
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
    if config.objective == "contrastive" and not pairs_from_labels(labels) and not config.augment:
        raise ValueError(f"the train split of {name!r} has too few labels for labelled pairs, so positive pairs "
                         f"are two augmentations of one image: turn augmentation on, or label the images")


def pairs_from_labels(labels: list) -> bool:
    """Labelled pairs need at least two labels with two or more images each."""
    groups = group_by_label(labels)
    return sum(1 for indices in groups.values() if len(indices) >= 2) >= 2


def readable(items: list[tuple[int, str, str | None]], warnings: list[str]) -> list[tuple[int, str, str | None]]:
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


def class_objective(objective: str, model: torch.nn.Module, num_classes: int) -> torch.nn.Module:
    """The objective module for a labelled objective on `model` (which has a
    `.dimension`): classification (our cosine classifier), a
    pytorch-metric-learning loss (normalized_softmax, arcface, proxy_anchor),
    or triplet."""
    if objective == "classification":
        return ClassificationObjective(model, num_classes=num_classes)  # type: ignore[arg-type]
    if objective in METRIC_LOSSES:
        return MetricLossObjective(objective, num_classes, int(model.dimension))  # type: ignore[arg-type]
    if objective == "triplet":
        return TripletObjective()
    raise ValueError(f"{objective} is not a labelled objective")


def plan_rows(data: TrainingData, warnings: list[str]) -> tuple[list, list]:
    """(train rows, val rows) of (id, path, label), unreadable files left out (with a warning)."""
    return tuple(readable([(row.id, row.path, row.label) for row in data.split(split)], warnings)  # type: ignore[return-value]
                 for split in ("train", "val"))


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 100_003 + epoch) % (2**63 - 1)


class DataPlan:
    """Datasets, loaders and the objective for one run. Every epoch's shuffle,
    pairs and augmentations depend only on (seed, epoch), so a resumed run
    repeats exactly what an uninterrupted one would have done."""

    def __init__(self, name: str, rows: tuple[list, list], config: TrainConfig, model: EmbeddingNet,
                 device: torch.device, *, world: int = 1, rank: int = 0) -> None:
        """name: the dataset's (for messages); rows: (train rows, val rows) of
        readable (id, path, label) (plan_rows). world, rank: this process's
        place among the run's processes; each takes its share of every global
        batch (batch_size / world images) through a DistributedSampler."""
        self.config = config
        self.warnings: list[str] = []
        self.classes: list[str] | None = None
        self.pairs: str | None = None
        self.world, self.rank = world, rank
        self.samplers: list[SameShuffleSampler] = []
        train, val = list(rows[0]), list(rows[1])
        objective = config.objective
        if objective in LABELLED_OBJECTIVES:
            unlabelled = sum(1 for _, _, label in train if label is None)
            if unlabelled:
                self.warnings.append(f"{unlabelled} unlabelled training image(s) left out ({objective} needs labels)")
            train = [row for row in train if row[2] is not None]
        check_train_labels(name, config, [label for _, _, label in train])
        if objective in CLASS_OBJECTIVES:
            self.classes = sorted({label for _, _, label in train if label is not None})
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
            check_train_labels(name, config, [label for _, _, label in train])
        self.n_train, self.n_val = len(train), len(val)
        train_items: list[tuple[str, str | None]] = [(path, label) for _, path, label in train]
        val_items: list[tuple[str, str | None]] = [(path, label) for _, path, label in val]

        preprocessing = model.preprocessing
        workers = loader_workers(device) if config.num_workers is None else config.num_workers
        self.loader_args: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda",
                            "prefetch_factor": 2 if workers else None}
        self.generator = torch.Generator()
        self.val_generator = torch.Generator()
        batch = config.batch_size // world  # per process; TrainConfig checks it divides evenly

        if objective == "contrastive":
            self.objective: torch.nn.Module = ContrastiveObjective()
            train_labels = [label for _, label in train_items]
            self.pairs = "labels" if pairs_from_labels(train_labels) else "augmented"
            self._train_items, self._train_labels = train_items, train_labels
            self.n_pairs = len(train_items)
            self.n_batches = math.ceil(self.n_pairs / batch)
            val_labels = [label for _, label in val_items]
            if self.pairs == "labels" and pairs_from_labels(val_labels):
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
        mapping: dict[Hashable, int] | None = (
            {label: i for i, label in enumerate(self.classes)} if self.classes is not None else None)
        train_set = ImageListDataset(train_items, preprocessing, augment=bool(config.augment), label_to_index=mapping)
        val_set = ImageListDataset(val_items, preprocessing, augment=False, label_to_index=mapping)
        if objective == "triplet":
            self.objective = TripletObjective()
            k = 4 if batch >= 8 else 2
            eligible = sum(1 for indices in group_by_label(train_set.labels).values() if len(indices) >= 2)
            p = max(2, min(batch // k, eligible))
            self.sampler: PKSampler | None = PKSampler(train_set.labels, p=p, k=k, seed=config.seed)
            self.train_loader = DataLoader(train_set, batch_sampler=self.sampler, generator=self.generator,
                                           **self.loader_args)
            # Batch-hard over big validation batches: every anchor finds its hardest pair among many.
            val_batch = min(max(batch, 64), 256)
        else:
            self.sampler = None
            if objective in CLASS_OBJECTIVES:
                self.objective = class_objective(objective, model, len(self.classes or []))
            else:
                self.objective = ReconstructionObjective()
            # A last batch of one image breaks BatchNorm in training mode: drop it then.
            if world == 1:
                self.train_loader = DataLoader(train_set, batch_size=batch, shuffle=True, generator=self.generator,
                                               drop_last=len(train_set) % batch == 1, **self.loader_args)
            else:  # each process takes every world-th image of the one-process permutation
                shard = SameShuffleSampler(train_set, num_replicas=world, rank=rank,
                                           seed_for_epoch=lambda epoch: epoch_seed(config.seed, epoch))
                self.samplers.append(shard)
                self.train_loader = DataLoader(train_set, batch_size=batch, sampler=shard, generator=self.generator,
                                               drop_last=len(shard) % batch == 1, **self.loader_args)
            val_batch = batch
        self.val_loader = DataLoader(val_set, batch_size=val_batch, shuffle=False, generator=self.val_generator,
                                     **self.loader_args)
        self.n_batches = len(self.train_loader)

    def train_loader_for(self, epoch: int) -> DataLoader:
        """The loader for 0-based `epoch`, its randomness seeded by (seed, epoch)."""
        seed = epoch_seed(self.config.seed, epoch)
        self.generator.manual_seed(seed)
        torch.manual_seed(seed)  # augmentations drawn in this process (num_workers=0)
        if self.config.objective != "contrastive":
            if self.sampler is not None:
                self.sampler.set_epoch(epoch)
            for shard in self.samplers:
                shard.set_epoch(epoch)
            return self.train_loader
        if self.pairs == "labels":
            pairs = make_pairs(self._train_labels, self.n_pairs, seed=seed)
        else:
            pairs = make_augmented_pairs(len(self._train_items), seed=seed, n_pairs=self.n_pairs)
        augment = self.config.augment or self.pairs == "augmented"
        pair_set = PairDataset(self._train_items, pairs, self._preprocessing, augment=augment)
        # Each process takes every world-th pair: together they cover each global batch once.
        pair_shard: DistributedSampler | None = DistributedSampler(pair_set, num_replicas=self.world, rank=self.rank, shuffle=False) \
            if self.world > 1 else None
        return DataLoader(pair_set, batch_size=self.config.batch_size // self.world, shuffle=False, sampler=pair_shard,
                          generator=self.generator, **self.loader_args)

    def validate(self, model: torch.nn.Module, device: torch.device, autocast_dtype) -> float:
        """The validation loss, identical for identical weights (fixed seeds, RNG state restored)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.val_generator.manual_seed(self.config.seed)
            return evaluate(model, self.objective, self.val_loader, device, autocast_dtype=autocast_dtype)


