"""Celery tasks for importing and embedding. Thin: they take ids, and call the
plain functions in search.jobs, search.ingest and search.indexing."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from celery import shared_task
from celery.signals import worker_process_init, worker_ready, worker_shutdown
from django.conf import settings
from django.db import close_old_connections
from django.db.models import F
from django.utils import timezone

from search import jobs
from search.jobs import S
from search.models import Job, JobChunk

logger = logging.getLogger(__name__)


def run_chunk(chunk_id: int) -> str:
    """Embed one chunk of an embedding job; returns what happened (for logs and tests)."""
    from search.indexing import embed_images

    chunk = JobChunk.objects.select_related("job", "job__model_version").filter(pk=chunk_id).first()
    if chunk is None:
        return "gone"
    job = chunk.job
    if job.status not in (S.QUEUED, S.RUNNING):
        JobChunk.objects.filter(pk=chunk_id, status=S.QUEUED).update(status=S.CANCELLED)
        return f"job {job.status}"
    # Claim: only one worker runs a chunk; a redelivered message finds it taken or done.
    claimed = JobChunk.objects.filter(pk=chunk_id, status=S.QUEUED).update(
        status=S.RUNNING, worker=jobs.worker_name(), heartbeat=timezone.now(), attempts=F("attempts") + 1)
    if not claimed:
        return "already claimed"
    if jobs.transition(job.pk, S.RUNNING, expect=[S.QUEUED]):
        jobs.add_log(job.pk, f"started on {jobs.worker_name()}")
    throttle = settings.CBIR_EMBED_THROTTLE_SECONDS

    def progress(done: int, total: int, message: str) -> None:
        now = timezone.now()
        JobChunk.objects.filter(pk=chunk_id).update(done=done, heartbeat=now)
        Job.objects.filter(pk=job.pk).update(heartbeat=now, message=f"chunk {chunk.index}: {message}")
        if throttle:
            time.sleep(throttle)

    try:
        report = embed_images(job.model_version, chunk.image_ids, progress=progress,
                              should_stop=lambda: jobs.is_stopped(job.pk))
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        JobChunk.objects.filter(pk=chunk_id).update(status=S.FAILED, error=reason)
        if jobs.transition(job.pk, S.FAILED, expect=[S.QUEUED, S.RUNNING], error=f"chunk {chunk.index}: {reason}"):
            jobs.add_log(job.pk, f"failed in chunk {chunk.index}: {reason}")
        raise
    if jobs.is_stopped(job.pk):
        JobChunk.objects.filter(pk=chunk_id).update(status=S.CANCELLED)
        return "stopped"
    JobChunk.objects.filter(pk=chunk_id, status=S.RUNNING).update(
        status=S.SUCCEEDED, done=report.embedded, failed=len(report.failed), heartbeat=timezone.now())
    for image_id, reason in report.failed[:20]:
        jobs.add_log(job.pk, f"image {image_id} could not be embedded: {reason}")
    jobs.finish_embed_job(job.pk)
    return "done"


@shared_task(acks_late=True, time_limit=settings.CBIR_CHUNK_TIME_LIMIT + 60,
             soft_time_limit=settings.CBIR_CHUNK_TIME_LIMIT)
def embed_chunk(chunk_id: int) -> str:
    return run_chunk(chunk_id)


@shared_task(acks_late=True)
def finish_embed_job(job_id: int) -> bool:
    """For a job with nothing to embed: build the index and finish."""
    jobs.transition(job_id, S.RUNNING, expect=[S.QUEUED])
    return jobs.finish_embed_job(job_id)


def run_import_job(job_id: int) -> str:
    from search.ingest import StorageError, ZipRejected, import_zip
    from training.models import ModelVersion

    job = Job.objects.select_related("dataset").filter(pk=job_id).first()
    if job is None or not jobs.transition(job_id, S.RUNNING, expect=[S.QUEUED]):
        return "not claimed"
    jobs.add_log(job_id, f"started on {jobs.worker_name()}")
    zip_path = Path(job.params["zip_path"])

    def progress(done: int, total: int, message: str) -> None:
        if done % 10 == 0 or done == total:
            jobs.set_progress(job_id, done, total, message)

    try:
        report = import_zip(zip_path, job.dataset, labels_from_folders=job.params.get("labels_from_folders", False),
                            progress=progress, should_stop=lambda: jobs.is_stopped(job_id))
    except ZipRejected as exc:
        if jobs.transition(job_id, S.FAILED, expect=[S.RUNNING], error=str(exc)):
            jobs.add_log(job_id, f"failed: {exc}")
        zip_path.unlink(missing_ok=True)
        return "rejected"
    except StorageError as exc:
        # Not the zip's fault: it is kept, so Run again works once there is room.
        done = exc.report.imported if exc.report else 0
        reason = f"{exc} (stopped there; {done} image(s) imported before it are complete)"
        if jobs.transition(job_id, S.FAILED, expect=[S.RUNNING], error=reason):
            jobs.add_log(job_id, f"failed: {reason}")
        return "storage error"
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        if jobs.transition(job_id, S.FAILED, expect=[S.RUNNING], error=reason):
            jobs.add_log(job_id, f"failed: {reason}")
        raise
    if jobs.is_stopped(job_id):
        return "stopped"
    for name, reason in report.rejected[:200]:
        if reason != "not an image":
            jobs.add_log(job_id, f"skipped {name}: {reason}")
    jobs.transition(job_id, S.SUCCEEDED, expect=[S.RUNNING], result=report.as_dict(), message=report.summary())
    jobs.add_log(job_id, report.summary())
    zip_path.unlink(missing_ok=True)
    active = ModelVersion.active()
    if active and report.imported:
        try:
            follow = jobs.start_embed_job(active, job.dataset, check=False)
            jobs.add_log(job_id, f"indexing the new images: job #{follow.pk}")
        except jobs.JobError as exc:
            jobs.add_log(job_id, f"not indexing now: {exc}")
    return "done"


@shared_task(acks_late=True, time_limit=settings.CBIR_TRAIN_TIME_LIMIT)
def run_import(job_id: int) -> str:
    return run_import_job(job_id)


# --- Worker life cycle ---------------------------------------------------------

@worker_process_init.connect
def allow_loader_processes(**kwargs) -> None:
    """Celery's prefork pool runs tasks in daemonic processes, and Python forbids
    daemonic processes to start children, which a DataLoader with workers needs.
    The pool process is itself supervised by Celery, and PyTorch's loader
    workers exit when their parent dies, so lifting the flag is safe here."""
    import multiprocessing

    multiprocessing.current_process()._config["daemon"] = False


# Recover work whose worker died.

_stop = threading.Event()


def _recovery_loop() -> None:
    while not _stop.wait(settings.CBIR_RECOVERY_INTERVAL):
        try:
            close_old_connections()
            count = jobs.recover_stale()
            if count:
                logger.warning("queued %d stale task(s) again", count)
        except Exception:  # noqa: BLE001 - the loop must outlive a database hiccup
            logger.exception("recovery scan failed; will retry")


@worker_ready.connect
def start_recovery(**kwargs) -> None:
    _stop.clear()
    threading.Thread(target=_recovery_loop, name="cbir-recovery", daemon=True).start()


@worker_shutdown.connect
def stop_recovery(**kwargs) -> None:
    _stop.set()
