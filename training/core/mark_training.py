"""A projection head trained on relevance marks: pairs (query, result) users
judged right or wrong, alone or with class labels, on cached backbone features.

Plain data in, no database: `features` is a (N, D) float tensor (a feature
cache's rows, training/core/features.py), a mark is (query index, result
index, right) with indices into its rows; the app layer
(training/marks.py) reads the marks from PostgreSQL and maps image ids to rows.

The loss is pytorch-metric-learning's ContrastiveLoss (Hadsell, Chopra &
LeCun 2006) given the marks as explicit pairs (its `indices_tuple` of
anchor1, positive, anchor2, negative): a right pair is pulled together, a
wrong pair pushed at least `neg_margin` apart (Euclidean distance of unit
vectors). With labels, the same loss over every same-/different-label pair of
a batch of labelled rows is added.

`marks_precision_at_k` measures a ranking against held-out marks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pytorch_metric_learning.losses import ContrastiveLoss

from training.core.networks.head import ProjectionHead

Mark = tuple[int, int, bool]  # (query row, result row, right?)


@dataclass
class MarkTrainingConfig:
    dimension: int = 256
    kind: str = "linear"  # a training.core.networks.head.HEADS kind
    epochs: int = 30
    learning_rate: float = 1e-3
    batch_size: int = 256  # marks per step (and labelled rows per step, with labels)
    neg_margin: float = 1.0  # pytorch-metric-learning's default for ContrastiveLoss
    seed: int = 0


def check_marks(marks: Sequence[Mark], rows: int) -> None:
    """ValueError for no mark, a row out of range, or marks all of one verdict
    (a contrastive loss needs both a pull and a push)."""
    if not marks:
        raise ValueError("there are no marks to train on")
    bad = [m for m in marks if not (0 <= m[0] < rows and 0 <= m[1] < rows)]
    if bad:
        raise ValueError(f"{len(bad)} mark(s) name a feature row outside 0..{rows - 1}, e.g. {bad[0]}")
    verdicts = {bool(m[2]) for m in marks}
    if verdicts != {True, False}:
        raise ValueError(f"the marks are all {'right' if True in verdicts else 'wrong'}: training on marks needs "
                         "both right and wrong ones")


def pair_indices(batch: Sequence[Mark]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The rows a batch of marks needs (R,) and its indices_tuple (a1, p, a2, n)
    into those rows, for pytorch-metric-learning's pair losses."""
    rows = sorted({m[0] for m in batch} | {m[1] for m in batch})
    where = {row: i for i, row in enumerate(rows)}
    right = [(where[q], where[r]) for q, r, ok in batch if ok]
    wrong = [(where[q], where[r]) for q, r, ok in batch if not ok]

    def column(pairs: list[tuple[int, int]], i: int) -> torch.Tensor:
        return torch.tensor([p[i] for p in pairs], dtype=torch.int64)

    return torch.tensor(rows, dtype=torch.int64), (column(right, 0), column(right, 1), column(wrong, 0),
                                                   column(wrong, 1))


def _pair_loss(head: ProjectionHead, loss_fn, x: torch.Tensor, batch: Sequence[Mark], device: torch.device):
    rows, pairs = pair_indices(batch)
    return loss_fn(head(x[rows].to(device)), indices_tuple=tuple(p.to(device) for p in pairs))


