"""The training pipeline, written once: train → publish → embed → evaluate.

    outcome = train_and_publish(dataset, config, checkpoint_dir=path, notes="...")

`manage.py train` (training/management/commands/train.py) and the "train"
job (training/train_job.py) both call it; each passes only its progress
callbacks (a terminal bar, or the job row) and its stop check.

Steps:
1. the rows the ML core trains on (training/rows.py), checked against the objective;
2. training.core.trainer.train (resumable from checkpoint_dir/last.pt);
3. the best epoch published as a new inactive model version (training/versions.py);
4. the dataset embedded with it and its index finished (search.indexing.build_index,
   whose finish is search.indexing.finish_index: indexes, calibration, activation
   only when no version is active, near-duplicates);
5. category retrieval evaluated on the labelled test split when it can be
   (training/evaluation/retrieval.py), saved on the version.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.indexing import EmbedReport, build_index
from search.models import Dataset
from training.core.config import TrainConfig
from training.core.runs import Progress, TrainResult
from training.core.trainer import train
from training.models import ModelVersion
from training.rows import check_dataset, training_data
from training.versions import create_version_from_checkpoint

# The training summary's entries kept on the published version's metrics["training"].
SUMMARY_METRICS = ("stop_reason", "pairs", "n_train", "n_val", "classes", "device", "precision", "features")


@dataclass
class Outcome:
    """What train_and_publish did. result: None when an already published
    `version` was passed (a re-run of a job after its worker died)."""

    version: ModelVersion
    result: TrainResult | None
    report: EmbedReport
    evaluation: dict | None


def train_and_publish(dataset: Dataset, config: TrainConfig, *, checkpoint_dir: Path, notes: str,
                      version: ModelVersion | None = None, progress: Progress | None = None,
                      should_stop: Callable[[], bool] | None = None,
                      on_features: Callable[[int, int], None] | None = None,
                      on_published: Callable[[ModelVersion, TrainResult], None] | None = None,
                      before_embedding: Callable[[], None] | None = None,
                      embed_progress: Callable[[int, int, str], None] | None = None) -> Outcome:
    """Train `config` on the dataset, publish the best epoch, embed the dataset
    with it, evaluate it.

    version: an already published version of this run: training is skipped
    and only embedding and evaluation run. progress, should_stop, on_features:
    training.core.trainer.train's. on_published(version, result) is called as
    soon as the version exists (a job records it on its row), and
    before_embedding() before the embedding starts (a job's stop check).

    Raises ValueError (a dataset the objective cannot train on, no finite
    validation loss), WeightsUnavailable, training.core.runs.TrainingStopped
    (should_stop said so; the last finished epoch stays in checkpoint_dir)."""
    result = None
    if version is None:
        check_dataset(dataset, config)
        data = training_data(dataset, marks=config.marks != "none", marks_from=config.marks_from)
        result = train(data, config, checkpoint_dir=checkpoint_dir, progress=progress,
                       should_stop=should_stop, on_features=on_features)
        summary = result.summary()
        version = create_version_from_checkpoint(
            config, result.best_path, dataset, result.history, result.seconds,
            extra_metrics={key: summary[key] for key in SUMMARY_METRICS}, notes=notes)
        if on_published is not None:
            on_published(version, result)
    if before_embedding is not None:
        before_embedding()
    report, evaluation = index_and_evaluate(version, dataset, progress=embed_progress)
    return Outcome(version, result, report, evaluation)


def index_and_evaluate(version: ModelVersion, dataset: Dataset, *, progress=None) -> tuple[EmbedReport, dict | None]:
    """Embed the dataset with `version` (and finish its HNSW index; it becomes
    active only if no version is), then evaluate it (evaluate_if_available)."""
    report = build_index(dataset, version, **({"progress": progress} if progress else {}))
    return report, evaluate_if_available(version, dataset)


def evaluate_if_available(version: ModelVersion, dataset: Dataset, k: int = 10) -> dict | None:
    """Category retrieval of the version on the dataset's labelled test images
    (training.evaluation.retrieval), saved on the version under
    metrics["evaluation"][dataset name]. {"skipped": reason} when the dataset
    cannot be evaluated (no labels, no test images): that is not a failure of
    the training."""
    from training.evaluation import retrieval

    try:
        retrieval.check_evaluable(version, dataset)
    except retrieval.EvaluationError as exc:
        return {"skipped": str(exc)}
    result = retrieval.evaluate_version(version, dataset, k=k)
    retrieval.save_evaluation(version, result)
    return result


def evaluation_summary(evaluation: dict | None) -> dict[str, Any] | None:
    """The headline numbers of an evaluation, for a job's result and a command's output."""
    if evaluation is None or "skipped" in evaluation:
        return evaluation
    keys = ("k", "precision_at_k", "recall_at_k", "map_at_k", "n_queries", "against")
    return {key: evaluation.get(key) for key in keys}
