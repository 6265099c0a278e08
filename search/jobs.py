"""The job kernel: states and allowed transitions, progress and log, kinds
registered by name, sending after commit, cancel, re-run and recovery of
stale work. It knows no job kind.

Each app registers its kinds in `AppConfig.ready()`:

    register_kind(JobKind("import", task="search.tasks.run_import", queue="embed"))

and a task is a one-line wrapper over a plain function that hands its body to
the runner (search/runner.py: claim, heartbeat, progress, should-stop,
outcome). The `Job` row is the truth about a job, not the broker; tasks
receive ids only and are sent by registered task *name* after the creating
transaction commits (search/broker.py). The worker hooks are in
search/worker.py.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, OuterRef, Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from search import broker
from search.models import Job, JobChunk

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
ACTIVE = (S.QUEUED, S.RUNNING)
LOG_LIMIT = 500


class JobError(Exception):
    """A job cannot be started or changed; the message says why and what to do."""


class InvalidTransition(JobError):
    pass


class JobsUnavailable(JobError):
    """No broker or no worker: a job started now would wait forever."""


# --- Kinds ---------------------------------------------------------------------

@dataclass(frozen=True)
class JobKind:
    """A kind of job, registered by the app that runs it.

    - task: the Celery task name that runs a whole job, called with the job id.
    - queue: the queue its tasks go to (and that `check_workers` asks about).
    - chunk_task: for jobs split into JobChunk rows, the task name that runs one
      chunk (called with the chunk id). Such jobs are recovered chunk by chunk.
    - requeue(job): how a re-run queues the work again (default: send `task`).
    - exclusive: a job of this kind has its dataset and model version to
      itself: it starts only when no other job is active on them, and no other
      job starts on them until it ends (the "delete" kind).
    - time_limit_setting: the setting that bounds `task` (named in the
      failure message when a task runs past it).

    A kind with chunks runs `task` as its finishing step once every chunk has
    succeeded (search.runner.queue_finish), through search.runner.execute.
    """

    name: str
    task: str
    queue: str
    chunk_task: str | None = None
    requeue: Callable[[Job], object] | None = None
    exclusive: bool = False
    time_limit_setting: str = ""


KINDS: dict[str, JobKind] = {}


def register_kind(kind: JobKind) -> None:
    """Register (or replace, e.g. on a test's reload) a job kind."""
    KINDS[kind.name] = kind


def queues() -> list[str]:
    """Every queue a registered kind uses (what a worker should consume)."""
    return sorted({kind.queue for kind in KINDS.values()})


def check_workers(queue: str) -> None:
    """Raise JobsUnavailable unless the broker answers and a worker consumes `queue`."""
    try:
        broker.check_workers(queue, all_queues=queues())
    except broker.BrokerUnavailable as exc:
        raise JobsUnavailable(str(exc)) from None


def check_workers_for(kind: str) -> None:
    """check_workers() for the queue of a registered kind."""
    check_workers(kind_of(kind).queue)


def kind_of(name: str) -> JobKind:
    try:
        return KINDS[name]
    except KeyError:
        raise JobError(f"no job kind {name!r} is registered (known: {', '.join(sorted(KINDS))})") from None


# --- State ---------------------------------------------------------------------

def transition(job_id: int, to: str, *, expect: Iterable[str] | None = None, **fields: Any) -> bool:
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
        # While queued, `heartbeat` says since when (see resend_lost).
        fields.setdefault("finished", None)
        fields.setdefault("heartbeat", now)
    return Job.objects.filter(pk=job_id, status__in=sources).update(status=to, **fields) == 1


def add_log(job_id: int, message: str) -> None:
    """Append a timestamped line to the job's log (kept to the last LOG_LIMIT lines)."""
    entry = json.dumps([{"t": timezone.now().isoformat(timespec="seconds"), "msg": message[:1000]}])
    with connection.cursor() as cursor:
        # Raw SQL: the ORM has no jsonb array append/trim in one UPDATE.
        cursor.execute(
            "UPDATE search_job SET log = (CASE WHEN jsonb_array_length(log) >= %s "
            "THEN log - 0 ELSE log END) || %s::jsonb, message = %s WHERE id = %s",
            [LOG_LIMIT, entry, message[:300], job_id],
        )


def set_progress(job_id: int, done: int, total: int, message: str | None = None) -> None:
    fields: dict[str, Any] = {"progress_done": done, "progress_total": total, "heartbeat": timezone.now()}
    if message is not None:
        fields["message"] = message[:300]
    Job.objects.filter(pk=job_id).update(**fields)


def is_stopped(job_id: int) -> bool:
    """True when the job was cancelled or failed meanwhile (checked between batches)."""
    return Job.objects.filter(pk=job_id, status__in=[S.CANCELLED, S.FAILED]).exists()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def chunk_progress(job_id: int) -> tuple[int, int]:
    """(done, failed) summed over a job's chunks."""
    agg = JobChunk.objects.filter(job_id=job_id).aggregate(done=Sum("done"), failed=Sum("failed"))
    return int(agg["done"] or 0), int(agg["failed"] or 0)


def _fail_unsent(job_id: int, message: str) -> None:
    if transition(job_id, S.FAILED, expect=ACTIVE, error=message):
        add_log(job_id, message)


def send(job: Job) -> None:
    """Queue a job's task (by its kind's registered name) once the transaction
    commits; if the broker fails at that moment, the job fails with the reason."""
    kind = kind_of(job.kind)
    broker.send_after_commit(kind.task, kind.queue, Job, job.pk, lambda message: _fail_unsent(job.pk, message))


def send_chunk(chunk: JobChunk) -> None:
    """Queue one chunk's task once the transaction commits."""
    kind = kind_of(chunk.job.kind)
    if kind.chunk_task is None:
        raise JobError(f"job kind {kind.name!r} has no chunk task")
    broker.send_after_commit(kind.chunk_task, kind.queue, JobChunk, chunk.pk,
                             lambda message: _fail_unsent(chunk.job_id, message))


def _pk(value: Any) -> int | None:
    return None if value is None else int(getattr(value, "pk", value))


def working_on(*, datasets: Iterable[Any] = (), versions: Iterable[Any] = (), exclude: int | None = None) -> list[Job]:
    """The queued or running jobs whose dataset or model version is one of
    these (rows or ids), oldest first. Call it inside a transaction: the
    dataset and version rows are locked first (SELECT … FOR NO KEY UPDATE),
    so a job created or a row deleted by another transaction waits until this
    one commits, and the answer stays true until then.
    Raises TransactionManagementError outside a transaction."""
    dataset_ids = sorted({pk for pk in map(_pk, datasets) if pk is not None})
    version_ids = sorted({pk for pk in map(_pk, versions) if pk is not None})
    for field, ids in (("dataset", dataset_ids), ("model_version", version_ids)):
        # The target models through Job's foreign keys: the kernel imports no training module.
        target: Any = Job._meta.get_field(field).related_model
        list(target.objects.select_for_update(no_key=True).filter(pk__in=ids).order_by("pk").values_list("pk"))
    busy = Job.objects.filter(status__in=ACTIVE).filter(
        Q(dataset_id__in=dataset_ids) | Q(model_version_id__in=version_ids))
    if exclude is not None:
        busy = busy.exclude(pk=exclude)
    return list(busy.order_by("created", "pk"))


def describe(job: Job) -> str:
    """"job #12 (import, running)": how messages name a job."""
    return f"job #{job.pk} ({job.kind}, {job.status})"


@transaction.atomic
def create(kind: str, *, log: str, user: Any = None, **fields: Any) -> Job:
    """Create a job row of a registered kind, log its first line and queue it
    after commit (for a kind with chunks, the caller queues the chunks instead).

    Raises JobError when an exclusive job (see JobKind) is active on the new
    job's dataset or model version, or, for an exclusive kind, when any job is."""
    spec = kind_of(kind)
    for other in working_on(datasets=[fields.get("dataset", fields.get("dataset_id"))],
                            versions=[fields.get("model_version", fields.get("model_version_id"))]):
        other_kind = KINDS.get(other.kind)
        if spec.exclusive or (other_kind is not None and other_kind.exclusive):
            raise JobError(f"{describe(other)} is working on {other.dataset or other.model_version or 'it'}; "
                           f"wait for it to end or cancel job #{other.pk} first")
    job = Job.objects.create(kind=kind, created_by=user, **fields)
    add_log(job.pk, log)
    if spec.chunk_task is None:
        send(job)
    return job


# --- Cancel, re-run, recovery -----------------------------------------------------

def cancel(job: Job) -> bool:
    """Cancel a queued or running job (False when it had already ended). The
    worker notices between batches; queued chunks are cancelled too."""
    if not transition(job.pk, S.CANCELLED, expect=ACTIVE, message="cancelled"):
        return False
    JobChunk.objects.filter(job=job, status__in=ACTIVE).update(status=S.CANCELLED)
    add_log(job.pk, "cancelled")
    task_ids = [t for t in job.chunks.values_list("celery_task_id", flat=True) if t] + (
        [job.celery_task_id] if job.celery_task_id else [])
    broker.revoke(task_ids)
    return True


@transaction.atomic
def rerun(job: Job, *, check: bool = True) -> Job:
    """Queue a failed or cancelled job again (a kind's `requeue` decides how;
    an embedding job does only the missing work)."""
    kind = kind_of(job.kind)
    if check:
        check_workers(kind.queue)
    if not transition(job.pk, S.QUEUED, expect=[S.FAILED, S.CANCELLED], error="", message="queued again"):
        raise JobError(f"job #{job.pk} is {job.status}; only failed or cancelled jobs can be re-run")
    add_log(job.pk, "queued again")
    job.refresh_from_db()
    if kind.requeue is not None:
        kind.requeue(job)
        job.refresh_from_db()
    else:
        send(job)
    return job


def recover_stale() -> int:
    """Queue again the chunks and jobs whose worker stopped sending heartbeats
    (killed, host lost), and send again queued work whose message was lost
    (resend_lost). Safe to run from every worker at once. Returns how many."""
    return _requeue_dead() + resend_lost()


def worker_lost(task_name: str, row_id: int, reason: str, *, resend: bool) -> bool:
    """A worker's pool process died while running `task_name(row_id)` (killed,
    out of memory), as Celery's main worker process saw at once: queue the
    running job or chunk again, saying why on the job, instead of waiting
    CBIR_JOB_STALE_SECONDS for its heartbeat to go stale. Celery itself
    requeues the message (acks_late with reject_on_worker_lost); with
    `resend` this sends it again. Returns whether a row was queued again."""
    message = f"the worker process was lost ({reason}); queued again"
    for kind in KINDS.values():
        if task_name == kind.chunk_task:
            chunk = JobChunk.objects.select_related("job").filter(pk=row_id).first()
            if chunk is None or not JobChunk.objects.filter(pk=row_id, status=S.RUNNING).update(
                    status=S.QUEUED, heartbeat=timezone.now()):
                return False
            add_log(chunk.job_id, f"chunk {chunk.index}: {message}")
            if resend:
                send_chunk(chunk)
            return True
        if task_name == kind.task:
            if not transition(row_id, S.QUEUED, expect=[S.RUNNING], message=message[:300]):
                return False
            add_log(row_id, message)
            if resend:
                send(Job.objects.get(pk=row_id))
            return True
    return False


def resend_lost() -> int:
    """Send again the queued chunks and jobs (a whole job, or a split job's
    finishing step) that have waited CBIR_JOB_QUEUED_RESEND_SECONDS or more and
    whose task id the broker no longer holds, in a queue or delivered to a
    worker (Redis flushed, or restarted without its data). Returns how many.

    A message merely waiting behind a long task is still in the broker and is
    left alone. Should a resent message meet its original all the same, the
    claim (a conditional UPDATE from QUEUED) lets one run and the other finds
    the work taken and does nothing. Sends nothing when the broker cannot be
    listed (not Redis) or does not answer."""
    before = timezone.now() - timedelta(seconds=settings.CBIR_JOB_QUEUED_RESEND_SECONDS)
    # `heartbeat` of a queued row says since when it is queued (transition, queue_chunks);
    # rows queued before that was so fall back to their creation.
    chunks = list(JobChunk.objects.select_related("job").alias(since=Coalesce("heartbeat", "job__created")).filter(
        status=S.QUEUED, job__status__in=ACTIVE, since__lt=before))
    whole = [name for name, kind in KINDS.items() if kind.chunk_task is None]
    unfinished_chunks = JobChunk.objects.filter(job=OuterRef("pk")).exclude(status=S.SUCCEEDED)
    queued = list(Job.objects.alias(since=Coalesce("heartbeat", "created")).filter(
        status=S.QUEUED, since__lt=before, kind__in=list(KINDS)).filter(
        Q(kind__in=whole) | ~Exists(unfinished_chunks)))
    if not chunks and not queued:
        return 0
    try:
        waiting = broker.waiting_task_ids(queues())
    except broker.BrokerUnavailable as exc:
        logger.warning("cannot check for lost messages: %s", exc)
        return 0
    if waiting is None:
        return 0
    count = 0
    for chunk in chunks:
        count += _resend_if_lost(JobChunk, chunk, waiting, chunk.job_id, f"chunk {chunk.index}: queued "
                                 f"{_since(chunk.heartbeat or chunk.job.created)}", send_chunk)
    for job in queued:
        count += _resend_if_lost(Job, job, waiting, job.pk, f"queued {_since(job.heartbeat or job.created)}", send)
    return count


def _resend_if_lost(model: Any, row: Any, waiting: set[str], job_id: int, queued_for: str,
                    resend: Callable[[Any], Any]) -> int:
    """resend(row) if its task id is not among the broker's `waiting` ones and
    it is still QUEUED with the same heartbeat (the conditional UPDATE, which also
    restarts its queued-since clock, lets one recovery scan win); 1 if sent."""
    if row.celery_task_id and row.celery_task_id in waiting:
        return 0
    with transaction.atomic():
        if not model.objects.filter(pk=row.pk, status=S.QUEUED, heartbeat=row.heartbeat).update(
                heartbeat=timezone.now()):
            return 0
        add_log(job_id, f"{queued_for} and its message is no longer in the broker; sent again")
        resend(row)
    return 1


def _since(moment: Any) -> str:
    return f"for {int((timezone.now() - moment).total_seconds())} s"


def _requeue_dead() -> int:
    stale_before = timezone.now() - timedelta(seconds=settings.CBIR_JOB_STALE_SECONDS)
    count = 0
    for chunk in JobChunk.objects.select_related("job").filter(
            status=S.RUNNING, heartbeat__lt=stale_before, job__status__in=ACTIVE):
        with transaction.atomic():
            if JobChunk.objects.filter(pk=chunk.pk, status=S.RUNNING, heartbeat=chunk.heartbeat).update(
                    status=S.QUEUED, heartbeat=timezone.now()):
                add_log(chunk.job_id, f"chunk {chunk.index}: worker {chunk.worker} stopped answering; queued again")
                send_chunk(chunk)
                count += 1
    # Whole-job tasks, and finishing steps of split jobs (`claimed` set), whose
    # worker died; split jobs' chunks are recovered chunk by chunk above.
    whole = [name for name, kind in KINDS.items() if kind.chunk_task is None]
    for job in Job.objects.filter(status=S.RUNNING, heartbeat__lt=stale_before).filter(
            Q(kind__in=whole) | Q(claimed__isnull=False)):
        with transaction.atomic():
            if Job.objects.filter(pk=job.pk, status=S.RUNNING, heartbeat=job.heartbeat).update(
                    status=S.QUEUED, heartbeat=timezone.now()):
                add_log(job.pk, "the worker stopped answering; queued again (resumes from its last checkpoint)")
                send(job)
                count += 1
    return count


def heartbeat_interval() -> float:
    """Seconds between a running job's (or chunk's) heartbeats: a quarter of
    CBIR_JOB_STALE_SECONDS, from 0.5 to 30 s (search.runner's heartbeat thread)."""
    return max(0.5, min(30.0, settings.CBIR_JOB_STALE_SECONDS / 4))


def silence_warning(job: Job) -> str:
    """For a running job whose worker has missed two heartbeats and more (a
    whole worker killed, a host lost: no process is left to tell), the words
    the job page shows until recovery queues it again; else "". The freshest
    sign of life counts: the job's heartbeat or a running chunk's."""
    if job.status != S.RUNNING:
        return ""
    beats = [job.heartbeat, *JobChunk.objects.filter(job_id=job.pk, status=S.RUNNING).values_list(
        "heartbeat", flat=True)]
    last = max((beat for beat in beats if beat is not None), default=None)
    if last is None:
        return ""
    silent = (timezone.now() - last).total_seconds()
    if silent < 2 * heartbeat_interval() + 2:
        return ""
    return (f"no sign of life from its worker for {int(silent)} s: the worker may have been lost; it is "
            f"queued again once {settings.CBIR_JOB_STALE_SECONDS} s pass without one (CBIR_JOB_STALE_SECONDS)")


def active_job(kind: str, **filters: Any) -> Job | None:
    """The queued or running job of `kind` matching `filters`, if any."""
    return Job.objects.filter(kind=kind, status__in=ACTIVE, **filters).first()


def job_status(job: Job) -> dict:
    """The small JSON the job page polls."""
    job.refresh_from_db()
    if kind_of(job.kind).chunk_task and not job.is_finished and job.chunks.exclude(status=S.SUCCEEDED).exists():
        # While chunks run, progress is their sum; once all are done the job's
        # own row says what its finishing step (an index build) has reached.
        done, failed = chunk_progress(job.pk)
        job.progress_done = done + failed
    duration = job.duration
    return {
        "id": job.pk, "kind": job.kind, "status": job.status, "done": job.progress_done,
        "total": job.progress_total, "percent": round(job.percent, 1), "message": job.message,
        "error": job.error, "warning": silence_warning(job), "result": job.result, "log": job.log[-50:],
        "finished": job.is_finished,
        "duration_s": round(duration.total_seconds(), 1) if duration else None,
        "history": job.result.get("history") if isinstance(job.result, dict) else None,
    }


