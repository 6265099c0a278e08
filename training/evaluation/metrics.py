"""Retrieval metrics over ranked result lists (pure Python: no Django, no database).

Conventions used throughout:

* A query's ranking is given as an ordered list: result 1 first. Ties in score
  must already be broken by the caller; `rank_with_ties` is the policy this
  project uses (score descending, then id ascending), so that two runs over the
  same scores produce the same ranking.
* `relevant[i]` says whether the result at rank i + 1 is relevant (for
  category retrieval: it has the query's label).
* `n_relevant_total` is how many relevant items exist in the *searched
  collection* for that query (the query itself excluded when it is in the
  collection). It is the denominator of recall and bounds the one of AP.
* A query with `n_relevant_total == 0` has no defined recall or AP: the
  functions return None and `summarize` leaves such queries out of those two
  means, reporting how many it left out.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Copy-detection ranks are summarised at these depths ("found first" and "found
# in the ten results the site shows").
COPY_RECALL_DEPTHS = (1, 10)


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _check_total(n_relevant_total: int) -> None:
    if n_relevant_total < 0:
        raise ValueError(f"n_relevant_total must be >= 0, got {n_relevant_total}")


def _hits(relevant: Sequence[bool], k: int) -> int:
    """Number of relevant results among the first k (fewer if fewer were returned)."""
    return sum(1 for flag in relevant[:k] if flag)


def precision_at_k(relevant: Sequence[bool], k: int) -> float:
    """P@k = (# relevant among the first k results) / k.

    The denominator is always k, even when fewer than k results were returned:
    a search that returns 3 results when 10 were asked for has left 7 slots
    empty, and an empty slot is not a correct answer. An empty ranking has
    P@k = 0.
    """
    _check_k(k)
    return _hits(relevant, k) / k


def recall_at_k(relevant: Sequence[bool], k: int, n_relevant_total: int) -> float | None:
    """R@k = (# relevant among the first k results) / n_relevant_total.

    None when n_relevant_total == 0 (no relevant item exists, so recall is
    undefined rather than 0 or 1). Note that R@k can be below 1 even for a
    perfect ranking when n_relevant_total > k.
    """
    _check_k(k)
    _check_total(n_relevant_total)
    if n_relevant_total == 0:
        return None
    hits = _hits(relevant, k)
    if hits > n_relevant_total:
        raise ValueError(f"{hits} relevant results in the top {k} but n_relevant_total is {n_relevant_total}")
    return hits / n_relevant_total


def average_precision_at_k(relevant: Sequence[bool], k: int, n_relevant_total: int) -> float | None:
    """AP@k = (Σ_{i ≤ k, result i relevant} P@i) / min(k, n_relevant_total).

    The denominator is min(k, n_relevant_total), the most relevant results the
    top k could hold, so a ranking whose first min(k, n_relevant_total) results
    are all relevant scores exactly 1.0 (the common AP@k used for retrieval; it
    differs from "divide by the number of hits", which would reward returning a
    single correct result). None when n_relevant_total == 0.
    """
    _check_k(k)
    _check_total(n_relevant_total)
    if n_relevant_total == 0:
        return None
    hits = 0
    total = 0.0
    for i, flag in enumerate(relevant[:k], start=1):
        if flag:
            hits += 1
            total += hits / i  # P@i at a relevant rank i
    if hits > n_relevant_total:
        raise ValueError(f"{hits} relevant results in the top {k} but n_relevant_total is {n_relevant_total}")
    return total / min(k, n_relevant_total)


def rank_with_ties(scores: Sequence[float], ids: Sequence[Any]) -> list[Any]:
    """Ids ordered by score descending, equal scores by id ascending.

    Scores are similarities (higher is better); pass negated distances. The id
    tie-break makes the ranking deterministic, so metrics do not change between
    runs (or between a database and a brute-force computation) because of the
    order in which tied items happened to be stored. NaN scores are refused
    because they have no place in the order.
    """
    if len(scores) != len(ids):
        raise ValueError(f"{len(scores)} scores but {len(ids)} ids")
    for score in scores:
        if math.isnan(score):
            raise ValueError("a score is NaN; NaN cannot be ranked")
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))
    return [ids[i] for i in order]


@dataclass(frozen=True)
class QueryResult:
    """One evaluated query.

    `result_ids` and `relevant` are aligned, in rank order. `exact_ids`, when
    given, is the brute-force (exact nearest neighbour) ranking of the same
    query, used to measure how much the approximate index loses.
    """

    query_id: Hashable
    query_label: Any
    result_ids: Sequence[Hashable]
    relevant: Sequence[bool]
    n_relevant_total: int
    exact_ids: Sequence[Hashable] | None = None

    def __post_init__(self) -> None:
        if len(self.result_ids) != len(self.relevant):
            raise ValueError(
                f"query {self.query_id!r}: {len(self.result_ids)} result ids but {len(self.relevant)} relevance flags"
            )
        _check_total(self.n_relevant_total)


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return math.fsum(values) / len(values) if values else None


def _check_queries(queries: Sequence[QueryResult]) -> None:
    # An evaluation over no queries is a mistake upstream (empty test split,
    # wrong filter); a table of zeros would hide it.
    if not queries:
        raise ValueError("no queries to evaluate")


def similar_dissimilar(query: QueryResult, k: int) -> tuple[int, int]:
    """(similar, dissimilar) among the first k results, the study's "6 similar /
    4 dissimilar". similar = relevant results in the top k; dissimilar =
    min(k, number returned) − similar, i.e. only results actually shown count
    as dissimilar (with 10 returned this is k − similar)."""
    _check_k(k)
    similar = _hits(query.relevant, k)
    return similar, min(k, len(query.result_ids)) - similar


def ann_overlap_at_k(query: QueryResult, k: int) -> float | None:
    """|ANN top-k ∩ exact top-k| / |exact top-k|, or None without exact ids (or
    when the exact ranking is empty)."""
    _check_k(k)
    if query.exact_ids is None:
        return None
    exact = set(query.exact_ids[:k])
    if not exact:
        return None
    return len(set(query.result_ids[:k]) & exact) / len(exact)


def summarize(queries: Sequence[QueryResult], k: int) -> dict[str, Any]:
    """Means over queries at depth k.

    Returned keys:

    * ``k``, ``n_queries``
    * ``precision_at_k``: mean P@k over all queries.
    * ``recall_at_k``, ``map_at_k``: mean R@k and mean AP@k over the queries
      with n_relevant_total > 0 (None when there are none);
      ``n_skipped_no_relevant`` counts the queries left out.
    * ``mean_similar``, ``mean_dissimilar``: mean counts from
      `similar_dissimilar` (similar = relevant in top k; dissimilar =
      min(k, returned) − similar).
    * ``ann_recall_at_k``: mean of |ANN top-k ∩ exact top-k| / |exact top-k|
      over the queries that carry `exact_ids` (None when none do);
      ``n_ann_queries`` counts them.

    Raises ValueError on an empty query list.
    """
    _check_k(k)
    _check_queries(queries)
    precisions = [precision_at_k(q.relevant, k) for q in queries]
    recalls = [recall_at_k(q.relevant, k, q.n_relevant_total) for q in queries]
    aps = [average_precision_at_k(q.relevant, k, q.n_relevant_total) for q in queries]
    counts = [similar_dissimilar(q, k) for q in queries]
    overlaps = [o for o in (ann_overlap_at_k(q, k) for q in queries) if o is not None]
    return {
        "k": k,
        "n_queries": len(queries),
        "precision_at_k": _mean(precisions),
        "recall_at_k": _mean(r for r in recalls if r is not None),
        "map_at_k": _mean(a for a in aps if a is not None),
        "n_skipped_no_relevant": sum(1 for r in recalls if r is None),
        "mean_similar": _mean(s for s, _ in counts),
        "mean_dissimilar": _mean(d for _, d in counts),
        "ann_recall_at_k": _mean(overlaps),
        "n_ann_queries": len(overlaps),
    }


def precision_curve(queries: Sequence[QueryResult], ks: Iterable[int] = range(1, 51)) -> list[float]:
    """[mean P@k over queries for k in ks] (same P@k definition: divide by k).
    Raises ValueError on an empty query list."""
    _check_queries(queries)
    return [math.fsum(precision_at_k(q.relevant, k) for q in queries) / len(queries) for k in ks]


def _copy_row(ranks: Sequence[int | None]) -> dict[str, Any]:
    found = [r for r in ranks if r is not None]
    n = len(ranks)
    row: dict[str, Any] = {"n_queries": n}
    for depth in COPY_RECALL_DEPTHS:
        row[f"recall_at_{depth}"] = sum(1 for r in found if r <= depth) / n if n else None
    row["mean_rank"] = _mean(found)
    row["n_found"] = len(found)
    row["n_not_found"] = n - len(found)
    return row


def copy_detection_summary(ranks_by_kind: Mapping[str, Sequence[int | None]]) -> dict[str, dict[str, Any]]:
    """Per kind of change, how well the original is found from a modified copy.

    A rank is the 1-based position of the original in the copy's results, or
    None when the original was not among the results searched (the searched
    depth). For each kind, and for an ``"all"`` row pooling every query:

    * ``recall_at_1``, ``recall_at_10``: fraction of queries with rank ≤ 1 / ≤ 10
      (None counts as not found; None for a kind with no queries). R@10 assumes
      the searched depth was at least 10.
    * ``mean_rank``: mean over the queries whose original was found (None if
      none was); ``n_not_found`` says how many were left out, since a rank
      cannot be averaged with "not found".
    * ``n_queries``, ``n_found``, ``n_not_found``.

    Rows keep the order of `ranks_by_kind`, with ``"all"`` last.
    """
    if "all" in ranks_by_kind:
        raise ValueError('"all" is reserved for the pooled row; rename that kind')
    for kind, ranks in ranks_by_kind.items():
        for rank in ranks:
            if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
                raise ValueError(f"kind {kind!r}: rank must be a 1-based int or None, got {rank!r}")
    summary = {kind: _copy_row(ranks) for kind, ranks in ranks_by_kind.items()}
    summary["all"] = _copy_row([r for ranks in ranks_by_kind.values() for r in ranks])
    return summary
