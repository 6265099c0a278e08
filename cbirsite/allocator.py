"""Which glibc malloc behaviour this process runs with.

On the CPU, a forward pass at batch 32 frees activation buffers larger than
glibc's largest mmap threshold (32 MiB); by default each is handed back to the
kernel and the next batch maps and page-faults it in again: about 40 % of the
forward pass's CPU time is the kernel zeroing pages (docs/benchmarks.md).
Every process started by scripts/cbir, the Docker image and docker-compose.yml
therefore run with

    MALLOC_MMAP_MAX_=0                  (glibc tunable glibc.malloc.mmap_max)
    MALLOC_TRIM_THRESHOLD_=2147483647   (glibc.malloc.trim_threshold, 2 GiB)

which keep freed memory in the heap for the next batch. glibc reads them once,
at process start, so they must be in the environment of the process, not set
from Python. `glibc_malloc_probe` reads the effect back.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# The environment the processes are started with (scripts/cbir, Dockerfile,
# docker-compose.yml); a value already in the environment wins.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}
PROBE_BYTES = 64 * 1024 * 1024  # above glibc's largest dynamic mmap threshold (32 MiB on 64-bit)


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
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
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
