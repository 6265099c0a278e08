"""The one reader of image rows for training: a Dataset's rows as the ML
core's plain `TrainingData` (training.core.data), and the checks that need
only the rows.

The trainer, the data plan, head training and the distributed ranks take
these rows, so the core (training/core/) never queries the database."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings

from search.models import Dataset, Image, Split
from training.core.config import TrainConfig
from training.core.data import ImageRow, TrainingData
from training.core.plan import check_train_labels


def training_data(dataset: Dataset) -> TrainingData:
    """The dataset's train and val images (the test split is left for
    evaluation) as (id, absolute path under MEDIA_ROOT, label or None, split,
    sha256) rows, in id order. One query."""
    media = Path(settings.MEDIA_ROOT)
    rows = (Image.objects.filter(dataset=dataset, split__in=(Split.TRAIN, Split.VAL)).order_by("pk")
            .values_list("pk", "file", "label", "split", "sha256"))
    return TrainingData(dataset.name, tuple(ImageRow(pk, str(media / name), label or None, split, sha)
                                            for pk, name, label, split, sha in rows))


def check_dataset(dataset: Dataset, config: TrainConfig) -> None:
    """ValueError when the dataset's train split cannot train `config`'s objective
    (counted from the rows; unreadable files are only found when training)."""
    labels = list(Image.objects.filter(dataset=dataset, split=Split.TRAIN).values_list("label", flat=True))
    check_train_labels(dataset.name, config, [label or None for label in labels])
