"""The "import" job kind: import an uploaded zip on a worker, then queue the
embedding of the new images with the active version. Registered in
SearchConfig.ready()."""

from __future__ import annotations

import time
from pathlib import Path

from django.conf import settings
from django.db import transaction

from search import jobs, runner
from search.embed_jobs import start_embed_job
from search.ingest import StorageError, ZipRejected, import_zip
from search.models import Dataset, Job
from training.models import ModelVersion

KIND = "import"


def uploads_dir() -> Path:
    """Where uploaded zips wait for their import job: outside MEDIA_ROOT (never
    served), on storage every worker can read (see docs/deployment.md)."""
    path = Path(settings.CBIR_UPLOADS_DIR) if settings.CBIR_UPLOADS_DIR else Path(settings.MEDIA_ROOT).parent / "uploads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def owned_upload(job: Job) -> Path | None:
    """The uploaded zip an import job holds, when it lies in uploads_dir() (a
    file this project wrote there, never a path of the user's own)."""
    raw = job.params.get("zip_path") if job.kind == KIND and isinstance(job.params, dict) else None
    if not raw:
        return None
    path = Path(raw)
    try:
        path.resolve().relative_to(uploads_dir().resolve())
    except (OSError, ValueError):
        return None
    return path


def discard_uploads(jobs_: list[Job]) -> None:
    """Remove the uploaded zips of import jobs that can no longer use them
    (their dataset or the job row is being deleted), once the current
    transaction commits: a rolled-back delete keeps them."""
    paths = [path for path in map(owned_upload, jobs_) if path is not None]
    def remove() -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    if paths:
        transaction.on_commit(remove)


@transaction.atomic
def start_import_job(dataset: Dataset, zip_path: str | Path, *, labels_from_folders: bool = False, user=None,
                     original_name: str = "", check: bool = True) -> Job:
    """Import a zip (already saved on storage that workers share) as a job.
    Raises JobsUnavailable (with `check`) when no worker serves the queue."""
    if check:
        jobs.check_workers_for(KIND)
    return jobs.create(KIND, dataset=dataset, user=user,
                       params={"zip_path": str(zip_path), "labels_from_folders": labels_from_folders,
                               "original_name": original_name},
                       log=f"queued: import {original_name or zip_path} into {dataset.name}")


def run_import_job(job_id: int) -> str:
    """Run an import job (the run_import task)."""
    return runner.execute(job_id, _import)


def _import(run: runner.Run) -> str:
    job = run.job
    zip_path = Path(job.params["zip_path"])
    if job.dataset is None:
        discard_uploads([job])
        raise runner.JobFailed("the job's dataset was deleted")

    throttle = settings.CBIR_EMBED_THROTTLE_SECONDS  # fault injection: slows an import down for tests and demos

    def progress(done: int, total: int, message: str) -> None:
        run.progress(done, total, message)
        if throttle:
            time.sleep(throttle)

    try:
        report = import_zip(zip_path, job.dataset, labels_from_folders=job.params.get("labels_from_folders", False),
                            progress=progress, should_stop=run.should_stop)
    except ZipRejected as exc:
        zip_path.unlink(missing_ok=True)
        raise runner.JobFailed(str(exc), outcome="rejected") from None
    except StorageError as exc:
        # Not the zip's fault: it is kept, so Run again works once there is room.
        done = exc.report.imported if exc.report else 0
        raise runner.JobFailed(f"{exc} (stopped there; {done} image(s) imported before it are complete)",
                               outcome="storage error") from None
    if run.should_stop():
        raise runner.JobStopped(f"cancelled: stopped after {report.imported} image(s) imported, which are kept "
                                "(Run again imports the rest)")
    for name, reason in report.rejected[:200]:
        if reason != "not an image":
            run.log(f"skipped {name}: {reason}")
    run.succeed(result=report.as_dict(), message=report.summary())
    run.log(report.summary())
    zip_path.unlink(missing_ok=True)
    active = ModelVersion.active()
    if active and report.imported:
        try:
            follow = start_embed_job(active, job.dataset, check=False)
            run.log(f"indexing the new images: job #{follow.pk}")
        except jobs.JobError as exc:
            run.log(f"not indexing now: {exc}")
    return "done"
