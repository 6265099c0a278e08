"""The machine's memory and cores, and the PostgreSQL settings sized from them.

Read by the embedded PostgreSQL (cbirsite/embedded.py) and by the HNSW index
build (search/hnsw.py); docker-compose.yml passes the same settings as
`postgres -c` flags. The figures behind them are in docs/scaling.md."""

from __future__ import annotations

import os

MIB = 1024**2
GIB = 1024**3


def memory_bytes() -> int:
    """Physical memory of this machine in bytes (cgroup limits are not read)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 * GIB


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def megabytes(n_bytes: int) -> str:
    """A PostgreSQL memory setting in whole MB ('512MB')."""
    return f"{max(1, n_bytes // MIB)}MB"


def postgres_settings(memory: int | None = None, n_cores: int | None = None) -> dict[str, str]:
    """postgresql.conf settings for a server sharing the machine with the app.

    `memory`: bytes (default: this machine's); `n_cores`: cores (default: this
    machine's). shared_buffers is a quarter of memory (PostgreSQL's documented
    starting point) capped at 8 GB; effective_cache_size half (the rest belongs
    to web and worker processes); maintenance_work_mem a sixteenth, capped at
    2 GB (an HNSW build sets its own, sized from the rows: search/hnsw.py);
    parallel maintenance workers: one per core beyond the first, at most 8."""
    memory = memory_bytes() if memory is None else int(memory)
    n_cores = cores() if n_cores is None else int(n_cores)
    parallel = max(0, min(n_cores - 1, 8))
    return {
        "shared_buffers": megabytes(min(memory // 4, 8 * GIB)),
        "effective_cache_size": megabytes(memory // 2),
        "maintenance_work_mem": megabytes(max(64 * MIB, min(memory // 16, 2 * GIB))),
        "max_worker_processes": str(max(8, n_cores + 4)),
        "max_parallel_workers": str(max(2, n_cores)),
        "max_parallel_maintenance_workers": str(parallel),
    }
