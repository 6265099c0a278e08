"""Database routing: search reads to a read replica when one is configured.

`search.neighbours` builds its querysets with
`Model.objects.db_manager(hints={SEARCH_HINT: True})`; Django hands the
hints to every router's `db_for_read`. With `DATABASE_REPLICA_URL` set,
settings define the `replica` alias and these reads go there (a streaming
replica of the primary: docs/scaling.md); everything else, and every write,
stays on `default`. Without it the router says nothing and Django uses `default`.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

SEARCH_HINT = "cbir_search"
REPLICA = "replica"


class SearchReplicaRouter:
    """Sends reads marked with the SEARCH_HINT to the `replica` alias when DATABASES has it."""

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        if hints.get(SEARCH_HINT) and REPLICA in settings.DATABASES:
            return REPLICA
        return None

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return None  # writes always go to the primary

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        # A replica holds the primary's rows: objects read from either may be related.
        dbs = {obj1._state.db, obj2._state.db}
        return True if dbs <= {"default", REPLICA} else None

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        return False if db == REPLICA else None  # a replica follows the primary's schema
