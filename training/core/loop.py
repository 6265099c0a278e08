"""Training loop functions with explicit arguments, after torchvision's
references/classification/train.py.

Convention: `loss_fn(model, batch, device) -> scalar tensor`. Each objective
(training.core.objectives) moves its batch to `device`; the caller moves the model
and the objective (when it has parameters) to `device` before building the
optimizer.

Mixed precision: training.core.precision (autocast, mixed_precision).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.core.precision import autocast

LossFn = Callable[[nn.Module, Any, torch.device], torch.Tensor]
Reduce = Callable[[float, int], tuple[float, int]]  # (loss total, images) of this process → of all processes
CHECKPOINT_FORMAT = 1
# The history key of the validation P@10 when a run keeps the epoch that retrieves best (fit's `val_precision`).
VAL_PRECISION = "val_precision_at_10"


def best_epoch(history: list[dict]) -> tuple[int, float]:
    """(epoch, val loss) of the epoch to keep, the earliest on ties; (0, inf) when none qualifies.

    The epoch with the lowest finite validation loss (the study's protocol),
    or, when the history records a validation P@10 (key VAL_PRECISION: fit
    was given `val_precision`), the epoch with the highest one. The one rule:
    fit's best.pt, early stopping's patience, resuming and the published
    version's "best_epoch" all read it."""
    if any(VAL_PRECISION in h for h in history):
        scored = [h for h in history if math.isfinite(h.get(VAL_PRECISION, math.nan)) and math.isfinite(h["val_loss"])]
        if not scored:
            return 0, math.inf
        best = max(scored, key=lambda h: (h[VAL_PRECISION], -h["epoch"]))
        return best["epoch"], best["val_loss"]
    finite = [h for h in history if math.isfinite(h["val_loss"])]
    if not finite:
        return 0, math.inf
    best = min(finite, key=lambda h: (h["val_loss"], h["epoch"]))
    return best["epoch"], best["val_loss"]


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite; training cannot continue meaningfully."""


def _batch_size(batch: Any) -> int:
    """Images in a batch: the first dimension of the batch's first tensor."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) else 1


def _set_mode(model: nn.Module, loss_fn: LossFn, training: bool) -> None:
    model.train(training)
    if isinstance(loss_fn, nn.Module):
        loss_fn.train(training)


def train_one_epoch(model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, loader: Iterable,
                    device: torch.device, *, scaler: torch.amp.GradScaler | None = None,
                    autocast_dtype: torch.dtype | None = None,
                    on_batch: Callable[[int, int, float], None] | None = None,
                    reduce: Reduce | None = None) -> float:
    """One pass over `loader`; returns the mean training loss per image
    (batch losses weighted by batch size). In a distributed run, `reduce`
    sums (loss total, image count) over the processes first, so every process
    returns the mean over the whole global epoch.

    on_batch(batch_index, n_batches, loss) is called after every step (for
    progress reports; an exception raised there, e.g. on cancellation, stops
    training). Raises NonFiniteLoss when the loss becomes NaN or infinite.
    """
    device = torch.device(device)
    _set_mode(model, loss_fn, True)
    n_batches = len(loader)  # type: ignore[arg-type]
    total, count = 0.0, 0
    for batch_index, batch in enumerate(loader):
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, autocast_dtype):
            loss = loss_fn(model, batch, device)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLoss(f"the training loss became {value} at batch {batch_index + 1} of {n_batches}; "
                                "try a lower learning rate")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        size = _batch_size(batch)
        total += value * size
        count += size
        if on_batch is not None:
            on_batch(batch_index, n_batches, value)
    if reduce is not None:
        total, count = reduce(total, count)
    if count == 0:
        raise ValueError("the training loader yielded no batches")
    return total / count


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, loader: Iterable, device: torch.device,
             autocast_dtype: torch.dtype | None = None) -> float:
    """Mean loss per image over `loader`, in eval mode, without gradients."""
    device = torch.device(device)
    _set_mode(model, loss_fn, False)
    total, count = 0.0, 0
    for batch in loader:
        with autocast(device, autocast_dtype):
            loss = loss_fn(model, batch, device)
        size = _batch_size(batch)
        total += float(loss) * size
        count += size
    if count == 0:
        raise ValueError("the validation loader yielded no batches")
    return total / count


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    epoch: int, config: dict, best_val_loss: float, history: list[dict], *,
                    objective: nn.Module | None = None) -> None:
    """Write a checkpoint atomically (temporary file in the same folder, then
    os.replace), so a crash never leaves a half-written file under `path`.

    Holds: "format", "model" (state dict), "optimizer" (state dict or None),
    "epoch" (epochs completed), "config", "best_val_loss", "history" and,
    when `objective` is given (e.g. a ClassificationObjective's head),
    "objective" (its state dict). config and history must hold plain Python
    values (they are loaded with weights_only=True).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": int(epoch),
        "config": config,
        "best_val_loss": float(best_val_loss),
        "history": history,
    }
    if objective is not None:
        checkpoint["objective"] = objective.state_dict()
    save_atomically(checkpoint, path)


def save_atomically(obj: dict, path: str | os.PathLike[str]) -> None:
    """torch.save through a temporary file in the same folder and os.replace:
    readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def load_checkpoint(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, objective: nn.Module | None = None) -> dict:
    """Restore weights (and optimizer / objective state when given) from a
    save_checkpoint file; returns the whole checkpoint dict (epoch, config,
    best_val_loss, history ...). Tensors are loaded to the CPU and copied onto
    the model's and optimizer's devices by load_state_dict."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a training checkpoint of format {CHECKPOINT_FORMAT}")
    model.load_state_dict(checkpoint["model"])
    if optimizer is not None:
        if checkpoint["optimizer"] is None:
            raise ValueError(f"{path} holds no optimizer state")
        optimizer.load_state_dict(checkpoint["optimizer"])
    if objective is not None and "objective" in checkpoint:
        objective.load_state_dict(checkpoint["objective"])
    return checkpoint


def _set_epoch(loader: Any, epoch: int) -> None:
    """Tell epoch-aware samplers (PKSampler, DistributedSampler) which epoch this is."""
    for sampler in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        set_epoch = getattr(sampler, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)


def fit(model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, train_loader: Iterable | None,
        val_loader: Iterable | None, device: torch.device, *, epochs: int, checkpoint_dir: str | os.PathLike[str],
        config: dict, start_epoch: int = 0, history: list[dict] | None = None,
        scaler: torch.amp.GradScaler | None = None, autocast_dtype: torch.dtype | None = None,
        on_batch: Callable[[int, int, float], None] | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        loader_for_epoch: Callable[[int], Iterable] | None = None,
        validate: Callable[[], float] | None = None,
        val_precision: Callable[[], float] | None = None,
        lr_for_epoch: Callable[[int], float] | None = None,
        stop_reason: Callable[[list[dict]], str | None] | None = None,
        reduce: Reduce | None = None, checkpoint_model: nn.Module | None = None,
        checkpoint_objective: nn.Module | None = None, write_checkpoints: bool = True) -> list[dict]:
    """The project's one epoch loop: train from `start_epoch` up to `epochs`
    epochs, validating after each.

    After every epoch writes checkpoint_dir/last.pt (to resume from) and, when
    the epoch is the best so far by best_epoch's rule, checkpoint_dir/best.pt
    (the weights to publish). Returns the history: one dict per epoch with
    "epoch" (1-based), "train_loss", "val_loss" (mean per image), "seconds"
    (wall time of the epoch, validation included), "lr" and "best" (bool);
    with `val_precision`, also VAL_PRECISION.

    Hooks, all optional: `loader_for_epoch(epoch)` gives the training loader of
    a 0-based epoch (else `train_loader`, whose epoch-aware sampler is told the
    epoch); `validate()` gives the validation loss (else `val_loader` is
    evaluated); `lr_for_epoch(epoch)` sets the learning rate; `stop_reason(history)`
    is asked before each epoch and ends the loop when it returns a reason (it
    may raise to abort); `on_epoch(entry)` runs after the checkpoints are written.
    To resume: c = load_checkpoint(last.pt, model, optimizer, objective=...),
    then fit(..., start_epoch=c["epoch"], history=c["history"]); the best epoch so far comes from the history.

    Distributed runs (training/core/distributed.py) pass the DistributedDataParallel
    wrapper as `model`, the plain network and objective as `checkpoint_model`
    and `checkpoint_objective` (what the checkpoints hold), `reduce` (training
    losses over all processes) and write_checkpoints only on rank 0.
    """
    checkpoint_dir = Path(checkpoint_dir)
    history = list(history or [])
    best_val_loss = best_epoch(history)[1]  # what the checkpoints record as "best_val_loss"
    objective = checkpoint_objective if checkpoint_objective is not None else (
        loss_fn if isinstance(loss_fn, nn.Module) else None)
    saved = checkpoint_model if checkpoint_model is not None else model
    for epoch in range(start_epoch, epochs):
        if stop_reason is not None and stop_reason(history) is not None:
            break
        lr = lr_for_epoch(epoch) if lr_for_epoch is not None else optimizer.param_groups[0]["lr"]
        for group in optimizer.param_groups:
            group["lr"] = lr
        if loader_for_epoch is not None:
            loader = loader_for_epoch(epoch)
        else:
            if train_loader is None:
                raise ValueError("fit needs train_loader or loader_for_epoch")
            _set_epoch(train_loader, epoch)
            loader = train_loader
        started = time.perf_counter()
        train_loss = train_one_epoch(model, loss_fn, optimizer, loader, device, scaler=scaler,
                                     autocast_dtype=autocast_dtype, on_batch=on_batch, reduce=reduce)
        if validate is not None:
            val_loss = validate()
        else:
            if val_loader is None:
                raise ValueError("fit needs val_loader or validate")
            val_loss = evaluate(model, loss_fn, val_loader, device, autocast_dtype=autocast_dtype)
        entry = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss}
        if val_precision is not None:
            entry[VAL_PRECISION] = float(val_precision())
        entry.update(seconds=round(time.perf_counter() - started, 3), lr=lr)
        kept, kept_loss = best_epoch(history + [entry])
        entry["best"] = is_best = kept == epoch + 1
        if is_best:
            best_val_loss = kept_loss
        history.append(entry)
        if is_best and write_checkpoints:
            save_checkpoint(checkpoint_dir / "best.pt", saved, optimizer, epoch + 1, config, best_val_loss, history,
                            objective=objective)
        if write_checkpoints:
            save_checkpoint(checkpoint_dir / "last.pt", saved, optimizer, epoch + 1, config, best_val_loss, history,
                            objective=objective)
        if on_epoch is not None:
            on_epoch(entry)
    return history
