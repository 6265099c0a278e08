"""Helpers shared by the benchmark scripts: Django setup, robust statistics,
plain-text tables. Benchmarks are run on demand and print figures; they are
not tests and assert nothing about speed."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def setup_django() -> None:
    """Configure Django the way manage.py does (attaching to the embedded
    PostgreSQL when DATABASE_URL is unset)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    # The embedded PostgreSQL package (via platformdirs) wants a runtime dir.
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cbirsite.settings")
    # Benchmarks send many searches from one address in-process: the per-client
    # limit (docs/security.md) would answer 429 part-way. Export it to measure it.
    os.environ.setdefault("CBIR_SEARCH_RATE_LIMIT", "0")
    import django

    django.setup()
    _require_migrated()


def _require_migrated() -> None:
    """Refuse to run on a database behind the code: deleting the scratch
    model version (or any query) would fail half-way on a missing table."""
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    if pending:
        names = ", ".join(f"{m.app_label}.{m.name}" for m, _ in pending)
        raise SystemExit(f"the database has unapplied migrations ({names}): run "
                         f".venv/bin/python manage.py migrate first")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown-compatible table, so output can be pasted into docs."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


class OtherLoad:
    """CPU time other processes used while a benchmark ran, in cores: the
    machine's busy time (/proc/stat) minus this process and its reaped
    children (DataLoader workers). The PostgreSQL backend serving the
    benchmark counts as 'other', a small share. Linux only; None elsewhere."""

    def __init__(self) -> None:
        self.start = self._snapshot()

    @staticmethod
    def _snapshot():
        import resource

        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / tick  # user nice system irq softirq
        steal = fields[7] / tick if len(fields) > 7 else 0.0
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        own = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        return time.monotonic(), busy, steal, own

    def cores(self) -> dict | None:
        end = self._snapshot()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        return {"other_processes": round(max(0.0, (end[1] - self.start[1]) - (end[3] - self.start[3])) / wall, 2),
                "steal": round((end[2] - self.start[2]) / wall, 2), "seconds": round(wall, 1)}


def busy_warning(load: dict | None, threshold: float = 0.2) -> str | None:
    if load and (load["other_processes"] > threshold or load["steal"] > threshold):
        return (f"other processes used {load['other_processes']} cores on average during the run "
                f"(hypervisor steal {load['steal']}): the figures are unreliable; run again when the machine is quiet")
    return None


ENV_ECHO = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "MALLOC_MMAP_MAX_",
            "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD", "CBIR_LOADER_WORKERS", "CBIR_EMBED_BATCH_SIZE", "CBIR_DEVICE")


def machine_info() -> dict:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.cuda.is_available(),
        # Settings read at process start that change CPU inference speed.
        "environment": {name: os.environ[name] for name in ENV_ECHO if name in os.environ},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def emit(report: dict, as_json: bool, print_report) -> int:
    """Print a benchmark's report as JSON or as its readable table; exit status 0."""
    import json
    import sys

    if as_json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_report(report)
    return 0
