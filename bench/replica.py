"""Search on a read replica: the router sends it there, and it answers as the primary does.

    DATABASE_REPLICA_URL=postgresql://… .venv/bin/python bench/replica.py [--version NAME] [--dataset NAME]
        [--queries 20] [--k 10]

Needs DATABASE_REPLICA_URL (a streaming replica of DATABASE_URL's server:
docs/scaling.md says how to make one of the embedded server). Checks that the
replica is in recovery and has the primary's rows, then runs `--queries`
random query vectors through search.neighbours (unfiltered, and filtered to
`--dataset` when given), once where the router sends them (the replica) and
once on the primary, and prints how many top-k lists were identical and the
median statement time on each.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from _common import emit, median, setup_django


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=None, help="model version name (default: the active one)")
    parser.add_argument("--dataset", default=None, help="also search filtered to this dataset")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def run(args) -> dict:
    from django.conf import settings
    from django.db import connections

    from cbirsite.routers import REPLICA
    from search.models import Dataset
    from search.neighbours import fetch, neighbours_queryset
    from training.models import ModelVersion

    if REPLICA not in settings.DATABASES:
        raise SystemExit("set DATABASE_REPLICA_URL to a streaming replica of the primary")
    version = (ModelVersion.objects.get(name=args.version) if args.version else ModelVersion.active())
    if version is None:
        raise SystemExit("no active model version: give --version")
    dataset = Dataset.objects.get(name=args.dataset) if args.dataset else None
    state = {}
    for alias in ("default", REPLICA):
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT pg_is_in_recovery(), count(*) FROM search_embedding WHERE model_version_id = %s",
                           [version.pk])
            state[alias] = cursor.fetchone()
    rng = np.random.default_rng(0)
    same = total = 0
    seconds: dict[str, list[float]] = {"default": [], REPLICA: []}
    for _ in range(args.queries):
        q = rng.normal(size=int(version.dimension))
        for filtered in ([None, dataset] if dataset else [None]):
            queryset = neighbours_queryset(version, vector=q, dataset=filtered)
            routed = queryset.db
            on_replica, s_replica = fetch(queryset, args.k)
            on_primary, s_primary = fetch(queryset.using("default"), args.k)
            seconds[routed].append(s_replica)
            seconds["default"].append(s_primary)
            same += [h.image_id for h in on_replica] == [h.image_id for h in on_primary]
            total += 1
    return {"version": version.name, "routed_to": routed, "primary_in_recovery": state["default"][0],
            "replica_in_recovery": state[REPLICA][0], "rows_primary": state["default"][1],
            "rows_replica": state[REPLICA][1], "identical": same, "compared": total,
            "median_ms": {alias: round(1000 * median(v), 2) for alias, v in seconds.items()}}


def print_report(r: dict) -> None:
    print(f"{r['version']}: primary in recovery {r['primary_in_recovery']}, {r['rows_primary']:,} rows; "
          f"replica in recovery {r['replica_in_recovery']}, {r['rows_replica']:,} rows")
    print(f"search queries routed to: {r['routed_to']}; identical top k on both: {r['identical']}/{r['compared']}; "
          f"median statement ms: {r['median_ms']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_django()
    return emit(run(args), args.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
