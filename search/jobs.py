"""Jobs: creating them, moving them between states, tracking progress,
cancelling, recovering work whose worker died.

Every status change goes through `transition()`: a conditional UPDATE that
only succeeds from an allowed state, so a claim is atomic across workers.
Jobs are sent to the broker after the transaction that created them commits,
and tasks receive ids only."""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import timedelta
from typing import Iterable

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Sum
from django.utils import timezone

from search.models import Dataset, Image, Job, JobChunk
from training.models import ModelVersion

logger = logging.getLogger(__name__)
S = Job.Status

# Allowed status changes: from → {to}. Re-running a failed or cancelled job
# queues it again; a running job may be queued again when its worker died.
ALLOWED: dict[str, set[str]] = {
    S.QUEUED: {S.RUNNING, S.CANCELLED, S.FAILED},
    S.RUNNING: {S.SUCCEEDED, S.FAILED, S.CANCELLED, S.QUEUED},
    S.FAILED: {S.QUEUED},
    S.CANCELLED: {S.QUEUED},
    S.SUCCEEDED: set(),
}

LOG_LIMIT = 500


class JobError(Exception):
    """A job cannot be started or changed; the message says why and what to do."""


class InvalidTransition(JobError):
    pass


class JobsUnavailable(JobError):
    """No broker or no worker: a job started now would wait forever."""


def transition(job_id: int, to: str, *, expect: Iterable[str] | None = None, **fields) -> bool:
    """Move a job to `to` if its current status allows it (and is in `expect`
    when given). Returns False when another process got there first."""
    sources = {s for s, targets in ALLOWED.items() if to in targets}
    if expect is not None:
        sources &= set(expect)
    if not sources:
        raise InvalidTransition(f"no job may move to {to!r} from {sorted(expect or [])}")
    now = timezone.now()
    if to == S.RUNNING:
        fields.setdefault("started", now)
        fields.setdefault("heartbeat", now)
        fields.setdefault("finished", None)
    if to in (S.SUCCEEDED, S.FAILED, S.CANCELLED):
        fields.setdefault("finished", now)
    if to == S.QUEUED:
        fields.setdefault("finished", None)
    return Job.objects.filter(pk=job_id, status__in=sources).update(status=to, **fields) == 1


def add_log(job_id: int, message: str) -> None:
    """Append a timestamped line to the job's log (kept to the last LOG_LIMIT lines)."""
    entry = json.dumps([{"t": timezone.now().isoformat(timespec="seconds"), "msg": message[:1000]}])
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE search_job SET log = (CASE WHEN jsonb_array_length(log) >= %s "
            "THEN log - 0 ELSE log END) || %s::jsonb, message = %s WHERE id = %s",
            [LOG_LIMIT, entry, message[:300], job_id],
        )


def set_progress(job_id: int, done: int, total: int, message: str | None = None) -> None:
    fields = {"progress_done": done, "progress_total": total, "heartbeat": timezone.now()}
    if message is not None:
        fields["message"] = message[:300]
    Job.objects.filter(pk=job_id).update(**fields)


def is_stopped(job_id: int) -> bool:
    """True when the job was cancelled or failed meanwhile (checked between batches)."""
    return Job.objects.filter(pk=job_id, status__in=[S.CANCELLED, S.FAILED]).exists()


# --- Broker and workers -------------------------------------------------------

def reset_broker_connections() -> None:
    """Forget pooled broker connections (they break when Redis restarts)."""
    from cbirsite.celery import app

    app.pool.force_close_all()
    app.amqp._producer_pool = None


def _active_queues(timeout: float) -> dict:
    from cbirsite.celery import app

    with app.connection_for_write() as conn:
        return app.control.inspect(timeout=timeout, connection=conn).active_queues() or {}


