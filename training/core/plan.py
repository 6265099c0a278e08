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

from training.core.config import TrainConfig
from training.core.data import ImageListDataset, PairDataset, TrainingData
from training.core.inference import loader_workers
from training.core.loop import evaluate
from training.core.networks.base import EmbeddingNet
from training.core.objectives import get_objective
from training.core.samplers import PKSampler, SameShuffleSampler, group_by_label, make_augmented_pairs, make_pairs

VALIDATION_EVERY = 5  # when the val split is empty: every 5th training image validates instead

def check_train_labels(name: str, config: TrainConfig, labels: list[str | None]) -> None:
    counts = Counter(label for label in labels if label is not None)
    hint = ("label the images (import with labels from folders), or train an architecture that needs no labels "
            "(autoencoder, siamese)")
    spec = get_objective(config.objective)
    if spec.per_class and len(counts) < 2:
        raise ValueError(f"{config.architecture} ({config.objective}) learns a weight per class of the labels, but "
                         f"the train split of "
                         f"{name!r} has {len(counts)} labelled class(es); it needs at least 2: {hint}")
    if spec.plan == "pk" and sum(1 for n in counts.values() if n >= 2) < 2:
        raise ValueError(f"triplet training needs at least 2 classes with 2 or more images in the train split of "
                         f"{name!r} (it has {sum(1 for n in counts.values() if n >= 2)}): {hint}")
    if len(labels) < 2:
        raise ValueError(f"the train split of dataset {name!r} holds {len(labels)} usable image(s); training "
                         f"needs at least 2 (import more images)")
    if spec.plan == "pairs" and not pairs_from_labels(labels) and not config.augment:
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


def plan_rows(data: TrainingData, warnings: list[str]) -> tuple[list, list]:
    """(train rows, val rows) of (id, path, label), unreadable files left out (with a warning)."""
    return tuple(readable([(row.id, row.path, row.label) for row in data.split(split)], warnings)  # type: ignore[return-value]
                 for split in ("train", "val"))


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 100_003 + epoch) % (2**63 - 1)


