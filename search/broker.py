"""The broker side of the job kernel: is a worker there, send a task by name
after commit, revoke. Knows no job kind and no row but the one it is given."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

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


def waiting_task_ids(queues: Iterable[str]) -> set[str] | None:
    """The ids of the tasks the broker holds for `queues`: waiting in a queue
    (every priority level) or delivered to a worker and not yet acknowledged
    (with acks_late, until the task ends). None when the transport cannot be
    listed (not Redis). Raises BrokerUnavailable when the broker does not answer.

    Reads kombu's Redis layout (one list per queue and priority, the "unacked"
    hash); the messages are JSON with the task id in headers["id"]."""
    from cbirsite.celery import app

    try:
        with app.connection_for_write() as conn:
            channel: Any = conn.default_channel
            client = getattr(channel, "client", None)
            if client is None or not hasattr(channel, "_q_for_pri"):
                return None
            raw: list[Any] = []
            for queue in queues:
                for priority in channel.priority_steps:
                    raw.extend(client.lrange(channel._q_for_pri(queue, priority), 0, -1))
            raw.extend(json.loads(entry)[0] for entry in client.hvals(channel.unacked_key))
    except Exception as exc:  # noqa: BLE001 - kombu and redis raise many kinds
        raise BrokerUnavailable(f"cannot list the broker's queues ({exc})") from None
    ids: set[str] = set()
    for item in raw:
        message = json.loads(item) if isinstance(item, (str, bytes)) else item
        task_id = (message.get("headers") or {}).get("id") or (message.get("properties") or {}).get("correlation_id")
        if task_id:
            ids.add(str(task_id))
    return ids


def revoke(task_ids: list[str]) -> None:
    """Ask workers to drop these tasks. An optimisation only: a cancelled job's
    task finds its row cancelled when it starts, and stops."""
    from cbirsite.celery import app

    try:
        if task_ids:
            app.control.revoke(task_ids)
    except Exception:  # noqa: BLE001 - the claim check is what stops work
        pass