def check_workers(queue: str) -> None:
    """Raise JobsUnavailable unless the broker answers and a worker consumes `queue`."""
    from cbirsite.celery import app

    broker = app.conf.broker_url
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds
        raise JobsUnavailable(
            f"the job broker (Redis at {broker}) cannot be reached ({exc}); start Redis "
            f"(scripts/cbir up starts one) and try again. Search keeps working meanwhile."
        ) from None
    try:
        replies = _active_queues(settings.CBIR_WORKER_PING_TIMEOUT)
    except Exception:  # noqa: BLE001 - a pooled connection from before a Redis restart: once more, fresh
        reset_broker_connections()
        try:
            replies = _active_queues(settings.CBIR_WORKER_PING_TIMEOUT)
        except Exception as exc:  # noqa: BLE001
            raise JobsUnavailable(f"cannot ask the workers which queues they serve ({exc})") from None
    serving = [name for name, queues in replies.items() if any(q.get("name") == queue for q in queues or [])]
    if not serving:
        raise JobsUnavailable(
            f"no Celery worker is consuming the {queue!r} queue, so the job would wait forever; start one: "
            f"celery -A cbirsite worker -Q embed,train"
        )


def _send(task, job: Job | JobChunk, *args) -> None:
    """Send after commit; if the broker fails at that moment, the job fails with the reason."""
    job_id = job.job_id if isinstance(job, JobChunk) else job.pk

    def send() -> None:
        policy = {"max_retries": 2, "interval_start": 0.2}
        try:
            try:
                result = task.apply_async(args=[job.pk, *args], retry=True, retry_policy=policy)
            except Exception:  # noqa: BLE001 - stale pooled connection: once more, fresh
                reset_broker_connections()
                result = task.apply_async(args=[job.pk, *args], retry=True, retry_policy=policy)
        except Exception as exc:  # noqa: BLE001
            message = f"could not hand the job to the broker: {exc}"
            logger.error("job %s: %s", job_id, message)
            if transition(job_id, S.FAILED, expect=[S.QUEUED, S.RUNNING], error=message):
                add_log(job_id, message)
            return
        type(job).objects.filter(pk=job.pk).update(celery_task_id=result.id)

    transaction.on_commit(send)


# --- Embedding jobs -----------------------------------------------------------

def _chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def _embed_targets(dataset: Dataset | None, version: ModelVersion) -> list[int]:
    from search.indexing import missing_image_ids

    return missing_image_ids(dataset, version)


def _queue_chunks(job: Job) -> int:
    from search import tasks

    job.chunks.all().delete()
    dataset = job.dataset if job.params.get("dataset_id") else None
    ids = _embed_targets(dataset, job.model_version)
    size = int(job.params.get("chunk_size") or settings.CBIR_CHUNK_SIZE)
    chunks = JobChunk.objects.bulk_create(
        [JobChunk(job=job, index=i, image_ids=part) for i, part in enumerate(_chunks(ids, size))])
    Job.objects.filter(pk=job.pk).update(progress_done=0, progress_total=len(ids))
    for chunk in chunks:
        _send(tasks.embed_chunk, chunk)
    if not chunks:
        _send(tasks.finish_embed_job, job)
    return len(ids)


@transaction.atomic
def start_embed_job(version: ModelVersion, dataset: Dataset | None = None, *, activate: bool = False,
                    user=None, chunk_size: int | None = None, check: bool = True) -> Job:
    """Embed what `version` is missing (for one dataset, or all when None) as
    chunks that run in parallel on every worker; when all are done the HNSW
    index is built and, with activate=True, search switches to `version`."""
    if check:
        check_workers("embed")
    running = Job.objects.filter(kind=Job.Kind.EMBED, model_version=version, dataset=dataset,
                                 status__in=[S.QUEUED, S.RUNNING]).first()
    if running:
        raise JobError(f"job #{running.pk} is already embedding this; wait for it or cancel it")
    job = Job.objects.create(
        kind=Job.Kind.EMBED, dataset=dataset, model_version=version, created_by=user,
        params={"dataset_id": dataset.pk if dataset else None, "activate": activate,
                "chunk_size": chunk_size or settings.CBIR_CHUNK_SIZE},
    )
    n = _queue_chunks(job)
    job.refresh_from_db()
    target = dataset.name if dataset else "every dataset"
    add_log(job.pk, f"queued: {n} image(s) of {target} to embed with {version.name}"
                    f"{' then activate it' if activate else ''}")
    return job


