"""Django's postgresql backend, starting the embedded server on first use.

Source: Django's "Subclassing the built-in database backends"
(https://docs.djangoproject.com/en/5.2/ref/databases/#subclassing-the-built-in-database-backends)."""

from __future__ import annotations

import threading

from django.db.backends.postgresql import base

_started = threading.Event()
_lock = threading.Lock()


def ensure_started() -> None:
    """Start or re-attach to the embedded PostgreSQL once per process (≈ 0.2 s
    when it already runs, ≈ 1 s the first time: initdb). Raises
    cbirsite.embedded.EmbeddedServiceError when the package is missing."""
    if _started.is_set():
        return
    with _lock:
        if not _started.is_set():
            from cbirsite import embedded

            embedded.postgres_url()
            _started.set()


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params):
        ensure_started()
        return super().get_new_connection(conn_params)
