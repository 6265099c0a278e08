"""The one reader of image rows for training: a Dataset's rows as the ML
core's plain `TrainingData` (training.core.data), and the checks that need
only the rows.

The trainer, the data plan, head training and the distributed ranks take
these rows, so the core (training/core/) never queries the database."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings

from search.models import Dataset, Feedback, Image, Split
from training.core.config import TrainConfig
from training.core.data import ImageRow, TrainingData
from training.core.plan import check_train_labels


def training_data(dataset: Dataset, *, marks: bool = False) -> TrainingData:
    """The dataset's train and val images (the test split is left for
    evaluation) as (id, absolute path under MEDIA_ROOT, label or None, split,
    sha256) rows, in id order. One query; with `marks`, a second reads the
    relevance marks among them (marks_among)."""
    media = Path(settings.MEDIA_ROOT)
    rows = (Image.objects.filter(dataset=dataset, split__in=(Split.TRAIN, Split.VAL)).order_by("pk")
            .values_list("pk", "file", "label", "split", "sha256"))
    return TrainingData(dataset.name, tuple(ImageRow(pk, str(media / name), label or None, split, sha)
                                            for pk, name, label, split, sha in rows),
                        marks=marks_among(dataset, (Split.TRAIN, Split.VAL)) if marks else ())


def marks_among(dataset: Dataset, splits) -> tuple[tuple[int, int, bool], ...]:
    """Relevance marks (query image id, result image id, right?) whose query is
    an indexed image of `dataset` in one of `splits` and whose result is in
    `dataset`, from any model version and person, in id order. Marks on
    uploads are left out: the backbone's features of an upload are not known."""
    rows = (Feedback.objects.filter(query_image__dataset=dataset, query_image__split__in=list(splits),
                                    result__dataset=dataset).order_by("pk")
            .values_list("query_image_id", "result_id", "verdict"))
    return tuple((q, r, verdict == Feedback.Verdict.RIGHT) for q, r, verdict in rows)


def check_dataset(dataset: Dataset, config: TrainConfig) -> None:
    """ValueError when the dataset's train split cannot train `config`'s objective
    (counted from the rows; unreadable files are only found when training)."""
    if config.marks != "none":
        marks = [m for m in marks_among(dataset, (Split.TRAIN,))]
        if not marks or len({right for _, _, right in marks}) < 2:
            raise ValueError(f"dataset {dataset.name!r} has {len(marks)} relevance mark(s) on train-split queries"
                             f"{' all of one verdict' if marks else ''}: training on marks needs right and wrong "
                             "ones (mark results on the results pages or POST /api/feedback)")
        if config.marks == "only":
            return
    labels = list(Image.objects.filter(dataset=dataset, split=Split.TRAIN).values_list("label", flat=True))
    check_train_labels(dataset.name, config, [label or None for label in labels])