def start_activation(version: ModelVersion, *, user=None, check: bool = True) -> Job:
    """Activate a version: embed every dataset with it first; search keeps using
    the current version until then, and switches in one transaction."""
    if version.is_active:
        raise JobError(f"{version} is already the active version")
    return start_embed_job(version, None, activate=True, user=user, check=check)


def chunk_progress(job_id: int) -> tuple[int, int]:
    agg = JobChunk.objects.filter(job_id=job_id).aggregate(done=Sum("done"), failed=Sum("failed"))
    return int(agg["done"] or 0), int(agg["failed"] or 0)


def finish_embed_job(job_id: int) -> bool:
    """Called after each chunk: when all chunks succeeded, build the index,
    activate if asked, and mark the job succeeded, in one transaction."""
    from search.indexing import ensure_hnsw_index

    with transaction.atomic():
        job = Job.objects.select_for_update().filter(pk=job_id).first()
        if job is None or job.status not in (S.QUEUED, S.RUNNING):
            return False
        if job.chunks.exclude(status=S.SUCCEEDED).exists():
            return False
        version = job.model_version
        done, failed = chunk_progress(job_id)
        created = ensure_hnsw_index(version)
        message = f"{done} embedded" + (f", {failed} unreadable" if failed else "")
        activated = False
        if job.params.get("activate") or ModelVersion.active() is None:
            version.activate()
            activated = True
        transition(job_id, S.SUCCEEDED, expect=[S.QUEUED, S.RUNNING], progress_done=done,
                   result={"embedded": done, "failed": failed, "index_created": created, "activated": activated},
                   message=message)
    add_log(job_id, f"done: {done} embedded, {failed} unreadable"
                    f"{', index built' if created else ''}{', now active for search' if activated else ''}")
    image_ids = [i for ids in JobChunk.objects.filter(job_id=job_id).values_list("image_ids", flat=True) for i in ids]
    flagged = flag_new_near_duplicates(version, image_ids)
    if flagged:
        add_log(job_id, f"{flagged} near-duplicate pair(s) flagged (see admin: Near duplicates)")
    return True


def flag_new_near_duplicates(version: ModelVersion, image_ids: list[int]) -> int:
    """Flag newly embedded images that nearly duplicate an image of their dataset.
    Runs after the index exists, so each lookup is an HNSW query."""
    from search.duplicates import flag_near_duplicates

    by_dataset: dict[int, list[int]] = {}
    for image_id, dataset_id in Image.objects.filter(pk__in=image_ids).values_list("pk", "dataset_id"):
        by_dataset.setdefault(dataset_id, []).append(image_id)
    flagged = 0
    for dataset in Dataset.objects.filter(pk__in=by_dataset):
        flagged += flag_near_duplicates(version, dataset, by_dataset[dataset.pk])
    return flagged


# --- Cancel, re-run, recovery -------------------------------------------------

def cancel(job: Job) -> bool:
    from cbirsite.celery import app

    if not transition(job.pk, S.CANCELLED, expect=[S.QUEUED, S.RUNNING], message="cancelled"):
        return False
    JobChunk.objects.filter(job=job, status__in=[S.QUEUED, S.RUNNING]).update(status=S.CANCELLED)
    add_log(job.pk, "cancelled")
    task_ids = [t for t in job.chunks.values_list("celery_task_id", flat=True) if t] + (
        [job.celery_task_id] if job.celery_task_id else [])
    try:
        if task_ids:
            app.control.revoke(task_ids)
    except Exception:  # noqa: BLE001 - revoking is an optimisation; the claim check is what stops work
        pass
    return True


