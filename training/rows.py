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

TRAIN_SPLITS = (Split.TRAIN, Split.VAL)


def training_data(dataset: Dataset, *, marks: bool = False, marks_from: str = "everyone") -> TrainingData:
    """The dataset's train and val images (the test split is left for
    evaluation) as (id, absolute path under MEDIA_ROOT, label or None, split,
    sha256) rows, in id order. One query; with `marks`, more read the
    relevance marks among them (marks_among; `marks_from` "signed-in" leaves
    anonymous sessions' marks out) and count them by source."""
    media = Path(settings.MEDIA_ROOT)
    rows = (Image.objects.filter(dataset=dataset, split__in=(Split.TRAIN, Split.VAL)).order_by("pk")
            .values_list("pk", "file", "label", "split", "sha256"))
    return TrainingData(dataset.name, tuple(ImageRow(pk, str(media / name), label or None, split, sha)
                                            for pk, name, label, split, sha in rows),
                        marks=marks_among(dataset, TRAIN_SPLITS, result_splits=TRAIN_SPLITS,
                                          signed_in_only=marks_from == "signed-in") if marks else (),
                        mark_sources=mark_sources(dataset, TRAIN_SPLITS, marks_from) if marks else None)


def _marks(dataset: Dataset, splits, result_splits=None, *, signed_in_only: bool = False):
    rows = Feedback.objects.filter(query_image__dataset=dataset, query_image__split__in=list(splits),
                                   result__dataset=dataset)
    if result_splits is not None:
        rows = rows.filter(result__split__in=list(result_splits))
    return rows.filter(user__isnull=False) if signed_in_only else rows


def marks_among(dataset: Dataset, splits, *, result_splits=None,
                signed_in_only: bool = False) -> tuple[tuple[int, int, bool], ...]:
    """Relevance marks (query image id, result image id, right?) whose query is
    an indexed image of `dataset` in one of `splits` and whose result is in
    `dataset` (and in one of `result_splits`, when given), from any model
    version, by anyone (anonymous sessions too) or, with `signed_in_only`, by
    signed-in users and API tokens' owners only, in id order. Marks on uploads
    are left out: the backbone's features of an upload are not known."""
    rows = (_marks(dataset, splits, result_splits, signed_in_only=signed_in_only).order_by("pk")
            .values_list("query_image_id", "result_id", "verdict"))
    return tuple((q, r, verdict == Feedback.Verdict.RIGHT) for q, r, verdict in rows)


def mark_sources(dataset: Dataset, splits, marks_from: str = "everyone") -> dict[str, int]:
    """How many marks training could read (queries in `splits`, results in the
    train and val splits) came from signed-in users and from anonymous
    sessions, and how many anonymous ones `marks_from` "signed-in" leaves out."""
    rows = _marks(dataset, splits, TRAIN_SPLITS)
    signed_in = rows.filter(user__isnull=False).count()
    anonymous = rows.filter(user__isnull=True).count()
    return {"signed_in": signed_in, "anonymous": anonymous,
            "anonymous_left_out": anonymous if marks_from == "signed-in" else 0}


def check_dataset(dataset: Dataset, config: TrainConfig) -> None:
    """ValueError when the dataset's train split cannot train `config`'s objective
    (counted from the rows; unreadable files are only found when training)."""
    if config.marks != "none":
        # The marks training will use: train-split queries, results in train or val (test images are held out),
        # and, with marks_from signed-in, only signed-in users' marks.
        signed_in = config.marks_from == "signed-in"
        marks = list(marks_among(dataset, (Split.TRAIN,), result_splits=TRAIN_SPLITS, signed_in_only=signed_in))
        if not marks or len({right for _, _, right in marks}) < 2:
            whose = " by signed-in users" if signed_in else ""
            raise ValueError(f"dataset {dataset.name!r} has {len(marks)} relevance mark(s){whose} on train-split "
                             f"queries with train or val results{' all of one verdict' if marks else ''}: training "
                             "on marks needs right and wrong ones (mark results on the results pages or POST "
                             "/api/feedback)")
        if config.marks == "only":
            return
    labels = list(Image.objects.filter(dataset=dataset, split=Split.TRAIN).values_list("label", flat=True))
    check_train_labels(dataset.name, config, [label or None for label in labels])
