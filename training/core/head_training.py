"""Head-only training: a projection head on cached features of a frozen,
pretrained backbone (TrainConfig(architecture="head", backbone=..., head=...)).

    1. Embed the dataset's train and val images once with the backbone
       (training/core/features.py caches them on disk; later runs reuse them).
    2. Train only the head (training/core/networks/head.py) on those features with
       a labelled objective (default normalized_softmax, pytorch-metric-learning),
       train split for training, val split for early stopping, on the one
       epoch loop training.core.loop.fit, with the same checkpoints, stop rules and
       resuming as training/core/trainer.py.
    3. The checkpoints hold the head only; training.versions publishes backbone
       + head as one network ("head" architecture).

Called by training.core.trainer.train when config.head_only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import cast

import torch
from torch.utils.data import DataLoader, TensorDataset

from training.core.config import TrainConfig
from training.core.data import TrainingData
from training.core.features import FeatureCache
from training.core.inference import resolve_device
from training.core.loop import VAL_PRECISION, evaluate, fit
from training.core.networks.head import HeadNet
from training.core.objectives import get_objective
from training.core.plan import VALIDATION_EVERY, check_train_labels, epoch_seed, readable
from training.core.precision import autocast_dtype, precision_name
from training.core.runs import (
    EpochHooks,
    TrainingStopped,
    TrainResult,
    _learning_rate,
    _resume,
    _stop_reason,
    best_epoch,
)
from training.core.samplers import PKSampler, group_by_label

logger = logging.getLogger(__name__)
FeatureProgress = Callable[[int, int], None]  # (images embedded, images to embed)


@torch.no_grad()
def feature_precision_at_k(queries: torch.Tensor, query_labels: torch.Tensor, database: torch.Tensor,
                           database_labels: torch.Tensor, k: int = 10, chunk: int = 2048) -> float:
    """Mean P@k of exact cosine search: each row of `queries` (Q, D) a query
    against the rows of `database` (N, D), any float dtype; a result is
    relevant when its label (`database_labels`, (N,) int64) equals the
    query's (`query_labels`, (Q,) int64). The denominator is k
    (training.evaluation.metrics.precision_at_k's convention). Ties in score
    follow torch.topk. Memory: a (chunk, N) float32 score block at a time.
    Raises ValueError when there is no query or fewer than k database rows."""
    if len(queries) == 0 or len(database) < k:
        raise ValueError(f"P@{k} needs at least one query and {k} database rows, got {len(queries)} and "
                         f"{len(database)}")
    queries = torch.nn.functional.normalize(queries.float(), dim=1)
    database = torch.nn.functional.normalize(database.float(), dim=1)
    hits = 0
    for lo in range(0, len(queries), chunk):
        top = (queries[lo:lo + chunk] @ database.T).topk(k, dim=1).indices
        hits += int((database_labels[top] == query_labels[lo:lo + chunk, None]).sum())
    return hits / (k * len(queries))


class FeaturePlan:
    """Like training.core.plan.DataPlan, over cached features: (features (B, D)
    float32, class index) batches for the head, the objective, the classes."""

    def __init__(self, data: TrainingData, config: TrainConfig, cache: FeatureCache, head: torch.nn.Module,
                 device: torch.device, on_features: FeatureProgress | None = None) -> None:
        self.config = config
        self.warnings: list[str] = []
        self.pairs = None
        train = [(r.id, r.path, r.label, r.sha256) for r in data.split("train") if r.label is not None]
        val = [(r.id, r.path, r.label, r.sha256) for r in data.split("val") if r.label is not None]
        unlabelled = sum(1 for r in data.split("train") if r.label is None)
        if unlabelled:
            self.warnings.append(f"{unlabelled} unlabelled training image(s) left out ({config.objective} needs labels)")
        # Only images the cache lacks are opened: check those are readable.
        known = cache.cached_hashes()
        to_check: list[tuple[int, str, str | None]] = [(pk, path, label) for pk, path, label, sha in train + val
                                                      if known.get(pk) != sha]
        good = {pk for pk, _, _ in readable(to_check, self.warnings)}
        bad = {pk for pk, _, _ in to_check} - good
        train = [row for row in train if row[0] not in bad]
        val = [row for row in val if row[0] not in bad]
        check_train_labels(data.name, config, [row[2] for row in train])
        self.classes: list[str] = sorted({row[2] for row in train if row[2] is not None})
        unseen = [row for row in val if row[2] not in self.classes]
        if unseen:
            self.warnings.append(f"{len(unseen)} validation image(s) left out: their label is not in the train split")
        val = [row for row in val if row[2] in self.classes]
        if not val:
            val = train[VALIDATION_EVERY - 1::VALIDATION_EVERY] or train[-1:]
            held = {row[0] for row in val}
            train = [row for row in train if row[0] not in held]
            self.warnings.append(f"the val split has no usable image; {len(val)} training image(s) validate instead")
            check_train_labels(data.name, config, [row[2] for row in train])
        self.n_train, self.n_val = len(train), len(val)
        features, self.feature_stats = cache.features_for([(pk, path, sha) for pk, path, _, sha in train + val],
                                                          device, progress=on_features)
        mapping = {label: i for i, label in enumerate(self.classes)}
        labels = torch.tensor([mapping[str(row[2])] for row in train + val], dtype=torch.int64)
        self.train_set = train_set = TensorDataset(features[:len(train)], labels[:len(train)])
        self.val_set = TensorDataset(features[len(train):], labels[len(train):])
        torch.manual_seed(config.seed)  # the same from here on whether the features were cached or embedded
        self.objective: torch.nn.Module = get_objective(config.objective).build(head, len(self.classes))
        self.generator = torch.Generator()
        batch = config.batch_size
        if get_objective(config.objective).plan == "pk":
            k = 4 if batch >= 8 else 2
            train_labels = labels[:len(train)].tolist()
            eligible = sum(1 for indices in group_by_label(train_labels).values() if len(indices) >= 2)
            self.sampler: PKSampler | None = PKSampler(train_labels, p=max(2, min(batch // k, eligible)), k=k,
                                                       seed=config.seed)
            self.train_loader = DataLoader(train_set, batch_sampler=self.sampler, generator=self.generator)
        else:
            self.sampler = None
            self.train_loader = DataLoader(train_set, batch_size=batch, shuffle=True, generator=self.generator)
        self.val_loader = DataLoader(self.val_set, batch_size=max(batch, 256), shuffle=False, generator=torch.Generator())
        self.n_batches = len(self.train_loader)

    def train_loader_for(self, epoch: int) -> DataLoader:
        self.generator.manual_seed(epoch_seed(self.config.seed, epoch))
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        return self.train_loader

    def validate(self, model: torch.nn.Module, device: torch.device, autocast_dtype) -> float:
        return evaluate(model, self.objective, self.val_loader, device, autocast_dtype=autocast_dtype)

    @torch.no_grad()
    def val_precision(self, head: torch.nn.Module, device: torch.device) -> float:
        """Validation P@10 of `head`, in [0, 1]: each validation feature (N_val, D),
        through the head, a query against the train features through the head
        (exact cosine; P@k with k = the train rows when there are fewer than 10).
        Scores are ranked in blocks of at most 2^27 floats (512 MB)."""
        head.eval()
        train_x, train_y = self.train_set.tensors
        val_x, val_y = self.val_set.tensors

        def embed(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([head(x[lo:lo + 4096].to(device)).float().cpu() for lo in range(0, len(x), 4096)])

        chunk = max(1, min(4096, 2**27 // max(1, len(train_x))))
        return feature_precision_at_k(embed(val_x), val_y, embed(train_x), train_y, k=min(10, len(train_x)),
                                      chunk=chunk)


def train_head(data: TrainingData, config: TrainConfig, checkpoint_dir: Path, progress, should_stop,
               resume: bool, on_features: FeatureProgress | None = None):
    """training.core.trainer.train for config.head_only; returns a TrainResult
    whose extra `features` entry says how many features were cached or embedded.
    With config.marks, the head trains on relevance marks instead
    (training.core.mark_training.train_head_run)."""
    if config.marks != "none":
        from training.core.mark_training import train_head_run

        return train_head_run(data, config, checkpoint_dir, progress, should_stop, on_features)
    last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
    if not resume:
        for path in (last_path, best_path):
            path.unlink(missing_ok=True)
    device = resolve_device()
    network = cast(HeadNet, config.build_model())  # pretrained backbone (frozen) + seeded random head
    head = network.head.to(device)
    cache = FeatureCache(config.backbone or "", network.backbone, network.preprocessing)
    plan = FeaturePlan(data, config, cache, head, device, on_features)
    network.backbone.to("cpu")  # not needed any more while the head trains
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    plan.objective.to(device)
    optimizer = torch.optim.Adam(list(head.parameters()) + list(plan.objective.parameters()),
                                 lr=config.learning_rate)
    start_epoch, history = 0, list[dict]()
    if resume and last_path.exists():
        start_epoch, history = _resume(last_path, config, plan, head, optimizer)
    def stop_check() -> None:
        if should_stop is not None and should_stop():
            raise TrainingStopped("training was stopped")

    hooks = EpochHooks(config, plan, progress, stop_check, lambda done: _stop_reason(config, done), start_epoch,
                       history)
    checkpoint_config = {"train": asdict(config), "classes": plan.classes, "pairs": None}
    history = fit(head, plan.objective, optimizer, None, None, device, epochs=config.epochs,
                  checkpoint_dir=checkpoint_dir, config=checkpoint_config, start_epoch=start_epoch,
                  history=history, on_batch=hooks.on_batch,
                  on_epoch=hooks.on_epoch, loader_for_epoch=hooks.loader_for_epoch, validate=lambda: plan.validate(head, device, None),
                  val_precision=(lambda: plan.val_precision(head, device)) if config.select_by == VAL_PRECISION
                  else None,
                  lr_for_epoch=lambda epoch: _learning_rate(config, epoch), stop_reason=hooks.stop_reason)
    best, best_val_loss = best_epoch(history)
    if not best or not best_path.exists() or not math.isfinite(best_val_loss):
        raise ValueError("no epoch gave a finite validation loss, so there are no weights to keep; "
                         "try a lower learning rate")
    warnings = plan.warnings + [
        f"backbone features: {plan.feature_stats['cached']} from the cache, {plan.feature_stats['embedded']} "
        f"embedded in {plan.feature_stats['seconds']:.1f} s ({plan.feature_stats['path']})"]
    return TrainResult(
        best_path=best_path, last_path=last_path, history=history, best_epoch=best, best_val_loss=best_val_loss,
        seconds=sum(h["seconds"] for h in history), stop_reason=_stop_reason(config, history) or "completed",
        objective=config.objective, classes=plan.classes, pairs=None, n_train=plan.n_train, n_val=plan.n_val,
        resumed_from_epoch=start_epoch, device=str(device), warnings=warnings, features=plan.feature_stats,
        precision=precision_name(autocast_dtype(device)))  # of the backbone's features; the head trains in float32


def full_state_dict(config: TrainConfig, head_state: dict) -> dict:
    """The state dict of the whole network (pretrained backbone + the trained
    head), from a head-only checkpoint's head state."""
    network = cast(HeadNet, config.build_model())
    network.head.load_state_dict(head_state)
    return network.state_dict()
