"""Training datasets over image files on disk.

Images are read with `training.core.preprocessing.load_rgb` and turned into tensors
with the model's own `Preprocessing`, exactly as at indexing and query time;
training augmentation works on the PIL image before that step.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from training.core.preprocessing import Preprocessing, load_rgb

Item = tuple[str | PathLike[str], Hashable | None]  # (path, label or None)


class ImageRow(NamedTuple):
    """One image of a training run, as the core sees it (no database row):
    id (the image's primary key), path (absolute file path), label (None when
    unlabelled), split ("train", "val" or "test"), sha256 (content hash, hex).
    training/rows.py builds them from a dataset's rows."""

    id: int
    path: str
    label: str | None
    split: str
    sha256: str


@dataclass(frozen=True)
class TrainingData:
    """A dataset's images for a training run: its name (for messages), its
    rows of the train and val splits, in id order, and relevance marks on them."""

    name: str
    rows: tuple[ImageRow, ...]
    # Relevance marks (query image id, result image id, right?) among these
    # rows, for head training on marks (TrainConfig.marks).
    marks: tuple[tuple[int, int, bool], ...] = ()
    # How many of those marks came from signed-in users and from anonymous
    # sessions, and whether the anonymous ones were left out (TrainConfig.marks_from).
    mark_sources: dict[str, int] | None = None

    def split(self, split: str) -> list[ImageRow]:
        return [row for row in self.rows if row.split == split]


class UnreadableImage(RuntimeError):
    """An image file could not be decoded; the message names the file."""


def build_augmentation(preprocessing: Preprocessing) -> Callable[[Image.Image], Image.Image]:
    """Random training views of an RGB PIL image, returned as a PIL image of
    preprocessing.size x preprocessing.size (then fed to preprocessing.to_tensor):
    random resized crop (50-100 % of the area), horizontal flip, colour jitter."""
    return v2.Compose([
        v2.RandomResizedCrop(preprocessing.size, scale=(0.5, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        # Jittering an RGB image before a grayscale model's conversion still varies its brightness and contrast.
        v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05),
    ])


def read_image(path: str | PathLike[str], draft_size: int | None = None) -> Image.Image:
    """load_rgb, with any decoding failure turned into UnreadableImage naming the file."""
    try:
        return load_rgb(path, draft_size=draft_size)
    except Exception as exc:  # PIL raises many types (OSError, ValueError, SyntaxError, DecompressionBombError)
        raise UnreadableImage(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


class _ImageLoader:
    """Shared by both datasets: path -> (C, size, size) tensor, optionally augmented."""

    def __init__(self, preprocessing: Preprocessing, augment: bool) -> None:
        self.preprocessing = preprocessing
        self.augment = build_augmentation(preprocessing) if augment else None

    def load(self, path: str | PathLike[str]) -> torch.Tensor:
        image = read_image(path, draft_size=self.preprocessing.size)
        if self.augment is not None:
            image = self.augment(image)
        return self.preprocessing.to_tensor(image)


def index_labels(labels: Sequence[Hashable | None]) -> dict[Hashable, int]:
    """Label -> class index 0..C-1, in sorted order of the labels' text (stable across runs)."""
    return {label: i for i, label in enumerate(sorted({label for label in labels if label is not None}, key=str))}


class ImageListDataset(Dataset):
    """items: (path, label or None). Yields (image (C, size, size), class index or -1 when unlabelled).

    label_to_index defaults to index_labels() over the items; give the training
    set's mapping to the validation set so both use the same indices.
    `.labels` holds every item's class index (-1 when unlabelled), for PKSampler.
    """

    def __init__(self, items: Sequence[Item], preprocessing: Preprocessing, augment: bool = False,
                 label_to_index: dict[Hashable, int] | None = None) -> None:
        self.items = list(items)
        self.label_to_index = index_labels([label for _, label in self.items]) if label_to_index is None \
            else dict(label_to_index)
        unknown = {label for _, label in self.items if label is not None and label not in self.label_to_index}
        if unknown:
            raise ValueError(f"labels missing from label_to_index: {sorted(map(str, unknown))[:10]}")
        self.labels = [-1 if label is None else self.label_to_index[label] for _, label in self.items]
        self.loader = _ImageLoader(preprocessing, augment)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.loader.load(self.items[index][0]), self.labels[index]


class PairDataset(Dataset):
    """Pairs over base_items (paths; labels unused). pairs: (i, j, same) as
    samplers.make_pairs / make_augmented_pairs give. Yields
    (x1 (C, size, size), x2 (C, size, size), same: float32 scalar tensor, 1.0 or 0.0)."""

    def __init__(self, base_items: Sequence[Item | str | PathLike[str]], pairs: Sequence[tuple[int, int, bool]],
                 preprocessing: Preprocessing, augment: bool = False) -> None:
        self.paths = [item[0] if isinstance(item, tuple) else item for item in base_items]
        self.pairs = [(int(i), int(j), bool(same)) for i, j, same in pairs]
        if not augment and any(i == j for i, j, _ in self.pairs):
            # Without augmentation the two views would be identical and teach nothing.
            raise ValueError("pairs of an image with itself need augment=True")
        bad = [p for p in self.pairs if not (0 <= p[0] < len(self.paths) and 0 <= p[1] < len(self.paths))]
        if bad:
            raise ValueError(f"pair indices out of range for {len(self.paths)} images: {bad[:5]}")
        self.loader = _ImageLoader(preprocessing, augment)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i, j, same = self.pairs[index]
        return self.loader.load(self.paths[i]), self.loader.load(self.paths[j]), torch.tensor(float(same))

