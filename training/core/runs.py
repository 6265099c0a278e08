"""What every kind of training run shares: the result, the stop rules, the
learning-rate schedule and resuming from a checkpoint. Used by
training/core/trainer.py (whole networks, one or several processes) and
training/core/head_training.py (a head on cached features)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.core.config import TrainConfig
from training.core.loop import VAL_PRECISION, best_epoch, load_checkpoint

# progress(epoch, n_epochs, batch, n_batches, history): called after every
# batch (epoch and batch 1-based, history = finished epochs) and once more
# after each epoch's validation (batch == n_batches, history including it).
Progress = Callable[[int, int, int, int, list], None]


class TrainingStopped(Exception):
    """should_stop() said so (the job was cancelled, or another worker took it over)."""



@dataclass
class TrainResult:
    best_path: Path
    last_path: Path
    history: list[dict]
    best_epoch: int
    best_val_loss: float
    seconds: float  # training time over all runs (resumed ones included)
    stop_reason: str  # "completed", "early_stopping", "time_limit"
    objective: str
    classes: list[str] | None = None
    pairs: str | None = None  # contrastive: "labels" or "augmented"
    n_train: int = 0
    n_val: int = 0
    resumed_from_epoch: int = 0
    device: str = "cpu"
    precision: str = "float32"  # the autocast dtype of the forward passes (training.core.precision)
    warnings: list[str] = field(default_factory=list)
    features: dict | None = None  # head-only training: {"cached", "embedded", "seconds", "path"}

    @property
    def seconds_per_epoch(self) -> float:
        return self.seconds / len(self.history) if self.history else 0.0

    def summary(self) -> dict:
        """JSON-ready numbers for a job's result and a version's metrics."""
        return {"history": self.history, "best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
                "seconds": round(self.seconds, 3), "seconds_per_epoch": round(self.seconds_per_epoch, 3),
                "stop_reason": self.stop_reason, "objective": self.objective, "pairs": self.pairs,
                "n_train": self.n_train, "n_val": self.n_val, "classes": len(self.classes or []),
                "device": self.device, "precision": self.precision, "resumed_from_epoch": self.resumed_from_epoch, "warnings": self.warnings[:50],
                "features": self.features}


class EpochHooks:
    """training.core.loop.fit's hooks for a run: `loader_for_epoch` asks the plan for
    the epoch's loader, `on_batch` / `on_epoch` turn fit's calls into Progress
    calls, and `stop_reason` asks `stop_check` (which raises TrainingStopped)
    and then `decide(history)`. Shared by whole-network and head-only runs."""

    def __init__(self, config: TrainConfig, plan, progress: Progress | None, stop_check: Callable[[], None],
                 decide: Callable[[list[dict]], str | None], start_epoch: int, history: list[dict]) -> None:
        self.config, self.plan, self.progress = config, plan, progress
        self.stop_check, self.decide = stop_check, decide
        self.epoch, self.history = start_epoch, history
        self.n_batches = plan.n_batches

    def stop_reason(self, done: list[dict]) -> str | None:
        self.stop_check()
        self.history = done  # fit's own list: it holds each new entry before on_epoch is called
        return self.decide(done)

    def loader_for_epoch(self, epoch: int):
        self.epoch = epoch
        return self.plan.train_loader_for(epoch)

    def on_batch(self, index: int, total: int, loss: float) -> None:
        if self.progress is not None:
            self.progress(self.epoch + 1, self.config.epochs, index + 1, total, self.history)
        self.stop_check()

    def on_epoch(self, entry: dict) -> None:
        if self.progress is not None:
            self.progress(entry["epoch"], self.config.epochs, self.n_batches, self.n_batches, self.history)


def epoch_summary(entry: dict) -> str:
    """One epoch of a history as text: "train loss 0.41, val loss 0.52[, val P@10 0.894]"."""
    text = f"train loss {entry['train_loss']:.4f}, val loss {entry['val_loss']:.4f}"
    if VAL_PRECISION in entry:
        text += f", val P@10 {entry[VAL_PRECISION]:.4f}"
    return text


def _learning_rate(config: TrainConfig, epoch: int) -> float:
    """Learning rate for 0-based `epoch`: constant, or cosine from the base to 0
    over the planned epochs. A function of the epoch, so resuming needs no scheduler state."""
    if config.scheduler == "cosine":
        return config.learning_rate * 0.5 * (1 + math.cos(math.pi * epoch / config.epochs))
    return config.learning_rate


def _stop_reason(config: TrainConfig, history: list[dict]) -> str | None:
    """Why no further epoch should run, judged from the history alone (so a
    resumed run reaches the same decision)."""
    if not history:
        return None
    if len(history) >= config.epochs:
        return "completed"
    best = best_epoch(history)[0]
    if config.early_stopping_patience and len(history) - best >= config.early_stopping_patience:
        return "early_stopping"
    if config.time_limit_s is not None:
        spent = sum(h["seconds"] for h in history)
        # Never start an epoch that is not expected to finish in time (the first always runs).
        if spent + spent / len(history) > config.time_limit_s:
            return "time_limit"
    return None


def _resume(last: Path, config: TrainConfig, plan, model, optimizer) -> tuple[int, list[dict]]:
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    saved = checkpoint.get("config") or {}
    saved_train = {"select_by": "val_loss", **(saved.get("train") or {})}  # checkpoints older than select_by
    mismatched = {k: (saved_train.get(k), v) for k, v in config.model_key().items() if saved_train.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
        raise ValueError(f"{last} was made with other settings ({details}); resume with the same settings, "
                         f"or start again without resuming")
    if saved.get("classes") != plan.classes:
        raise ValueError(f"{last} was trained on other classes than the dataset's train split now holds; "
                         f"start again without resuming")
    load_checkpoint(last, model, optimizer, objective=plan.objective)
    return int(checkpoint["epoch"]), list(checkpoint["history"])


