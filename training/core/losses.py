"""Metric-learning losses on embeddings (normally the L2-normalised output of
an EmbeddingNet, so Euclidean distances lie in [0, 2]).

Distances go through sqrt(max(d², eps)): the gradient of sqrt at 0 is
infinite, and identical embeddings (an image paired with itself, an anchor
with itself) are common.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-12


def _distance_from_squared(squared: torch.Tensor) -> torch.Tensor:
    return squared.clamp_min(_EPS).sqrt()


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between all rows: (N, D) -> (N, N)."""
    # Differences rather than the |a|²+|b|²-2ab expansion: exact (no
    # cancellation) and cheap for training batch sizes.
    diff = embeddings.unsqueeze(1) - embeddings.unsqueeze(0)
    return _distance_from_squared(diff.pow(2).sum(-1))


def contrastive_loss(emb_a: torch.Tensor, emb_b: torch.Tensor, same: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Contrastive loss (Hadsell, Chopra & LeCun 2006) over N pairs.

    emb_a, emb_b: (N, D) embeddings of the two images of each pair.
    same: (N,) bool or 0/1 float, true where the pair shows the same thing.
    With d = ||a - b||: same pairs cost d², different pairs max(0, margin - d)².
    Returns the mean over the N pairs (a scalar).
    """
    if emb_a.shape != emb_b.shape or emb_a.dim() != 2:
        raise ValueError(f"emb_a and emb_b must both be (N, D), got {tuple(emb_a.shape)} and {tuple(emb_b.shape)}")
    if same.shape != emb_a.shape[:1]:
        raise ValueError(f"same must be ({emb_a.shape[0]},), got {tuple(same.shape)}")
    same = same.to(dtype=emb_a.dtype)
    squared = (emb_a - emb_b).pow(2).sum(dim=1)
    positive = squared  # d² directly: no sqrt, so no gradient trouble at d = 0
    negative = F.relu(margin - _distance_from_squared(squared)).pow(2)
    return (same * positive + (1 - same) * negative).mean()


def triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2,
                 mining: str = "batch_hard") -> torch.Tensor:
    """Triplet loss over a labelled batch (Hermans, Beyer & Leibe 2017,
    "In Defense of the Triplet Loss"), with Euclidean distances.

    embeddings: (N, D); labels: (N,) integer class indices (as a PKSampler batch gives).
    mining="batch_hard" (default): for every anchor that has at least one
        positive (same label, other index) and one negative in the batch,
        max(0, margin + hardest positive distance - hardest negative distance);
        the mean over those anchors.
    mining="batch_all": max(0, margin + d(a, p) - d(a, n)) for every valid
        triplet (a, p, n) with a != p, label a = label p != label n; the mean
        over all valid triplets (zero-loss ones included).
    A batch with no valid anchor or triplet gives 0, still attached to the
    graph so backward() works.
    """
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"need embeddings (N, D) and labels (N,), got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )
    distances = pairwise_distances(embeddings)
    n = embeddings.shape[0]
    same_label = labels.unsqueeze(0) == labels.unsqueeze(1)
    not_self = ~torch.eye(n, dtype=torch.bool, device=embeddings.device)
    positive_mask = same_label & not_self
    negative_mask = ~same_label

    if mining == "batch_hard":
        hardest_positive = distances.masked_fill(~positive_mask, float("-inf")).amax(dim=1)
        hardest_negative = distances.masked_fill(~negative_mask, float("inf")).amin(dim=1)
        valid = positive_mask.any(dim=1) & negative_mask.any(dim=1)
        if not valid.any():
            return embeddings.sum() * 0.0
        return F.relu(margin + hardest_positive[valid] - hardest_negative[valid]).mean()
    if mining == "batch_all":
        # losses[a, p, n] = margin + d(a, p) - d(a, n)
        losses = margin + distances.unsqueeze(2) - distances.unsqueeze(1)
        valid = positive_mask.unsqueeze(2) & negative_mask.unsqueeze(1)
        if not valid.any():
            return embeddings.sum() * 0.0
        return F.relu(losses[valid]).mean()
    raise ValueError(f"mining must be 'batch_hard' or 'batch_all', not {mining!r}")
