"""The "train" job kind: train a network on a dataset on a worker of the
"train" queue, publish the best epoch as a model version, embed the dataset
with it and evaluate it. Registered in TrainingConfig.ready().

The job row holds the run's settings (a validated TrainConfig, as a dict).
Re-queued after its worker died, a job resumes from its last checkpoint; once
its version is published, a re-run only embeds and evaluates."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from django.conf import settings
from django.db import transaction

from search import jobs, runner
from search.models import Dataset, Job
from training.core.config import TrainConfig, check_pretrained_available
from training.core.runs import TrainingStopped, epoch_summary
from training.models import ModelVersion
from training.pipeline import evaluation_summary, train_and_publish
from training.rows import check_dataset
from training.versions import json_safe

KIND = "train"


@transaction.atomic
def start_training_job(dataset: Dataset, *, user=None, check: bool = True, **config_fields) -> Job:
    """Validate the settings against the dataset, then queue a training job.

    Raises ValueError (bad settings, or a dataset the objective cannot train
    on), WeightsUnavailable (pretrained weights missing on an offline site) or
    search.jobs.JobsUnavailable (no broker or no "train" worker, when `check`),
    before any row is created."""
    config = TrainConfig.from_params(config_fields)
    check_dataset(dataset, config)
    check_pretrained_available(config)
    if check:
        jobs.check_workers_for(KIND)
    return jobs.create(
        KIND, dataset=dataset, user=user, params=asdict(config),
        log=(f"queued: train {config.architecture} on {dataset.name} ({config.objective}, "
             f"{config.epochs} epoch(s), batch {config.batch_size}, lr {config.learning_rate:g}, "
             f"{'pretrained' if config.pretrained else 'random'} initial weights"
             f"{f', {config.image_size} px' if config.image_size else ''})"))


def checkpoint_dir_for(job_id: int) -> Path:
    """On CBIR_WEIGHTS_DIR, which every worker shares: a job re-queued onto
    another worker resumes from the same last.pt."""
    return Path(settings.CBIR_WEIGHTS_DIR) / "jobs" / str(job_id)


def run_training_job(job_id: int) -> str:
    """Run a training job (the run_training task): claim it, train (resuming
    from its last checkpoint when the job was re-queued after its worker
    died), publish the best epoch as a new inactive model version, embed the
    dataset with it, evaluate it, and record everything on the job row."""
    return runner.execute(job_id, _train_job)


def _train_job(run: runner.Run) -> str:
    job = run.job
    job_id = job.pk
    dataset = job.dataset
    if dataset is None:
        raise runner.JobFailed("the job's dataset was deleted")
    config = TrainConfig.from_params(dict(job.params))
    version = ModelVersion.objects.filter(jobs__pk=job_id).first()
    summary: dict = {}
    directory = checkpoint_dir_for(job_id)
    if version is None:
        run.log(f"{'resuming' if (directory / 'last.pt').exists() else 'training'} {config.architecture} on "
                f"{dataset.name}: {config.objective}, {config.epochs} epoch(s), "
                f"{'pretrained' if config.pretrained else 'random'} initial weights")
    else:
        previous = Job.objects.get(pk=job_id).result or {}
        summary = {k: v for k, v in previous.items() if k not in ("phase",)}
        summary.setdefault("history", (version.metrics or {}).get("training", {}).get("history"))
        run.log(f"model version {version.name} was already trained; embedding with it")
    state = {"epochs": -1}

    def progress(epoch: int, n_epochs: int, batch: int, n_batches: int, history: list) -> None:
        new_epoch = len(history) != state["epochs"]
        done = (epoch - 1) * n_batches + batch
        message = f"epoch {epoch}/{n_epochs}, batch {batch}/{n_batches}"
        if history:
            message += f"; val loss {history[-1]['val_loss']:.4g}"
        run.progress(min(done, n_epochs * n_batches), n_epochs * n_batches, message, force=new_epoch)
        if new_epoch:
            state["epochs"] = len(history)
            Job.objects.filter(pk=job_id).update(result=json_safe({"phase": "training", "history": history}))
            if history and history[-1]["epoch"] == epoch:
                h = history[-1]
                run.log(f"epoch {h['epoch']}: {epoch_summary(h)}{' (best)' if h['best'] else ''}, "
                        f"{h['seconds']:.1f} s")

    def on_features(done: int, total: int) -> None:
        run.progress(done, total, f"caching backbone features: {done}/{total} images", force=done == total)
        run.check_stop("stopped while caching backbone features; those done are kept in the cache")

    def on_published(version: ModelVersion, result) -> None:
        summary.update(result.summary())
        for warning in result.warnings[:20]:
            run.log(warning)
        # Recorded at once: a re-run after a crash from here on reuses this version.
        Job.objects.filter(pk=job_id).update(model_version=version,
                                             result=json_safe({**summary, "phase": "embedding",
                                                               "version": version.name, "version_id": version.pk}))
        run.log(f"best epoch {result.best_epoch} by {config.select_by} "
                f"({epoch_summary(result.history[result.best_epoch - 1])}, {result.stop_reason}); "
                f"saved as model version {version.name}")

    def embed_progress(done: int, total: int, message: str) -> None:
        run.progress(done, total, f"embedding {dataset.name}: {message}")

    try:
        outcome = train_and_publish(
            dataset, config, checkpoint_dir=directory, notes=f"trained by job #{job_id}", version=version,
            progress=progress, should_stop=run.should_stop, on_features=on_features, on_published=on_published,
            before_embedding=lambda: run.check_stop("stopped before embedding; the model version is kept"),
            embed_progress=embed_progress)
    except TrainingStopped:
        raise runner.JobStopped("stopped; the last finished epoch is kept in its checkpoint") from None
    version, report, evaluation = outcome.version, outcome.report, outcome.evaluation
    final = {**summary, "phase": "done", "version": version.name, "version_id": version.pk,
             "embedded": report.embedded, "embed_failed": len(report.failed)}
    if evaluation is not None:
        final["evaluation"] = evaluation_summary(evaluation)
        run.log(f"evaluation skipped: {evaluation['skipped']}" if "skipped" in evaluation else
                f"precision@{evaluation.get('k')} on the test split: {evaluation.get('precision_at_k') or 0:.4f}")
    if not run.succeed(result=json_safe(final), message=f"trained {version.name}", progress_done=1,
                       progress_total=1):
        return "stopped"
    run.log(f"done: {version.name}, {report.embedded} image(s) embedded"
            + (f", {len(report.failed)} unreadable" if report.failed else ""))
    return "done"
