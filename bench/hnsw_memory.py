"""How many bytes of maintenance_work_mem pgvector's HNSW graph takes per row.

    .venv/bin/python bench/hnsw_memory.py [--dims 1280,256] [--rows 8000] [--memory-mb 8,16] [--m 16]

For each dimension, loads `--rows` random vectors into a scratch table
(`bench_hnsw_memory`, dropped afterwards) as halfvec, then builds an HNSW
cosine index with each `--memory-mb` as maintenance_work_mem and no parallel
workers, and reads pgvector's notice "hnsw graph no longer fits into
maintenance_work_mem after N tuples": bytes per row = memory / N. These are
the figures behind search/hnsw.py's sizing rule (docs/scaling.md). The build
time printed is that of the (slow) over-memory build. About 2 minutes at the
defaults on 2 shared cores.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import numpy as np
from _common import emit, setup_django, table

NOTICE = re.compile(r"after (\d+) tuples")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="1280,256")
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--memory-mb", default="8,16")
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def run(args) -> dict:
    from pgvector import HalfVector

    from search.hnsw import graph_bytes
    from search.neighbours import adapted_connection

    conn = adapted_connection()
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    rows = []
    try:
        for dim in [int(d) for d in args.dims.split(",")]:
            conn.execute("DROP TABLE IF EXISTS bench_hnsw_memory")
            conn.execute("CREATE TABLE bench_hnsw_memory (id bigint, v halfvec)")
            vectors = np.random.default_rng(dim).normal(size=(args.rows, dim)).astype(np.float32)
            with conn.cursor().copy("COPY bench_hnsw_memory (id, v) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int8", "halfvec"])
                for i, v in enumerate(vectors):
                    copy.write_row([i, HalfVector(v)])
            for mb in [int(x) for x in args.memory_mb.split(",")]:
                notices.clear()
                conn.execute(f"SET maintenance_work_mem = '{mb}MB'")
                conn.execute("SET max_parallel_maintenance_workers = 0")
                start = time.perf_counter()
                conn.execute(f"CREATE INDEX bench_hnsw_memory_i ON bench_hnsw_memory USING hnsw "
                             f"((v::halfvec({dim})) halfvec_cosine_ops) WITH (m = {args.m})")
                seconds = time.perf_counter() - start
                conn.execute("DROP INDEX bench_hnsw_memory_i")
                found = [int(m.group(1)) for n in notices if (m := NOTICE.search(n))]
                fitted = found[0] if found else None
                rows.append({"dimension": dim, "memory_mb": mb, "rows_that_fit": fitted,
                             "bytes_per_row": round(mb * 2**20 / fitted) if fitted else None,
                             "rule_bytes_per_row": graph_bytes(1, dim, args.m), "seconds": round(seconds, 1)})
    finally:
        conn.execute("DROP TABLE IF EXISTS bench_hnsw_memory")
        conn.execute("RESET maintenance_work_mem")
        conn.execute("RESET max_parallel_maintenance_workers")
    return {"rows": args.rows, "m": args.m, "results": rows}


def print_report(r: dict) -> None:
    print(f"{r['rows']:,} random rows per dimension, m = {r['m']}, no parallel workers")
    print(table(["dimension", "maintenance_work_mem MB", "rows that fit", "bytes/row measured", "bytes/row rule",
                 "build s"],
                [[x["dimension"], x["memory_mb"], x["rows_that_fit"] or f"all {r['rows']:,}",
                  x["bytes_per_row"] or "-", x["rule_bytes_per_row"], x["seconds"]] for x in r["results"]]))


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_django()
    return emit(run(args), args.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
