"""Hooks of the job kernel into a Celery worker's life cycle, connected from
SearchConfig.ready(): DataLoader processes in pool processes, and the
recovery loop that re-queues work whose worker died (search.jobs.recover_stale)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from django.conf import settings
from django.db import close_old_connections

from search import jobs

logger = logging.getLogger(__name__)
def allow_loader_processes(**kwargs: Any) -> None:
    """Celery's prefork pool runs tasks in daemonic processes, and Python forbids
    daemonic processes to start children, which a DataLoader with workers needs.
    The pool process is itself supervised by Celery, and PyTorch's loader
    workers exit when their parent dies, so lifting the flag is safe here."""
    import multiprocessing

    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]


_recovery_stop = threading.Event()


def _recovery_loop() -> None:
    while not _recovery_stop.wait(settings.CBIR_RECOVERY_INTERVAL):
        try:
            close_old_connections()
            count = jobs.recover_stale()
            if count:
                logger.warning("queued %d stale task(s) again", count)
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
