"""Rocchio's query-point movement (Rocchio 1971), as relevance feedback for
image retrieval uses it (Rui, Huang, Ortega & Mehrotra 1998). Plain numpy,
no Django: the search service and bench/feedback.py both call it.

Weights: Manning, Raghavan & Schütze, *Introduction to Information Retrieval*
(Cambridge University Press, 2008), §9.1.1: "reasonable values might be
α = 1, β = 0.75, and γ = 0.15".
"""

from __future__ import annotations

import numpy as np

ROCCHIO_ALPHA, ROCCHIO_BETA, ROCCHIO_GAMMA = 1.0, 0.75, 0.15


def rocchio(query: np.ndarray | None, positives: np.ndarray, negatives: np.ndarray, *,
            alpha: float = ROCCHIO_ALPHA, beta: float = ROCCHIO_BETA, gamma: float = ROCCHIO_GAMMA) -> np.ndarray:
    """The refined query q' = α·q + β·mean(positives) − γ·mean(negatives), L2-normalised.

    `query`: shape (D,), or None (a query made of marked images only: the α
    term is left out); `positives`, `negatives`: shapes (P, D) and (N, D),
    either may have no rows (its term is left out). Returns float32 (D,).
    Raises ValueError when there is neither a query nor a positive, or the
    result has zero length (nothing to search towards)."""
    if query is None and len(positives) == 0:
        raise ValueError("a refined search needs a query image or at least one positive (right) image")
    dims = len(query) if query is not None else positives.shape[1]
    moved = np.zeros(dims, dtype=np.float64)
    if query is not None:
        moved += alpha * np.asarray(query, dtype=np.float64)
    if len(positives):
        moved += beta * np.asarray(positives, dtype=np.float64).mean(axis=0)
    if len(negatives):
        moved -= gamma * np.asarray(negatives, dtype=np.float64).mean(axis=0)
    norm = float(np.linalg.norm(moved))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("the refined query has zero length: the marked images cancel out")
    return (moved / norm).astype(np.float32)
