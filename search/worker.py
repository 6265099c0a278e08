"""Hooks of the job kernel into a Celery worker's life cycle, connected from
SearchConfig.ready(): DataLoader processes in pool processes, the recovery
loop that re-queues work whose worker died (search.jobs.recover_stale), and
the request class (KernelRequest, every task's, see cbirsite/celery.py) that
re-queues at once the work of a pool process that died."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery.worker.request import Request
from django.conf import settings
from django.db import close_old_connections

from search import jobs

logger = logging.getLogger(__name__)


class KernelRequest(Request):
    """Celery's request, which lives in the worker's main process: when the
    pool process running the task dies (SIGKILL, the out-of-memory killer),
    Celery calls on_failure with WorkerLostError at once. Before Celery
    requeues the message, the job or chunk goes back to queued with the
    reason in its log (search.jobs.worker_lost), so the job page says so and
    the redelivered message can claim it."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]  # not in the stubs
        from celery.exceptions import WorkerLostError

        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        cancelled = getattr(self, "_already_cancelled", False) or getattr(self, "_already_revoked", False)
        # Billiard >= 4.3 may report the child's exit as SystemExit; Celery treats it as a lost worker too.
        lost = isinstance(exc, WorkerLostError) or (isinstance(exc, (SystemExit, KeyboardInterrupt)) and not cancelled)
        if lost and len(self.args or ()) == 1:
            try:
                close_old_connections()
                requeued = bool(self.task.acks_late and self.task.reject_on_worker_lost)
                jobs.worker_lost(self.task_name, int(self.args[0]), f"{type(exc).__name__}: {exc}",
                                 resend=not requeued)
            except Exception:  # noqa: BLE001 - the stale-heartbeat scan still recovers it
                logger.exception("could not record the lost worker of %s %s", self.task_name, self.args)
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


def allow_loader_processes(**kwargs: Any) -> None:
    """Celery's prefork pool runs tasks in daemonic processes, and Python forbids
    daemonic processes to start children, which a DataLoader with workers needs.
    The pool process is itself supervised by Celery, and PyTorch's loader
    workers exit when their parent dies, so lifting the flag is safe here."""
    import multiprocessing

    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]


_recovery_stop = threading.Event()
# Bounded clean-up steps of feature modules, run after each recovery scan (the
# kernel knows no feature: SearchConfig.ready registers them).
_housekeeping: list[Callable[[], object]] = []


def register_housekeeping(step: Callable[[], object]) -> None:
    """Run `step()` in every worker's recovery loop, every CBIR_RECOVERY_INTERVAL
    seconds, after the stale-job scan. It must be short and bounded; an
    exception is logged and the loop goes on."""
    if step not in _housekeeping:
        _housekeeping.append(step)


def _recovery_loop() -> None:
    while not _recovery_stop.wait(settings.CBIR_RECOVERY_INTERVAL):
        try:
            close_old_connections()
            count = jobs.recover_stale()
            if count:
                logger.warning("queued %d stale task(s) again", count)
            for step in _housekeeping:
                step()
        except Exception:  # noqa: BLE001 - the loop must outlive a database hiccup
            logger.exception("recovery scan failed; will retry")


def start_recovery(**kwargs: Any) -> None:
    _recovery_stop.clear()
    threading.Thread(target=_recovery_loop, name="cbir-recovery", daemon=True).start()


def stop_recovery(**kwargs: Any) -> None:
    _recovery_stop.set()


def connect_worker_signals() -> None:
    """Hook the kernel into Celery's worker life cycle (called from SearchConfig.ready)."""
    from celery.signals import worker_process_init, worker_ready, worker_shutdown

    worker_process_init.connect(allow_loader_processes, weak=False, dispatch_uid="cbir-loader-processes")
    worker_ready.connect(start_recovery, weak=False, dispatch_uid="cbir-recovery-start")
    worker_shutdown.connect(stop_recovery, weak=False, dispatch_uid="cbir-recovery-stop")