def train_head_on_marks(features: torch.Tensor, marks: Sequence[Mark], config: MarkTrainingConfig | None = None, *,
                        labels: torch.Tensor | None = None, val_marks: Sequence[Mark] = (),
                        device: torch.device | None = None, on_epoch=None,
                        should_stop=None) -> tuple[ProjectionHead, list[dict]]:
    """Train a ProjectionHead on `features` (N, D) from `marks`, and from
    `labels` ((N,) int64 class indices, -1 for unlabelled rows) when given.
    Adam, a fixed seed. Each epoch's history entry: epoch, train_loss (mean
    over its steps), val_loss (the marks loss on `val_marks`, or the train
    loss without them: training.core.loop.best_epoch reads it), seconds. Returns
    the head of the epoch with the lowest val_loss (eval mode, on the CPU) and
    the history. `on_epoch(epoch, entry)` is called after each epoch,
    `should_stop()` before each (True ends training early).
    Raises ValueError for bad marks (check_marks)."""
    import copy
    import math
    import time

    config = config or MarkTrainingConfig()
    check_marks(marks, len(features))
    device = device or torch.device("cpu")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    head = ProjectionHead(features.shape[1], config.dimension, config.kind).to(device)
    loss_fn = ContrastiveLoss(pos_margin=0.0, neg_margin=config.neg_margin)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.learning_rate)
    x = features.float()
    labelled = (torch.nonzero(labels >= 0).flatten() if labels is not None else torch.zeros(0, dtype=torch.int64))
    history: list[dict] = []
    best_state, best_loss = copy.deepcopy(head.state_dict()), math.inf
    for epoch in range(1, config.epochs + 1):
        if should_stop is not None and should_stop():
            break
        started = time.perf_counter()
        head.train()
        order = torch.randperm(len(marks), generator=generator).tolist()
        total, steps = 0.0, 0
        for lo in range(0, len(order), config.batch_size):
            optimizer.zero_grad()
            loss = _pair_loss(head, loss_fn, x, [marks[i] for i in order[lo:lo + config.batch_size]], device)
            if len(labelled) > 1 and labels is not None:
                pick = labelled[torch.randperm(len(labelled), generator=generator)[:config.batch_size]]
                loss = loss + loss_fn(head(x[pick].to(device)), labels[pick].to(device))
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss.detach()), steps + 1
        train_loss = total / max(1, steps)
        head.eval()
        with torch.no_grad():
            val_loss = float(_pair_loss(head, loss_fn, x, list(val_marks), device)) if val_marks else train_loss
        entry = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                 "seconds": round(time.perf_counter() - started, 3), "lr": config.learning_rate}
        entry["best"] = math.isfinite(val_loss) and val_loss < best_loss  # the earliest on ties (loop.best_epoch)
        history.append(entry)
        if entry["best"]:
            best_state, best_loss = copy.deepcopy(head.state_dict()), val_loss
        if on_epoch is not None:
            on_epoch(epoch, entry)
    head.load_state_dict(best_state)
    return head.eval().cpu(), history


@torch.no_grad()
def marks_precision_at_k(queries: torch.Tensor, results: torch.Tensor, marks: Sequence[tuple[int, int, bool]],
                         k: int = 10) -> tuple[float, int]:
    """P@k against held-out marks, on the condensed list (Sakai 2007: the
    ranking with unjudged images left out, since an unjudged image is neither
    right nor wrong): for each query, its marked results ranked by cosine
    similarity, the share of right ones among the first min(k, R), R = its
    right marks (so a perfect ranking scores 1). `queries` (Q, D) and
    `results` (M, D) are embeddings; a mark is (query row, result row, right).
    Queries whose marks are all right or all wrong say nothing about order
    and are skipped. Returns (mean P@k, queries counted); (nan, 0) when none counts."""
    by_query: dict[int, list[tuple[int, bool]]] = {}
    for q, r, right in marks:
        by_query.setdefault(int(q), []).append((int(r), bool(right)))
    queries = torch.nn.functional.normalize(queries.float(), dim=1)
    results = torch.nn.functional.normalize(results.float(), dim=1)
    scores: list[float] = []
    for q, judged in by_query.items():
        n_right = sum(1 for _, right in judged if right)
        if n_right == 0 or n_right == len(judged):
            continue
        rows = torch.tensor([r for r, _ in judged])
        similarity = results[rows] @ queries[q]
        # Ties: the wrong mark first (a model is not credited for a tie).
        order = sorted(range(len(judged)), key=lambda i: (-float(similarity[i]), judged[i][1]))
        cut = min(k, n_right)
        scores.append(sum(1 for i in order[:cut] if judged[i][1]) / cut)
    return (sum(scores) / len(scores), len(scores)) if scores else (float("nan"), 0)


