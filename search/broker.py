"""The broker side of the job kernel: is a worker there, send a task by name
after commit, revoke. Knows no job kind and no row but the one it is given."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from django.conf import settings
from django.db import models, transaction

logger = logging.getLogger(__name__)


class BrokerUnavailable(Exception):
    """No broker or no worker: a job started now would wait forever."""


def reset_broker_connections() -> None:
    """Forget pooled broker connections (they break when Redis restarts)."""
    from cbirsite.celery import app

    app.pool.force_close_all()  # type: ignore[attr-defined]
    app.amqp._producer_pool = None  # type: ignore[attr-defined]


def _active_queues(timeout: float) -> dict:
    from cbirsite.celery import app

    with app.connection_for_write() as conn:
        return app.control.inspect(timeout=timeout, connection=conn).active_queues() or {}


def check_workers(queue: str, *, all_queues: Iterable[str] = ()) -> None:
    """Raise JobsUnavailable unless the broker answers and a worker consumes
    `queue` (waiting CBIR_WORKER_PING_TIMEOUT seconds for replies). The
    message names the command that starts a worker for `all_queues`."""
    from cbirsite.celery import app

    broker = app.conf.broker_url
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds
        raise BrokerUnavailable(
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
            raise BrokerUnavailable(f"cannot ask the workers which queues they serve ({exc})") from None
    serving = [name for name, queues in replies.items() if any(q.get("name") == queue for q in queues or [])]
    if not serving:
        raise BrokerUnavailable(
            f"no Celery worker is consuming the {queue!r} queue, so the job would wait forever; start one: "
            f"celery -A cbirsite worker -Q {','.join(sorted(set(all_queues) | {queue}))}"
        )


def send_after_commit(task_name: str, queue: str, row_model: type[models.Model], row_id: int,
                      on_failure: Callable[[str], None]) -> None:
    """Send `task_name(row_id)` to `queue` once the current transaction commits,
    and store the Celery task id on the row; if the broker fails at that moment
    (after a retry on a fresh connection), call on_failure(message)."""
    from cbirsite.celery import app

    def send() -> None:
        policy = {"max_retries": 2, "interval_start": 0.2}
        try:
            try:
                result = app.send_task(task_name, args=[row_id], queue=queue, retry=True, retry_policy=policy)
            except Exception:  # noqa: BLE001 - stale pooled connection: once more, fresh
                reset_broker_connections()
                result = app.send_task(task_name, args=[row_id], queue=queue, retry=True, retry_policy=policy)
        except Exception as exc:  # noqa: BLE001
            message = f"could not hand the job to the broker: {exc}"
            logger.error("%s %s: %s", row_model.__name__, row_id, message)
            on_failure(message)
            return
        row_model._default_manager.filter(pk=row_id).update(celery_task_id=result.id)

    transaction.on_commit(send)


def revoke(task_ids: list[str]) -> None:
    """Ask workers to drop these tasks. An optimisation only: a cancelled job's
    task finds its row cancelled when it starts, and stops."""
    from cbirsite.celery import app

    try:
        if task_ids:
            app.control.revoke(task_ids)
    except Exception:  # noqa: BLE001 - the claim check is what stops work
        pass