class _Plan:
    """What both plans share: which rows train and validate (labels required
    or not, the classes fixed, a held-out share of the train rows when the val
    split has none usable), the loader settings and the objective. Every
    epoch's shuffle, pairs and augmentations depend only on (seed, epoch), so a
    resumed run repeats exactly what an uninterrupted one would have done."""

    def __init__(self, name: str, rows: tuple[list, list], config: TrainConfig, model: EmbeddingNet,
                 device: torch.device, *, world: int = 1, rank: int = 0) -> None:
        self.config = config
        self.spec = get_objective(config.objective)
        self.warnings: list[str] = []
        self.classes: list[str] | None = None
        self.pairs: str | None = None
        self.world, self.rank = world, rank
        train, val = self._select(name, list(rows[0]), list(rows[1]))
        self.n_train, self.n_val = len(train), len(val)
        self.train_items: list[tuple[str, str | None]] = [(path, label) for _, path, label in train]
        self.val_items: list[tuple[str, str | None]] = [(path, label) for _, path, label in val]
        self.preprocessing = model.preprocessing
        workers = loader_workers(device) if config.num_workers is None else config.num_workers
        self.loader_args: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda",
                                            "prefetch_factor": 2 if workers else None}
        self.generator = torch.Generator()
        self.val_generator = torch.Generator()
        self.batch = config.batch_size // world  # per process; TrainConfig checks it divides evenly
        self.val_loader: DataLoader  # each plan's own
        # The classifier's classes are fixed here (they are checked again on resume).
        self.objective: torch.nn.Module = self.spec.build(model, len(self.classes or []))

    def _select(self, name: str, train: list, val: list) -> tuple[list, list]:
        """The (id, path, label) rows that train and validate, with warnings for those left out."""
        spec, objective = self.spec, self.config.objective
        if spec.needs_labels:
            unlabelled = sum(1 for _, _, label in train if label is None)
            if unlabelled:
                self.warnings.append(f"{unlabelled} unlabelled training image(s) left out ({objective} needs labels)")
            train = [row for row in train if row[2] is not None]
        check_train_labels(name, self.config, [label for _, _, label in train])
        if spec.per_class:
            self.classes = sorted({label for _, _, label in train if label is not None})
            unseen = [row for row in val if row[2] not in self.classes]
            if unseen:
                self.warnings.append(f"{len(unseen)} validation image(s) left out: their label is unlabelled or "
                                     f"not in the train split, so the classifier cannot score them")
            val = [row for row in val if row[2] in self.classes]
        elif spec.needs_labels:
            val = [row for row in val if row[2] is not None]
        needed = 2 if spec.plan == "pairs" else 1  # a pair needs two images
        if len(val) < needed:
            val = train[VALIDATION_EVERY - 1::VALIDATION_EVERY]
            if len(val) < needed:
                val = train[-needed:]
            held = {row[0] for row in val}
            train = [row for row in train if row[0] not in held]
            self.warnings.append(f"the val split has no usable image; {len(val)} training image(s) validate instead")
            check_train_labels(name, self.config, [label for _, _, label in train])
        return train, val

    def _seed_epoch(self, epoch: int) -> int:
        seed = epoch_seed(self.config.seed, epoch)
        self.generator.manual_seed(seed)
        torch.manual_seed(seed)  # augmentations drawn in this process (num_workers=0)
        return seed

    def validate(self, model: torch.nn.Module, device: torch.device, autocast_dtype) -> float:
        """The validation loss, identical for identical weights (fixed seeds, RNG state restored)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.val_generator.manual_seed(self.config.seed)
            return evaluate(model, self.objective, self.val_loader, device, autocast_dtype=autocast_dtype)


class PairPlan(_Plan):
    """Pairs (x1, x2, same) for a "pairs" objective (contrastive): from labels
    when the train split has two labels with two or more images each, else two
    augmentations of one image; new pairs every epoch."""

    def __init__(self, name: str, rows: tuple[list, list], config: TrainConfig, model: EmbeddingNet,
                 device: torch.device, *, world: int = 1, rank: int = 0) -> None:
        super().__init__(name, rows, config, model, device, world=world, rank=rank)
        self.train_labels = [label for _, label in self.train_items]
        self.pairs = "labels" if pairs_from_labels(self.train_labels) else "augmented"
        self.n_pairs = len(self.train_items)
        self.n_batches = math.ceil(self.n_pairs / self.batch)
        val_labels = [label for _, label in self.val_items]
        n_val_pairs = max(len(self.val_items), 16)
        if self.pairs == "labels" and pairs_from_labels(val_labels):
            val_pairs, val_augment = make_pairs(val_labels, n_val_pairs, seed=config.seed), False
        else:  # too few labelled validation images: the same kind of pairs as without labels
            val_pairs = make_augmented_pairs(len(self.val_items), seed=config.seed, n_pairs=n_val_pairs)
            val_augment = True
        self.val_loader = DataLoader(PairDataset(self.val_items, val_pairs, self.preprocessing, augment=val_augment),
                                     batch_size=self.batch, shuffle=False, generator=self.val_generator,
                                     **self.loader_args)

    def train_loader_for(self, epoch: int) -> DataLoader:
        """The loader of 0-based `epoch`'s pairs, drawn from (seed, epoch)."""
        seed = self._seed_epoch(epoch)
        if self.pairs == "labels":
            pairs = make_pairs(self.train_labels, self.n_pairs, seed=seed)
        else:
            pairs = make_augmented_pairs(len(self.train_items), seed=seed, n_pairs=self.n_pairs)
        augment = self.config.augment or self.pairs == "augmented"
        pair_set = PairDataset(self.train_items, pairs, self.preprocessing, augment=augment)
        # Each process takes every world-th pair: together they cover each global batch once.
        shard: DistributedSampler | None = DistributedSampler(
            pair_set, num_replicas=self.world, rank=self.rank, shuffle=False) if self.world > 1 else None
        return DataLoader(pair_set, batch_size=self.batch, shuffle=False, sampler=shard, generator=self.generator,
                          **self.loader_args)


