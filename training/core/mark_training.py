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


def train_head_on_marks(features: torch.Tensor, marks: Sequence[Mark], config: MarkTrainingConfig | None = None, *,
                        labels: torch.Tensor | None = None, device: torch.device | None = None,
                        on_epoch=None) -> tuple[ProjectionHead, list[float]]:
    """Train a ProjectionHead on `features` (N, D) from `marks`, and from
    `labels` ((N,) int64 class indices, -1 for unlabelled rows) when given.
    Adam, a fixed seed; returns the head (eval mode, on the CPU) and the mean
    loss of each epoch. `on_epoch(epoch, loss)` is called after each epoch.
    Raises ValueError for bad marks (check_marks)."""
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
    losses: list[float] = []
    for epoch in range(1, config.epochs + 1):
        head.train()
        order = torch.randperm(len(marks), generator=generator).tolist()
        total, steps = 0.0, 0
        for lo in range(0, len(order), config.batch_size):
            rows, pairs = pair_indices([marks[i] for i in order[lo:lo + config.batch_size]])
            optimizer.zero_grad()
            loss = loss_fn(head(x[rows].to(device)), indices_tuple=tuple(p.to(device) for p in pairs))
            if len(labelled) > 1 and labels is not None:
                pick = labelled[torch.randperm(len(labelled), generator=generator)[:config.batch_size]]
                loss = loss + loss_fn(head(x[pick].to(device)), labels[pick].to(device))
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss.detach()), steps + 1
        losses.append(total / max(1, steps))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    return head.eval().cpu(), losses


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
