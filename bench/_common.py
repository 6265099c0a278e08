"""Helpers shared by the benchmark scripts: Django setup, robust statistics,
plain-text tables. Benchmarks are run on demand and print figures; they are
not tests and assert nothing about speed."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent


def setup_django() -> None:
    """Configure Django the way manage.py does (attaching to the embedded
    PostgreSQL when DATABASE_URL is unset)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    # The embedded PostgreSQL package (via platformdirs) wants a runtime dir.
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cbirsite.settings")
    import django

    django.setup()


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


def cpu_pressure() -> float | None:
    """Share of the last 10 s in which some runnable task waited for a CPU
    (Linux PSI), in percent: a rough 'was the machine busy' label."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None
    fields = dict(part.split("=") for part in line.split()[1:])
    return float(fields.get("avg10", "nan"))


def machine_info() -> dict:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.cuda.is_available(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu_pressure_avg10_pct": cpu_pressure(),
    }
