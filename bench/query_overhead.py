"""Where an unfiltered search's milliseconds go: the server's execution, the
statement's round trip, and our own Python around it.

    .venv/bin/python bench/query_overhead.py --version NAME [--queries 60] [--k 10]
        [--ef-search 200] [--seed 0] [--json]

Queries are stored vectors of the version (rows drawn at random with
`--seed`), each searched without a filter through the project's own path,
`search.neighbours.fetch(neighbours_queryset(...))`, and timed three ways:

  call      wall time of the whole call (query building, Django's SQL
            compilation, the transaction with its SET LOCALs, the statement,
            the rows turned into hits): what bench/scale.py reports
  statement the statement's execute + fetch as fetch() reports it (sent in
            binary, one round trip)
  server    PostgreSQL's own "Planning Time" + "Execution Time" of the same
            statement with the same settings, from EXPLAIN (ANALYZE) run
            right after it (also shown apart: planning, execution); its
            per-node timing adds a little to "server", so the protocol's
            share below is if anything understated

so call − statement is our Python's share and statement − server the
protocol's (round trip, binding, rows). Every query runs once untimed first
("first pass", reported as its call time), so that the timed call and the
EXPLAIN that follows it find the same pages in memory: the breakdown is of a
query whose pages are cached, the floor of a fresh query's cost. A stored
vector finds itself first; the walk's cost is that of a fresh query's.
Medians and p95 in milliseconds; compare within one run.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import numpy as np
from _common import OtherLoad, busy_warning, emit, median, percentile, setup_django, table


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", required=True, help="model version name (its index must exist)")
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--ef-search", type=int, default=None,
                        help="default: the breadth the version's searches use (search.neighbours.ef_search_for)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def server_ms(plan: str) -> tuple[float, float]:
    """(planning, execution) milliseconds from an EXPLAIN ANALYZE."""
    times = []
    for what in ("Planning", "Execution"):
        found = re.search(rf"{what} Time: ([0-9.]+) ms", plan)
        if found is None:
            raise ValueError(f"no {what} Time in the plan")
        times.append(float(found.group(1)))
    return times[0], times[1]


def run(args) -> dict:
    from django.test import override_settings

    from search.hnsw import VALID, index_state
    from search.models import Embedding
    from search.neighbours import ef_search_for, explain, fetch, neighbours_queryset
    from training.models import ModelVersion

    version = ModelVersion.objects.filter(name=args.version).first()
    if version is None:
        raise SystemExit(f"no model version named {args.version!r}")
    if index_state(version) != VALID:
        raise SystemExit(f"{version.name} has no valid HNSW index: build it first")
    ef = args.ef_search or ef_search_for(args.k, version)  # the version's calibrated breadth by default
    ids = np.array(Embedding.objects.filter(model_version=version).order_by("pk").values_list("pk", flat=True))
    total = len(ids)
    chosen = np.random.default_rng(args.seed).choice(ids, size=min(total, args.queries + 5), replace=False)
    vectors = [np.asarray(v, dtype=np.float32) for v in
               Embedding.objects.filter(pk__in=chosen.tolist()).order_by("pk").values_list("vector", flat=True)]
    meter = OtherLoad()
    calls, statements, servers, planning, execution, first = [], [], [], [], [], []
    with override_settings(CBIR_HNSW_EF_SEARCH=ef):
        for vector in vectors:
            start = time.perf_counter()
            fetch(neighbours_queryset(version, vector=vector), args.k)
            first.append(1000 * (time.perf_counter() - start))
        for i, vector in enumerate(vectors):
            start = time.perf_counter()
            _, statement = fetch(neighbours_queryset(version, vector=vector), args.k)
            call = time.perf_counter() - start
            plan, execute = server_ms(explain(neighbours_queryset(version, vector=vector), args.k, analyze=True))
            if i >= 5:  # the first five warm the connection and the cache
                calls.append(1000 * call)
                statements.append(1000 * statement)
                servers.append(plan + execute)
                planning.append(plan)
                execution.append(execute)
    stages = {"first pass: call": first[5:], "call": calls, "statement": statements, "server": servers,
              "server: planning": planning, "server: execution": execution}
    return {"version": version.name, "rows": total, "queries": len(calls), "k": args.k, "ef_search": ef,
            "ms": {name: {"p50": round(median(v), 2), "p95": round(percentile(v, 95), 2)}
                   for name, v in stages.items()},
            "python_share_p50": round(median(list(np.subtract(calls, statements))), 2),
            "protocol_share_p50": round(median(list(np.subtract(statements, servers))), 2),
            "machine_load": meter.cores()}


def print_report(r: dict) -> None:
    print(f"{r['version']}: {r['rows']:,} rows, {r['queries']} unfiltered queries (stored vectors), "
          f"k = {r['k']}, ef_search = {r['ef_search']}")
    print(table(["stage", "p50 ms", "p95 ms"], [[n, v["p50"], v["p95"]] for n, v in r["ms"].items()]))
    print(f"medians of the differences: our Python (call - statement) {r['python_share_p50']} ms, "
          f"protocol (statement - server) {r['protocol_share_p50']} ms")
    print(f"machine load: {r['machine_load']}")
    warning = busy_warning(r["machine_load"])
    if warning:
        print("WARNING:", warning)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_django()
    return emit(run(args), args.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
