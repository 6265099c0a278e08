"""Which images go into a training batch.

- PKSampler: batches of P classes x K images, for triplet losses.
- make_pairs: labelled (i, j, same) pairs for contrastive losses.
- make_augmented_pairs: the same for unlabelled images: a positive pair is
  one image with itself, which PairDataset must augment twice (augment=True)
  so the two views differ; a negative pair is two different images.

Everything is deterministic for a given seed (and epoch); unlabelled items
(label None or -1) are left out of label-based sampling.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler


def _is_unlabelled(label: Hashable) -> bool:
    return label is None or (isinstance(label, (int, np.integer)) and label == -1)


def group_by_label(labels: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """label -> indices holding it, in first-seen order; unlabelled items are skipped."""
    groups: dict[Hashable, list[int]] = {}
    for index, label in enumerate(labels):
        if not _is_unlabelled(label):
            groups.setdefault(label, []).append(index)
    return groups


class PKSampler(Sampler[list[int]]):
    """A batch sampler yielding lists of P*K dataset indices: P distinct classes, K images each.

    Use as DataLoader(dataset, batch_sampler=PKSampler(...)).

    - Classes with a single image are skipped: they cannot give a positive pair.
    - A class with fewer than K images contributes all of them plus repeats
      drawn at random (sampling with replacement only for the shortfall).
    - Classes are visited in a shuffled order, P at a time, reshuffling when
      the order is used up, so every class appears about equally often.
    - An epoch is `batches_per_epoch` batches (default: the number of
      eligible images // (P*K), at least 1).
    - The batches depend only on (seed, epoch); call set_epoch(e) before
      each epoch to get different ones.
    """

    def __init__(self, labels: Sequence[Hashable], p: int, k: int, seed: int = 0,
                 batches_per_epoch: int | None = None) -> None:
        if p < 2 or k < 2:
            raise ValueError(f"a P x K batch needs P >= 2 classes and K >= 2 images per class, got P={p}, K={k}")
        groups = group_by_label(labels)
        self.classes = [indices for indices in groups.values() if len(indices) >= 2]
        if len(self.classes) < p:
            raise ValueError(
                f"P={p} classes per batch, but only {len(self.classes)} classes have at least two images"
            )
        self.p, self.k, self.seed, self.epoch = int(p), int(k), int(seed), 0
        eligible = sum(len(indices) for indices in self.classes)
        self.batches_per_epoch = int(batches_per_epoch) if batches_per_epoch else max(1, eligible // (p * k))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order: list[int] = []
        for _ in range(self.batches_per_epoch):
            if len(order) < self.p:
                # Refill without repeating a class already left in `order`, so a batch's P classes stay distinct.
                left = set(order)
                order += [c for c in rng.permutation(len(self.classes)).tolist() if c not in left]
            chosen, order = order[: self.p], order[self.p:]
            batch: list[int] = []
            for class_index in chosen:
                indices = self.classes[class_index]
                if len(indices) >= self.k:
                    picked = rng.choice(indices, size=self.k, replace=False)
                else:
                    extra = rng.choice(indices, size=self.k - len(indices), replace=True)
                    picked = np.concatenate([rng.permutation(indices), extra])
                batch += [int(i) for i in picked]
            yield batch


def make_pairs(labels: Sequence[Hashable], n_pairs: int, seed: int = 0,
               positive_fraction: float = 0.5) -> list[tuple[int, int, bool]]:
    """`n_pairs` (i, j, same) index pairs from labelled items, shuffled.

    round(n_pairs * positive_fraction) are positive: two different images of
    one class (the class drawn uniformly among classes with >= 2 images, so
    big classes do not dominate). The rest are negative: one image from each of
    two different classes (classes drawn uniformly). Pairs may repeat.
    """
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must lie in [0, 1], not {positive_fraction}")
    groups = list(group_by_label(labels).values())
    n_positive = round(n_pairs * positive_fraction)
    n_negative = n_pairs - n_positive
    multi = [indices for indices in groups if len(indices) >= 2]
    if n_positive and not multi:
        raise ValueError("positive pairs need a class with at least two images")
    if n_negative and len(groups) < 2:
        raise ValueError("negative pairs need at least two classes")
    rng = np.random.default_rng(seed)
    pairs: list[tuple[int, int, bool]] = []
    for _ in range(n_positive):
        indices = multi[rng.integers(len(multi))]
        i, j = rng.choice(len(indices), size=2, replace=False)
        pairs.append((indices[i], indices[j], True))
    for _ in range(n_negative):
        a, b = rng.choice(len(groups), size=2, replace=False)
        pairs.append((groups[a][rng.integers(len(groups[a]))], groups[b][rng.integers(len(groups[b]))], False))
    return [pairs[i] for i in rng.permutation(len(pairs))]


def make_augmented_pairs(n: int, seed: int = 0, n_pairs: int | None = None,
                         positive_fraction: float = 0.5) -> list[tuple[int, int, bool]]:
    """`n_pairs` (default n) (i, j, same) pairs over n unlabelled images, shuffled.

    Positive pairs are (i, i, True): PairDataset(augment=True) turns them into
    two random views of the same image. Negative pairs are (i, j, False) with
    i != j: two different images are assumed to show different things (the
    usual assumption without labels; wrong only for near-duplicates).
    """
    if n < 2:
        raise ValueError(f"pairs need at least two images, got {n}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must lie in [0, 1], not {positive_fraction}")
    n_pairs = n if n_pairs is None else int(n_pairs)
    n_positive = round(n_pairs * positive_fraction)
    rng = np.random.default_rng(seed)
    pairs = [(int(i), int(i), True) for i in rng.integers(n, size=n_positive)]
    for _ in range(n_pairs - n_positive):
        i, j = rng.choice(n, size=2, replace=False)
        pairs.append((int(i), int(j), False))
    return [pairs[i] for i in rng.permutation(len(pairs))]


class SameShuffleSampler(DistributedSampler):
    """A DistributedSampler (num_replicas processes, this one `rank`) whose
    epoch permutation is exactly the one a single-process
    DataLoader(dataset, shuffle=True, generator=g) draws after
    g.manual_seed(seed_for_epoch(epoch)): the DataLoader first draws its base
    seed (one int64) from g, then RandomSampler draws torch.randperm(n, generator=g).
    Each process takes every num_replicas-th index of it (padded by repeating
    the first ones, as DistributedSampler does), so N processes with batches
    of B/N images see the same global batches as one process with batches of B.
    (tests/test_distributed_training.py checks the equality end to end.)"""

    def __init__(self, dataset, num_replicas: int, rank: int, seed_for_epoch) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, drop_last=False)
        self.seed_for_epoch = seed_for_epoch

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed_for_epoch(self.epoch))
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's base seed
        indices = torch.randperm(len(self.dataset), generator=generator).tolist()
        padding = self.total_size - len(indices)
        indices += (indices * math.ceil(padding / len(indices)))[:padding] if padding > 0 else []
        return iter(indices[self.rank:self.total_size:self.num_replicas])