def train_head_run(data, config, checkpoint_dir, progress=None, should_stop=None, on_features=None):
    """training.core.trainer.train for a head-only config with marks ("only" or
    "with_labels"): the backbone's features of the rows the marks name (and,
    with labels, of every labelled row) from the feature cache, then
    train_head_on_marks. Marks whose query is in the train split train; those
    whose query is in the val split give the validation loss that picks the
    epoch kept. Writes best.pt and last.pt (the head's state, as
    head_training's checkpoints) and returns a TrainResult.
    Raises ValueError when the marks cannot train (check_marks)."""
    from dataclasses import asdict
    from pathlib import Path
    from typing import cast

    from training.core.features import FeatureCache
    from training.core.inference import resolve_device
    from training.core.loop import save_checkpoint
    from training.core.networks.head import HeadNet
    from training.core.runs import TrainingStopped, TrainResult

    checkpoint_dir = Path(checkpoint_dir)
    by_id = {row.id: row for row in data.rows}
    usable = [m for m in data.marks if m[0] in by_id and m[1] in by_id and m[0] != m[1]]
    warnings = []
    if data.mark_sources is not None:
        sources = data.mark_sources
        warnings.append(f"marks by source: {sources['signed_in']} from signed-in users, {sources['anonymous']} from "
                        "anonymous sessions" + (f" ({sources['anonymous_left_out']} left out: marks_from signed-in)"
                                                if sources.get("anonymous_left_out") else ""))
    if len(usable) < len(data.marks):
        warnings.append(f"{len(data.marks) - len(usable)} mark(s) left out: their query or result is not a train or "
                        "val image of the dataset")
    with_labels = config.marks == "with_labels"
    classes = sorted({r.label for r in data.split("train") if r.label is not None}) if with_labels else []
    needed = sorted({i for m in usable for i in m[:2]} | ({r.id for r in data.split("train") if r.label}
                                                          if with_labels else set()))
    where = {pk: i for i, pk in enumerate(needed)}
    train_marks = [(where[q], where[r], bool(ok)) for q, r, ok in usable if by_id[q].split == "train"]
    val_marks = [(where[q], where[r], bool(ok)) for q, r, ok in usable if by_id[q].split != "train"]
    check_marks(train_marks, len(needed))
    if not val_marks:
        warnings.append("no marks on val-split queries: the last epoch is kept (validation loss = training loss)")
    device = resolve_device()
    network = cast(HeadNet, config.build_model())
    cache = FeatureCache(config.backbone or "", network.backbone, network.preprocessing)
    features, stats = cache.features_for([(pk, by_id[pk].path, by_id[pk].sha256) for pk in needed], device,
                                         progress=on_features)
    network.backbone.to("cpu")
    labels = None
    if with_labels:
        index = {label: i for i, label in enumerate(classes)}
        labels = torch.tensor([index.get(by_id[pk].label, -1) if by_id[pk].split == "train" else -1
                               for pk in needed], dtype=torch.int64)
    settings = MarkTrainingConfig(dimension=network.head.dimension, kind=network.head.kind, epochs=config.epochs,
                                  learning_rate=config.learning_rate, batch_size=config.batch_size,
                                  seed=config.seed)

    def on_epoch(epoch: int, entry: dict) -> None:
        if progress is not None:
            progress(epoch, config.epochs, 1, 1, history_so_far + [entry])
        history_so_far.append(entry)

    history_so_far: list[dict] = []
    head, history = train_head_on_marks(features, train_marks, settings, labels=labels, val_marks=val_marks,
                                        device=device, on_epoch=on_epoch, should_stop=should_stop)
    if not history:
        raise TrainingStopped("training was stopped")
    best = min(history, key=lambda h: (h["val_loss"], h["epoch"]))
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    saved = {"train": asdict(config), "classes": classes or None, "pairs": "marks"}
    for name in ("best.pt", "last.pt"):
        save_checkpoint(checkpoint_dir / name, head, None, len(history), saved, best["val_loss"], history)
    warnings.append(f"backbone features: {stats['cached']} from the cache, {stats['embedded']} embedded in "
                    f"{stats['seconds']:.1f} s ({stats['path']})")
    return TrainResult(
        best_path=checkpoint_dir / "best.pt", last_path=checkpoint_dir / "last.pt", history=history,
        best_epoch=best["epoch"], best_val_loss=best["val_loss"], seconds=sum(h["seconds"] for h in history),
        stop_reason="completed" if len(history) == config.epochs else "stopped",
        objective=f"contrastive on marks{' + labels' if with_labels else ''}", classes=classes or None,
        pairs="marks", n_train=len(train_marks), n_val=len(val_marks), device=str(device), warnings=warnings,
        features=stats)