@transaction.atomic
def rerun(job: Job, *, check: bool = True) -> Job:
    """Queue a failed or cancelled job again; an embedding job does only the missing work."""
    if check:
        check_workers("train" if job.kind == Job.Kind.TRAIN else "embed")
    if not transition(job.pk, S.QUEUED, expect=[S.FAILED, S.CANCELLED], error="", message="queued again"):
        raise JobError(f"job #{job.pk} is {job.status}; only failed or cancelled jobs can be re-run")
    add_log(job.pk, "queued again")
    if job.kind == Job.Kind.EMBED:
        _queue_chunks(job)
        job.refresh_from_db()
    else:
        _send(task_for(job.kind), job)
    return job


def task_for(kind: str):
    from search import tasks

    mapping = {Job.Kind.IMPORT: tasks.run_import}
    try:
        from training import tasks as training_tasks

        mapping.update(getattr(training_tasks, "TASKS_BY_KIND", {}))
    except ImportError:
        pass
    return mapping[kind]


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def recover_stale() -> int:
    """Queue again the chunks and jobs whose worker stopped sending heartbeats
    (killed, host lost). Safe to run from every worker at once."""
    from search import tasks

    stale_before = timezone.now() - timedelta(seconds=settings.CBIR_JOB_STALE_SECONDS)
    count = 0
    for chunk in JobChunk.objects.filter(status=S.RUNNING, heartbeat__lt=stale_before,
                                         job__status__in=[S.QUEUED, S.RUNNING]):
        with transaction.atomic():
            if JobChunk.objects.filter(pk=chunk.pk, status=S.RUNNING, heartbeat=chunk.heartbeat).update(
                    status=S.QUEUED, heartbeat=timezone.now()):
                add_log(chunk.job_id, f"chunk {chunk.index}: worker {chunk.worker} stopped answering; queued again")
                _send(tasks.embed_chunk, chunk)
                count += 1
    # Whole-job tasks (import, train, evaluate) whose worker died.
    for job in Job.objects.filter(status=S.RUNNING, heartbeat__lt=stale_before).exclude(kind=Job.Kind.EMBED):
        with transaction.atomic():
            if Job.objects.filter(pk=job.pk, status=S.RUNNING, heartbeat=job.heartbeat).update(
                    status=S.QUEUED, heartbeat=timezone.now()):
                add_log(job.pk, "the worker stopped answering; queued again (resumes from its last checkpoint)")
                _send(task_for(job.kind), job)
                count += 1
    return count


# --- Import jobs --------------------------------------------------------------

def uploads_dir():
    """Where uploaded zips wait for their import job: outside MEDIA_ROOT (never
    served), on storage every worker can read (see docs/deployment.md)."""
    from pathlib import Path

    path = Path(settings.CBIR_UPLOADS_DIR) if settings.CBIR_UPLOADS_DIR else Path(settings.MEDIA_ROOT).parent / "uploads"
    path.mkdir(parents=True, exist_ok=True)
    return path


@transaction.atomic
def start_import_job(dataset: Dataset, zip_path: str, *, labels_from_folders: bool = False, user=None,
                     original_name: str = "", check: bool = True) -> Job:
    """Import a zip (already saved on storage that workers share) as a job."""
    from search import tasks

    if check:
        check_workers("embed")
    job = Job.objects.create(kind=Job.Kind.IMPORT, dataset=dataset, created_by=user,
                             params={"zip_path": str(zip_path), "labels_from_folders": labels_from_folders,
                                     "original_name": original_name})
    add_log(job.pk, f"queued: import {original_name or zip_path} into {dataset.name}")
    _send(tasks.run_import, job)
    return job


def job_status(job: Job) -> dict:
    """The small JSON the job page polls."""
    job.refresh_from_db()
    if job.kind == Job.Kind.EMBED and not job.is_finished:
        done, failed = chunk_progress(job.pk)
        job.progress_done = done + failed
    duration = job.duration
    return {
        "id": job.pk, "kind": job.kind, "status": job.status, "done": job.progress_done,
        "total": job.progress_total, "percent": round(job.percent, 1), "message": job.message,
        "error": job.error, "result": job.result, "log": job.log[-50:], "finished": job.is_finished,
        "duration_s": round(duration.total_seconds(), 1) if duration else None,
        "history": job.result.get("history") if isinstance(job.result, dict) else None,
    }
