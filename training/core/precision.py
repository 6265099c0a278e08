"""Mixed precision: which dtype a forward pass autocasts to, on which device.

The one place for it: training (training.core.loop), validation and
inference (training.core.inference) all use `autocast`.

Used only on CUDA today: autocast to bfloat16 on GPUs that support it,
float16 (with a GradScaler) on older ones; float32 elsewhere.
Source: PyTorch, "Automatic Mixed Precision package - torch.amp"
(https://pytorch.org/docs/stable/amp.html).
"""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for `device`: bfloat16 on GPUs that support it,
    float16 on older GPUs, None (plain float32) off CUDA."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def mixed_precision(device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """(autocast dtype, scaler) for training on `device`: a GradScaler only for float16."""
    dtype = autocast_dtype(device)
    return dtype, torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to `dtype` on CUDA; a no-op context elsewhere or when dtype is None.
    The one autocast helper: training, validation and inference use it."""
    if device.type == "cuda" and dtype is not None:
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()
