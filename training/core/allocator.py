"""Which glibc malloc behaviour this process runs with.

On the CPU, a forward pass at batch 32 frees activation buffers larger than
glibc's largest mmap threshold (32 MiB); by default each is handed back to the
kernel and the next batch maps and page-faults it in again: about 40 % of the
forward pass's CPU time is the kernel zeroing pages (docs/benchmarks.md).
This system therefore runs with

    MALLOC_MMAP_MAX_=0                  (glibc tunable glibc.malloc.mmap_max)
    MALLOC_TRIM_THRESHOLD_=2147483647   (glibc.malloc.trim_threshold, 2 GiB)

which keep freed memory in the heap for the next batch, in two ways:

- every process started by scripts/cbir, the Docker image and
  docker-compose.yml gets them in its environment (glibc reads them at start);
- every process that runs a network applies the same values itself at
  start-up with mallopt(3) (`apply_in_process`): every Django process
  (training/apps.py: web, workers, `manage.py` commands, tests), a
  distributed training rank (training/core/rank.py), and any process that
  loads a network (training.core.inference, e.g. a notebook). mallopt's
  M_MMAP_MAX and M_TRIM_THRESHOLD are the same parameters as the two
  variables (glibc manual, "Malloc Tunable Parameters"), so a systemd unit
  or a shell that never saw scripts/cbir runs as fast.

A value the operator set in the environment (either variable, or
glibc.malloc.* in GLIBC_TUNABLES) wins: then nothing is changed.
`glibc_malloc_probe` reads the effect back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

# The environment the processes are started with (scripts/cbir, Dockerfile,
# docker-compose.yml); a value already in the environment wins.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}
PROBE_BYTES = 64 * 1024 * 1024  # above glibc's largest dynamic mmap threshold (32 MiB on 64-bit)
# mallopt(3) parameter numbers, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4

_applied: str | None = None
_lock = threading.Lock()


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def apply_in_process(environ: dict | None = None) -> str:
    """Give this process the allocator setting of MALLOC_ENV with mallopt(3),
    once (later calls return the first answer). `environ`: the environment to
    judge (os.environ by default). Returns what happened, for logs:
    "applied" (mallopt accepted both values), "environment" (the operator
    set MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_ or glibc.malloc tunables:
    left as set), or "unavailable" (not glibc, or mallopt refused).
    Never raises."""
    global _applied
    with _lock:
        if _applied is not None:
            return _applied
        env = os.environ if environ is None else environ
        if any(name in env for name in MALLOC_ENV) or "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
            _applied = "environment"
            return _applied
        libc = _libc()
        try:
            ok = libc is not None and bool(libc.mallopt(M_MMAP_MAX, int(MALLOC_ENV["MALLOC_MMAP_MAX_"]))) and \
                bool(libc.mallopt(M_TRIM_THRESHOLD, int(MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"])))
        except AttributeError:  # a C library without mallopt
            ok = False
        _applied = "applied" if ok else "unavailable"
        return _applied


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def glibc_malloc_probe() -> dict | None:
    """Allocate and free one 64 MiB block with the C library's malloc and
    report what glibc did with it, read back with mallinfo2 (glibc ≥ 2.33).

    Returns None when the C library is not glibc ≥ 2.33, else a dict:
    ``large_blocks_mmapped`` (bool: the block came from mmap, i.e. it would
    be returned to the kernel on free: the default), ``freed_heap_bytes`` (int,
    bytes: free memory left in the heap after the free), ``keeps_freed_memory``
    (bool: the block was served from the heap and is still there after free:
    the tuned setting in effect).
    """
    libc = _libc()
    if libc is None:
        return None
    try:
        mallinfo2 = libc.mallinfo2
    except AttributeError:
        return None
    mallinfo2.restype = _Mallinfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
    before = mallinfo2()
    block = libc.malloc(PROBE_BYTES)
    if not block:
        return None
    during = mallinfo2()
    libc.free(block)
    after = mallinfo2()
    mmapped = during.hblks > before.hblks
    return {"large_blocks_mmapped": mmapped, "freed_heap_bytes": int(after.fordblks),
            "keeps_freed_memory": not mmapped and after.fordblks >= PROBE_BYTES}
