"""Training a registered network on a dataset's images, as a plain function.

    config = TrainConfig("autoencoder", epochs=5, image_size=64)      # training/core/config.py
    data = training_data(dataset)                                   # training/rows.py: plain rows
    result = train(data, config, checkpoint_dir=path)                # resumable
    version = create_version_from_checkpoint(config, result.best_path, dataset,
                                             result.history, result.seconds)  # training/versions.py

The epoch loop is training.core.loop.fit; this module adds the data plan
(training/core/plan.py), the learning-rate schedule, the stop rules (epochs,
early stopping, time limit, should_stop) and resuming. The job that runs it on
a worker is training/train_job.py.

Which images: the dataset's `train` split trains, its `val` split gives the
validation loss that picks the best epoch and stops training early; the
`test` split is left for evaluation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from training.core.config import TrainConfig
from training.core.data import TrainingData
from training.core.distributed import STOP_REASONS, Dist, joint_loss
from training.core.inference import resolve_device
from training.core.loop import fit
from training.core.plan import DataPlan, LabelledPlan, PairPlan, plan_rows
from training.core.precision import mixed_precision, precision_name
from training.core.runs import (  # noqa: F401 - TrainingStopped, TrainResult, best_epoch: this module's API as before
    EpochHooks,
    Progress,
    TrainingStopped,
    TrainResult,
    _learning_rate,
    _resume,
    _stop_reason,
    best_epoch,
)

logger = logging.getLogger(__name__)

def _checkpoint_config(config: TrainConfig, plan: LabelledPlan | PairPlan) -> dict:
    return {"train": asdict(config), "classes": plan.classes, "pairs": plan.pairs}


def train(data: TrainingData, config: TrainConfig, *, checkpoint_dir: str | os.PathLike[str],
          progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
          resume: bool = True, on_features: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train `config.architecture` on the train rows of `data` (a dataset's
    rows, training/rows.py), validating on its val rows after every epoch.

    Writes checkpoint_dir/last.pt after every epoch and checkpoint_dir/best.pt
    whenever the validation loss is the lowest so far (weights, optimizer and
    objective state, epoch, config, history). With resume=True an existing
    last.pt is continued (same architecture, size, dimension, objective and
    classes required); with resume=False old checkpoints are removed first.

    Stops after `epochs`, or `early_stopping_patience` epochs without a better
    validation loss, or before an epoch that would overrun `time_limit_s`.
    should_stop() is asked between batches; when true, TrainingStopped is
    raised (the last finished epoch stays in last.pt).

    Head-only training (config.head_only) first caches the frozen backbone's
    features (on_features(done, total) reports that) and trains only the
    head (training/core/head_training.py); config.processes > 1 trains with
    DistributedDataParallel over that many processes (training/core/distributed.py).
    """
    # Seeded, and the caller's random state is given back afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.head_only:
            from training.core.head_training import train_head

            return train_head(data, config, Path(checkpoint_dir), progress, should_stop, resume, on_features)
        if config.processes > 1:
            from training.core.distributed import train_distributed

            return train_distributed(data, config, Path(checkpoint_dir), progress, should_stop, resume, _train)
        result = _train(data, config, Path(checkpoint_dir), progress, should_stop, resume)
        assert result is not None
        return result


def _train(data: TrainingData, config: TrainConfig, checkpoint_dir: Path, progress: Progress | None,
           should_stop: Callable[[], bool] | None, resume: bool, *, dist_info: Dist | None = None,
           rows: tuple[list, list] | None = None) -> TrainResult | None:
    """One process's training; in a distributed run (`dist_info`, training/core/distributed.py)
    every rank runs it and only rank 0 returns a result (the others None). rows:
    the readable (train, val) rows when already checked (plan_rows; a distributed
    run's ranks get rank 0's)."""
    last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
    main = dist_info is None or dist_info.main
    if not resume and main:
        for path in (last_path, best_path):
            path.unlink(missing_ok=True)
    device = dist_info.device if dist_info is not None else resolve_device()
    model = config.build_model().to(device)
    warnings: list[str] = []
    if rows is None:
        rows = plan_rows(data, warnings)
    plan = DataPlan(data.name, rows, config, model, device, world=dist_info.world if dist_info else 1,
                    rank=dist_info.rank if dist_info else 0)
    plan.warnings[:0] = warnings
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    plan.objective.to(device)
    parameters = list(model.parameters()) + list(plan.objective.parameters())
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
    autocast_dtype, scaler = mixed_precision(device)
    start_epoch, history = 0, list[dict]()
    if resume and last_path.exists():
        start_epoch, history = _resume(last_path, config, plan, model, optimizer)
        logger.info("resuming %s from epoch %d", checkpoint_dir, start_epoch)
    def stop_check() -> None:
        stop = should_stop is not None and should_stop()
        if dist_info is not None:  # rank 0 decides for all: they stop together
            stop = bool(dist_info.decide(int(stop)))
        if stop:
            raise TrainingStopped("training was stopped")

    def decide(done: list[dict]) -> str | None:
        reason = _stop_reason(config, done)
        if dist_info is not None:  # the time limit is judged from rank 0's clock
            code = dist_info.decide(STOP_REASONS.index(reason) + 1 if reason else 0)
            reason = STOP_REASONS[code - 1] if code else None
        return reason

    hooks = EpochHooks(config, plan, progress, stop_check, decide, start_epoch, history)
    trained, loss_fn = (dist_info.wrap(model, plan.objective), joint_loss) if dist_info is not None \
        else (model, plan.objective)
    history = fit(trained, loss_fn, optimizer, None, None, device, epochs=config.epochs,
                  checkpoint_dir=checkpoint_dir, config=_checkpoint_config(config, plan), start_epoch=start_epoch,
                  history=history, scaler=scaler, autocast_dtype=autocast_dtype,
                  on_batch=hooks.on_batch, on_epoch=hooks.on_epoch, loader_for_epoch=hooks.loader_for_epoch,
                  validate=lambda: plan.validate(model, device, autocast_dtype),
                  lr_for_epoch=lambda epoch: _learning_rate(config, epoch), stop_reason=hooks.stop_reason,
                  reduce=dist_info.reduce if dist_info is not None else None, checkpoint_model=model,
                  checkpoint_objective=plan.objective, write_checkpoints=main)
    if not main:
        return None

    best, best_val_loss = best_epoch(history)
    if not best or not best_path.exists():
        raise ValueError("no epoch gave a finite validation loss, so there are no weights to keep; "
                         "try a lower learning rate")
    return TrainResult(
        best_path=best_path, last_path=last_path, history=history, best_epoch=best,
        best_val_loss=best_val_loss, seconds=sum(h["seconds"] for h in history),
        stop_reason=_stop_reason(config, history) or "completed", objective=config.objective,
        classes=plan.classes, pairs=plan.pairs, n_train=plan.n_train, n_val=plan.n_val,
        resumed_from_epoch=start_epoch, device=str(device), precision=precision_name(autocast_dtype),
        warnings=plan.warnings)
