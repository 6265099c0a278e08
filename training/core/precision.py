"""Mixed precision: which dtype a forward pass autocasts to, on which device.

The one place for it: training (training.core.loop), validation, the
feature cache (training.core.features) and inference
(training.core.inference: searches, embed jobs, evaluation, calibration)
all use `autocast_dtype` and `autocast`.

- CUDA: bfloat16 on GPUs that support it, float16 (with a GradScaler) on
  older ones.
- CPU: bfloat16 where the CPU computes it natively, float32 elsewhere,
  chosen by CBIR_CPU_PRECISION (training.core.runtime):
  "auto" (the default) uses bfloat16 when the CPU has AMX (`amx_bf16`) or
  AVX-512 BF16 (`avx512_bf16`) and float32 otherwise; "float32" never
  autocasts; "bfloat16" always does (on a CPU without either, oneDNN
  emulates it, slower than float32: for measuring only).
  Weights, the optimiser and the returned embeddings stay float32; only the
  matrix products and convolutions run in bfloat16. Measured agreement and
  speed per architecture: docs/benchmarks.md ("bfloat16 on the CPU").
- Other devices (mps, ...): float32.

Source: PyTorch, "Automatic Mixed Precision package - torch.amp"
(https://pytorch.org/docs/stable/amp.html; CPU autocast supports bfloat16
and float16); Intel, "Accelerate PyTorch with AMX and AVX-512 BF16"
(the flags oneDNN dispatches bfloat16 kernels on).
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch

from training.core import runtime

CPU_PRECISIONS = ("auto", "float32", "bfloat16")
# CPU flags (as /proc/cpuinfo spells them) with native bfloat16 matrix kernels, best first.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags: the `flags` line of /proc/cpuinfo (Linux), or
    of `cpuinfo` (its text) when given. Empty when there is none (another
    system): then `cpu_bfloat16_support` asks PyTorch instead."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_bfloat16_support(flags: frozenset[str] | None = None) -> str | None:
    """Which native bfloat16 instructions this CPU has: "amx_bf16",
    "avx512_bf16", or None. `flags`: a set of CPU flags to judge instead of
    this machine's (tests). Without a flags line (not Linux), PyTorch's own
    probes (torch.cpu._is_amx_tile_supported / _is_avx512_bf16_supported)."""
    if flags is None:
        return _this_cpu_bfloat16_support()
    return next((flag for flag in BF16_FLAGS if flag in flags), None)


@lru_cache(maxsize=1)
def _this_cpu_bfloat16_support() -> str | None:
    flags = cpu_flags()
    if flags:
        return cpu_bfloat16_support(flags)
    probes = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    for flag, probe in probes:
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return flag
    return None


def cpu_autocast_dtype(setting: str | None = None, flags: frozenset[str] | None = None) -> torch.dtype | None:
    """bfloat16 or None (float32) for the CPU under `setting` (CBIR_CPU_PRECISION
    when None) on this CPU (or one with `flags`). Raises ValueError for a
    setting other than auto, float32, bfloat16."""
    setting = (setting or runtime.current().cpu_precision).strip().lower()
    if setting not in CPU_PRECISIONS:
        raise ValueError(f"CBIR_CPU_PRECISION must be one of {', '.join(CPU_PRECISIONS)}, not {setting!r}")
    if setting == "float32":
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if cpu_bfloat16_support(flags) else None


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for `device`: on CUDA bfloat16 where supported,
    else float16; on the CPU cpu_autocast_dtype(); None (plain float32) elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return cpu_autocast_dtype()
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """"bfloat16", "float16" or "float32" (None): how a model version records it."""
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32") if dtype else "float32"


def mixed_precision(device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """(autocast dtype, scaler) for training on `device`: a GradScaler only for
    float16 on CUDA (bfloat16 has float32's exponent range and needs none)."""
    dtype = autocast_dtype(device)
    return dtype, torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to `dtype` on CUDA or the CPU; a no-op context when
    dtype is None or on another device. The one autocast helper."""
    if dtype is not None and device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()
