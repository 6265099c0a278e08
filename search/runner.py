"""The job runner of the kernel: what a task's plain function hands its work to.

    def run_import_job(job_id):                   # search/import_jobs.py
        return runner.execute(job_id, _import)    # _import(run: Run) does the work

`execute` claims the job row (a conditional UPDATE through
search.jobs.transition), keeps its heartbeat fresh from a thread, gives the
body a `Run` (progress, log, should_stop) and records the outcome: succeeded,
failed with a message, or stopped. `execute_chunk` does the same for one
JobChunk of a split job; when the last chunk succeeds it queues the job's
finishing step (its kind's `task`, with a time limit of its own), which runs
through `execute` like any whole job. Knows no job kind."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.db.models import F
from django.utils import timezone

from search.jobs import (
    ACTIVE,
    S,
    add_log,
    heartbeat_interval,
    is_stopped,
    kind_of,
    send,
    set_progress,
    transition,
    worker_name,
)
from search.models import Job, JobChunk

logger = logging.getLogger(__name__)
STOP_CHECK_SECONDS = 0.5  # should_stop() asks the database at most this often
PROGRESS_WRITE_SECONDS = 0.5  # progress rows are written at most this often (and always at the end)


class JobFailed(Exception):
    """Raised by a job body for an expected failure: the job fails with exactly
    this message (no exception class name), and the task ends normally,
    returning `outcome` (default "failed")."""

    def __init__(self, message: str, *, outcome: str = "failed") -> None:
        super().__init__(message)
        self.outcome = outcome


class JobStopped(Exception):
    """Raised by a job body (or `Run.check_stop`) when the job was cancelled or
    taken over by another worker: the body stops and nothing more is recorded
    but the message, in the log."""


class _Heartbeat:
    """Keeps a row's heartbeat fresh from a thread while its task runs, so a
    long batch or a slow SQL statement is never mistaken for a dead worker; it
    dies with the process, which is exactly when recovery should act."""

    def __init__(self, beat: Callable[[], object], name: str) -> None:
        self.beat = beat
        self.interval = heartbeat_interval()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                try:
                    self.beat()
                except Exception:  # noqa: BLE001 - a database hiccup: the next beat tries again
                    logger.exception("heartbeat failed")
                    close_old_connections()
        finally:
            connection.close()

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class Run:
    """What a job body gets from `execute`: the claimed row, progress, log,
    and whether to stop."""

    def __init__(self, job: Job, claimed_at: datetime) -> None:
        self.job = job
        self.job_id = job.pk
        self.claimed_at = claimed_at
        self.finished = False
        self._last_check = 0.0
        self._mine = True
        self._last_write = 0.0

    def log(self, message: str) -> None:
        add_log(self.job_id, message)

    def progress(self, done: int, total: int, message: str | None = None, *, force: bool = False) -> None:
        """Record progress (written at most every PROGRESS_WRITE_SECONDS, and always when done == total)."""
        now = time.monotonic()
        if force or done >= total or now - self._last_write >= PROGRESS_WRITE_SECONDS:
            self._last_write = now
            set_progress(self.job_id, done, total, message)

    def should_stop(self) -> bool:
        """True once the job was cancelled, failed, or re-queued and claimed by
        another worker (a run is identified by its claim's timestamp). Asks the
        database at most every STOP_CHECK_SECONDS."""
        now = time.monotonic()
        if now - self._last_check >= STOP_CHECK_SECONDS:
            self._last_check = now
            self._mine = Job.objects.filter(pk=self.job_id, status=S.RUNNING, claimed=self.claimed_at).exists()
        return not self._mine

    def check_stop(self, message: str = "stopped") -> None:
        """Raise JobStopped(message) when should_stop()."""
        if self.should_stop():
            raise JobStopped(message)

    def succeed(self, *, result: dict | None = None, message: str = "", **fields: Any) -> bool:
        """Mark the job succeeded (False when it was cancelled meanwhile)."""
        self.finished = True
        if result is not None:
            fields["result"] = result
        return transition(self.job_id, S.SUCCEEDED, expect=[S.RUNNING], message=message[:300], **fields)

    def fail(self, message: str) -> None:
        self.finished = True
        if transition(self.job_id, S.FAILED, expect=[S.RUNNING], error=message[:5000], message="failed"):
            add_log(self.job_id, f"failed: {message}")


def execute(job_id: int, body: Callable[[Run], str | None], *,
            user_errors: tuple[type[Exception], ...] = ()) -> str:
    """Claim job `job_id`, run `body(run)` with a heartbeat, and record the outcome.

    Returns "gone" (no such row), "not claimed" (not queued: another worker has
    it, or it was cancelled), "stopped" (JobStopped), "failed" (JobFailed), or
    what the body returned ("done" when None). The body calls `run.succeed(...)`
    when it finishes; if it does not, the job is marked succeeded with no result.
    Any other exception marks the job failed and is raised again, so the
    worker logs it: with its message alone when it is one of `user_errors`
    (errors written for a person, e.g. EvaluationError), else "<Type>: <message>".
    """
    job = Job.objects.select_related("dataset", "model_version").filter(pk=job_id).first()
    if job is None:
        return "gone"
    claimed_at = timezone.now()
    # A split job's finishing step keeps the job's start (its chunks' first claim).
    started = job.started if job.started and JobChunk.objects.filter(job_id=job_id).exists() else claimed_at
    if not transition(job_id, S.RUNNING, expect=[S.QUEUED], started=started, claimed=claimed_at):
        return "not claimed"
    add_log(job_id, f"started on {worker_name()}")
    run = Run(job, claimed_at)

    def beat() -> None:
        Job.objects.filter(pk=job_id, status=S.RUNNING, claimed=claimed_at).update(heartbeat=timezone.now())

    try:
        with _Heartbeat(beat, f"cbir-heartbeat-job-{job_id}"):
            outcome = body(run)
    except JobStopped as exc:
        add_log(job_id, str(exc) or "stopped")
        return "stopped"
    except JobFailed as exc:
        run.fail(str(exc))
        return exc.outcome
    except Exception as exc:
        from celery.exceptions import SoftTimeLimitExceeded

        if isinstance(exc, user_errors):
            run.fail(str(exc))
        elif isinstance(exc, SoftTimeLimitExceeded):
            setting = kind_of(job.kind).time_limit_setting or "its time limit"
            run.fail(f"the task ran past its time limit ({setting}); Run again continues from "
                     "where it stopped where the job can")
        else:
            run.fail(f"{type(exc).__name__}: {exc}")
        raise
    if not run.finished:
        run.succeed()
    return outcome or "done"


def execute_chunk(chunk_id: int, body: Callable[[JobChunk, Callable[[int, str], None], Callable[[], bool]],
                                                tuple[int, int]]) -> str:
    """Claim one chunk of a split job, run `body(chunk, progress, should_stop)`,
    which returns (done, failed) counts; after the chunk that completes the job's
    chunks, queue the job's finishing step (queue_finish).

    progress(done, message) records the chunk's count and a heartbeat. An
    exception fails the chunk and its job with "<Type>: <message>" and is raised
    again. Returns "gone", "job <status>", "already claimed", "stopped" or "done".
    """
    chunk = JobChunk.objects.select_related("job").filter(pk=chunk_id).first()
    if chunk is None:
        return "gone"
    job = chunk.job
    if job.status not in ACTIVE:
        JobChunk.objects.filter(pk=chunk_id, status=S.QUEUED).update(status=S.CANCELLED)
        return f"job {job.status}"
    # Claim: only one worker runs a chunk; a redelivered message finds it taken or done.
    claimed = JobChunk.objects.filter(pk=chunk_id, status=S.QUEUED).update(
        status=S.RUNNING, worker=worker_name(), heartbeat=timezone.now(), attempts=F("attempts") + 1)
    if not claimed:
        return "already claimed"
    if transition(job.pk, S.RUNNING, expect=[S.QUEUED], claimed=None):
        add_log(job.pk, f"started on {worker_name()}")
    throttle = settings.CBIR_EMBED_THROTTLE_SECONDS

    def progress(done: int, message: str) -> None:
        now = timezone.now()
        JobChunk.objects.filter(pk=chunk_id).update(done=done, heartbeat=now)
        Job.objects.filter(pk=job.pk).update(heartbeat=now, message=f"chunk {chunk.index}: {message}"[:300])
        if throttle:
            time.sleep(throttle)

    def beat() -> None:
        JobChunk.objects.filter(pk=chunk_id, status=S.RUNNING).update(heartbeat=timezone.now())

    try:
        with _Heartbeat(beat, f"cbir-heartbeat-chunk-{chunk_id}"):
            done, failed = body(chunk, progress, lambda: is_stopped(job.pk))
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        JobChunk.objects.filter(pk=chunk_id).update(status=S.FAILED, error=reason)
        if transition(job.pk, S.FAILED, expect=ACTIVE, error=f"chunk {chunk.index}: {reason}"):
            add_log(job.pk, f"failed in chunk {chunk.index}: {reason}")
        raise
    if is_stopped(job.pk):
        JobChunk.objects.filter(pk=chunk_id).update(status=S.CANCELLED)
        return "stopped"
    JobChunk.objects.filter(pk=chunk_id, status=S.RUNNING).update(
        status=S.SUCCEEDED, done=done, failed=failed, heartbeat=timezone.now())
    queue_finish(job.pk)
    return "done"


def queue_finish(job_id: int) -> bool:
    """When every chunk of the job has succeeded, move it back to QUEUED and
    send its kind's `task` (the finishing step), once: the conditional UPDATE
    matches only a running job whose finish has not claimed it (`claimed` is
    None), so of two chunks ending together only one queues it. Returns
    whether this call queued it."""
    if JobChunk.objects.filter(job_id=job_id).exclude(status=S.SUCCEEDED).exists():
        return False
    with transaction.atomic():
        if not Job.objects.filter(pk=job_id, status=S.RUNNING, claimed__isnull=True).update(
                status=S.QUEUED, heartbeat=timezone.now(), message="chunks done; the finishing step is queued"):
            return False
        add_log(job_id, "all chunks done; finishing step queued")
        send(Job.objects.get(pk=job_id))
    return True