class LabelledPlan(_Plan):
    """(x, label) batches of images: shuffled ("images" objectives), or P
    classes × K images each ("pk", PKSampler, for triplet mining)."""

    def __init__(self, name: str, rows: tuple[list, list], config: TrainConfig, model: EmbeddingNet,
                 device: torch.device, *, world: int = 1, rank: int = 0) -> None:
        super().__init__(name, rows, config, model, device, world=world, rank=rank)
        mapping: dict[Hashable, int] | None = (
            {label: i for i, label in enumerate(self.classes)} if self.classes is not None else None)
        train_set = ImageListDataset(self.train_items, self.preprocessing, augment=bool(config.augment),
                                     label_to_index=mapping)
        val_set = ImageListDataset(self.val_items, self.preprocessing, augment=False, label_to_index=mapping)
        batch = self.batch
        self.sampler: PKSampler | None = None
        self.shard: SameShuffleSampler | None = None
        if self.spec.plan == "pk":
            k = 4 if batch >= 8 else 2
            eligible = sum(1 for indices in group_by_label(train_set.labels).values() if len(indices) >= 2)
            self.sampler = PKSampler(train_set.labels, p=max(2, min(batch // k, eligible)), k=k, seed=config.seed)
            self.train_loader = DataLoader(train_set, batch_sampler=self.sampler, generator=self.generator,
                                           **self.loader_args)
            # Batch-hard over big validation batches: every anchor finds its hardest pair among many.
            val_batch = min(max(batch, 64), 256)
        elif world == 1:
            # A last batch of one image breaks BatchNorm in training mode: drop it then.
            self.train_loader = DataLoader(train_set, batch_size=batch, shuffle=True, generator=self.generator,
                                           drop_last=len(train_set) % batch == 1, **self.loader_args)
            val_batch = batch
        else:  # each process takes every world-th image of the one-process permutation
            self.shard = SameShuffleSampler(train_set, num_replicas=world, rank=rank,
                                            seed_for_epoch=lambda epoch: epoch_seed(config.seed, epoch))
            self.train_loader = DataLoader(train_set, batch_size=batch, sampler=self.shard, generator=self.generator,
                                           drop_last=len(self.shard) % batch == 1, **self.loader_args)
            val_batch = batch
        self.val_loader = DataLoader(val_set, batch_size=val_batch, shuffle=False, generator=self.val_generator,
                                     **self.loader_args)
        self.n_batches = len(self.train_loader)

    def train_loader_for(self, epoch: int) -> DataLoader:
        """The loader of 0-based `epoch`, its randomness seeded by (seed, epoch)."""
        self._seed_epoch(epoch)
        for sampler in (self.sampler, self.shard):
            if sampler is not None:
                sampler.set_epoch(epoch)
        return self.train_loader


def DataPlan(name: str, rows: tuple[list, list], config: TrainConfig, model: EmbeddingNet,  # noqa: N802 - a factory
             device: torch.device, *, world: int = 1, rank: int = 0) -> PairPlan | LabelledPlan:
    """The plan `config`'s objective draws its batches with (its registered
    `plan`: "pairs" → PairPlan, else LabelledPlan). name: the dataset's (for
    messages); rows: (train rows, val rows) of readable (id, path, label)
    (plan_rows). world, rank: this process's place among the run's processes;
    each takes its share of every global batch (batch_size / world images)."""
    kind = PairPlan if get_objective(config.objective).plan == "pairs" else LabelledPlan
    return kind(name, rows, config, model, device, world=world, rank=rank)
