"""Each model version's HNSW search breadth (ef_search), chosen from its own rows.

How many of the true top k an HNSW walk finds at a given ef_search depends on
the data (its local intrinsic dimensionality), the number of rows and the
graph's m / ef_construction, so no one default fits every version: at a
million rows, embeddings shaped like EfficientNet-Lite0's 1,280-d ones need
ef_search 200 for recall@10 0.985, while those of a 256-d head reach 0.992 at
40 for a third of the latency (docs/scaling.md). After a version's index is
built, calibrate() measures recall@k on a sample of the version's own rows
and keeps the smallest ef_search of EF_SEARCH_LADDER that reaches
CBIR_HNSW_TARGET_RECALL (the one-sided 95 % lower bound of the sample's
recall, not only its mean); searches then use it
(search.neighbours.ef_search_for) unless CBIR_HNSW_EF_SEARCH fixes one value
for every version.

Recall is measured as ANN benchmarks do (Aumüller, Bernhardsson & Faithfull,
"ANN-Benchmarks", Information Systems 87, 2020): the walk's top k, through
the same statement users' searches run, against an exact scan of the same
rows; a found row counts when its distance is at most the exact k-th
distance, so rows tied with the k-th count whichever the walk returns (both
sides compute distances with the same function on the same halfvec values;
TIE_TOLERANCE only absorbs float noise). The queries must be new to the
graph, as an uploaded image is; a version has no held-out rows, so each
query is made from a sampled row by held_out_query() (why, and how close it
comes to fresh queries: there, and docs/scaling.md).

Cost: two exact scans of the version's rows per query, then a walk per query
for each breadth tried: 223-229 s for the default 50 queries at a million
256-d rows on 2 cores (≈ 2.3 s a scan), against a 6-minute build.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS
from django.utils import timezone

from search.models import Embedding
from search.neighbours import CALIBRATION, MAX_EF_SEARCH, fetch, neighbours_queryset
from training.models import ModelVersion

# Breadths tried, smallest first (pgvector: 1 to 1,000; at least 2k is used for top k).
EF_SEARCH_LADDER = (20, 40, 60, 80, 100, 150, 200, 300, 400, 600, 800, 1000)
TIE_TOLERANCE = 1e-6  # cosine distance
# A nearer row than this (cosine distance) duplicates the query's row; halfvec
# rounding alone moves a unit vector's distance by ~1e-4.
DUPLICATE_DISTANCE = 1e-3
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Calibration:
    """The outcome of calibrate(), as stored in ModelVersion.metrics[CALIBRATION].

    ef_search: the breadth searches of this version use; recall: mean
    recall@k measured at each breadth tried (ascending; the last tried is the
    first whose bound met the target, or the ladder's top); lower_bound: its
    one-sided 95 % lower bound (lower_bound()); met: whether the chosen
    breadth's bound reached target_recall (else it has the highest bound); rows: the version's rows when measured; seconds: wall time
    of the measurement; query_ids: the images searched (not stored)."""

    ef_search: int
    target_recall: float
    met: bool
    recall: dict[int, float]
    lower_bound: dict[int, float]
    k: int
    queries: int
    rows: int
    seconds: float
    query_ids: tuple[int, ...] = ()

    def as_dict(self) -> dict:
        stored = asdict(self)
        del stored["query_ids"]
        stored["recall"] = {str(ef): round(r, 4) for ef, r in self.recall.items()}
        stored["lower_bound"] = {str(ef): round(r, 4) for ef, r in self.lower_bound.items()}
        stored["seconds"] = round(self.seconds, 1)
        stored["date"] = timezone.now().isoformat(timespec="seconds")
        return stored

    def describe(self) -> str:
        reached = "reaches" if self.met else "is the best found, short of"
        return (f"ef_search {self.ef_search}: recall@{self.k} {self.recall[self.ef_search]:.3f} (95 % lower bound "
                f"{self.lower_bound[self.ef_search]:.3f}) on {self.queries} of the version's {self.rows:,} rows "
                f"({reached} the target {self.target_recall:g}; "
                f"measured in {self.seconds:.0f} s)")


def recall_with_ties(found: Sequence[float], exact: Sequence[float], k: int) -> float:
    """Share of the k true neighbours found: the found distances at most the
    exact k-th distance (+ TIE_TOLERANCE), over min(k, len(exact)).

    `found`, `exact`: cosine distances of the walk's and the exact scan's
    results, in result order (exact ascending). 1.0 when there is nothing to
    find. Source: ANN-Benchmarks' recall (Aumüller et al. 2020), which also
    counts rows tied with the k-th."""
    want = min(k, len(exact))
    if want == 0:
        return 1.0
    threshold = exact[want - 1] + TIE_TOLERANCE
    return min(want, sum(1 for d in found[:k] if d <= threshold)) / want


def lower_bound(per_query: Sequence[float]) -> float:
    """One-sided 95 % lower confidence bound of the mean recall: mean −
    1.645 · s / √n (normal approximation of a sample mean; s the sample
    standard deviation, 0 for one query). So a breadth is kept only when the
    sample makes its recall at least the bound likely, not merely on average."""
    mean = statistics.fmean(per_query)
    if len(per_query) < 2:
        return mean
    return mean - 1.645 * statistics.stdev(per_query) / math.sqrt(len(per_query))


def choose_ef_search(bounds: Mapping[int, float], target: float) -> tuple[int, bool]:
    """(the smallest breadth whose recall bound reaches `target`, True), or
    (the breadth of the highest bound, False) when none does (the smaller on a
    tie). Raises ValueError for an empty mapping."""
    if not bounds:
        raise ValueError("no ef_search was measured")
    for ef in sorted(bounds):
        if bounds[ef] >= target:
            return ef, True
    best = max(bounds.values())
    return min(ef for ef, r in bounds.items() if r == best), False


def sample_queries(version: ModelVersion, n: int) -> list[int]:
    """Up to n image ids of `version`'s rows, drawn at random by PostgreSQL."""
    return list(Embedding.objects.using(DEFAULT_DB_ALIAS).filter(model_version=version).order_by("?")
                .values_list("image_id", flat=True)[:n])


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def held_out_query(version: ModelVersion, image_id: int) -> np.ndarray | None:
    """A query vector near the stored row x of `image_id` but on no node of
    the graph: x reflected through its nearest other row y, unit(2y − x),
    float32 of shape (D,). Its nearest row is then y, at about x's nearest-row
    distance, as for a new image of that neighbourhood.

    Why not the stored row itself: a walk towards a row that is in the graph
    reaches that row's node, whose links are its neighbours, so its recall
    overstates a new image's (at 100,000 rows: 0.980 against 0.915 for fresh
    queries at ef_search 20). Of six constructions measured against fresh
    queries (docs/scaling.md, 100,000 rows of two kinds, ef_search 20 / 40 /
    60 / 100), this one was the only one never above them: rows shaped like
    real embeddings 0.880 / 0.944 / 0.958 / 0.992 against fresh 0.915 / 0.973
    / 0.987 / 0.997; isotropic clusters 0.832 / 0.968 / 0.990 / 0.994 against
    0.875 / 0.982 / 0.997 / 1.000. So the breadth chosen errs towards recall.
    The construction is this project's, not a published method;
    bench/scale.py checks the chosen breadth against fresh queries.
    Returns None when the row is gone (deleted meanwhile) or every one of its
    10 nearest rows duplicates it (closer than DUPLICATE_DISTANCE): the
    reflection would be the row itself, a node."""
    rows = Embedding.objects.using(DEFAULT_DB_ALIAS).filter(model_version=version)
    stored = rows.filter(image_id=image_id).values_list("vector", flat=True).first()
    if stored is None:
        return None
    row = _unit(np.asarray(stored, dtype=np.float32))
    hits, _ = fetch(_on_primary(neighbours_queryset(version, vector=row, exclude_image_id=image_id, exact=True)), 10,
                    exact=True)
    other = next((h for h in hits if 1.0 - h.score > DUPLICATE_DISTANCE), None)
    nearest_row = rows.filter(image_id=other.image_id).values_list("vector", flat=True).first() if other else None
    if nearest_row is None:
        return None
    return _unit(2 * _unit(np.asarray(nearest_row, dtype=np.float32)) - row).astype(np.float32)


def _on_primary(queryset):
    """Calibration reads the primary: a replica that has not replayed the new
    index yet would answer the "walk" with an exact scan, and recall 1.0."""
    return queryset.using(DEFAULT_DB_ALIAS)


def calibrate(version: ModelVersion, *, queries: int | None = None, k: int = 10, target: float | None = None,
              ladder: Sequence[int] = EF_SEARCH_LADDER, progress: Progress | None = None,
              query_ids: Sequence[int] | None = None) -> Calibration | None:
    """Measure recall@k of `version`'s HNSW walk at each breadth of `ladder`
    (at least 2k, at most 1,000, ascending), stopping at the first whose
    recall's 95 % lower bound reaches `target` (default CBIR_HNSW_TARGET_RECALL), over `queries`
    (default CBIR_HNSW_CALIBRATION_QUERIES) of its rows or the given
    `query_ids` (a row that is gone, or that only duplicates have near, is
    skipped). progress(done, total, message) after each query's two exact
    scans. Runs on the primary database.

    Returns None when the version has no more than k rows (every search is
    then exact in effect) or no usable query. Raises ValueError for a target outside
    (0, 1] or an empty ladder; database errors propagate."""
    target = settings.CBIR_HNSW_TARGET_RECALL if target is None else float(target)
    if not 0 < target <= 1:
        raise ValueError(f"the target recall must be in (0, 1], not {target}")
    breadths = sorted({min(max(int(ef), 2 * k), MAX_EF_SEARCH) for ef in ladder})
    if not breadths:
        raise ValueError("the ladder of ef_search values is empty")
    rows = Embedding.objects.using(DEFAULT_DB_ALIAS).filter(model_version=version).count()
    if rows <= k:
        return None
    start = time.perf_counter()
    ids = list(query_ids) if query_ids is not None else sample_queries(
        version, settings.CBIR_HNSW_CALIBRATION_QUERIES if queries is None else int(queries))
    if not ids:
        return None
    progress = progress or (lambda done, total, message: None)
    vectors, truth = [], []
    for i, image_id in enumerate(ids):
        vector = held_out_query(version, image_id)
        if vector is not None:
            hits, _ = fetch(_on_primary(neighbours_queryset(version, vector=vector, exact=True)), k, exact=True)
            vectors.append(vector)
            truth.append([1.0 - h.score for h in hits])
        progress(i + 1, len(ids), f"measuring recall@{k} to choose ef_search: query {i + 1} of {len(ids)}")
    if not vectors:
        return None
    recall: dict[int, float] = {}
    bounds: dict[int, float] = {}
    for ef in breadths:
        per_query = []
        for vector, exact in zip(vectors, truth):
            hits, _ = fetch(_on_primary(neighbours_queryset(version, vector=vector, plan="hnsw")), k, ef_search=ef)
            per_query.append(recall_with_ties([1.0 - h.score for h in hits], exact, k))
        recall[ef], bounds[ef] = statistics.fmean(per_query), lower_bound(per_query)
        if bounds[ef] >= target:
            break
    chosen, met = choose_ef_search(bounds, target)
    return Calibration(ef_search=chosen, target_recall=target, met=met, recall=recall, lower_bound=bounds, k=k,
                       queries=len(vectors), rows=rows, seconds=time.perf_counter() - start, query_ids=tuple(ids))


def save(version: ModelVersion, calibration: Calibration) -> None:
    """Store `calibration` as metrics[CALIBRATION], keeping every other key (ModelVersion.update_metrics)."""
    version.update_metrics(lambda metrics: metrics.update({CALIBRATION: calibration.as_dict()}))


def is_stale(version: ModelVersion, rows: int) -> bool:
    """True when `version` has no calibration, or its row count has doubled or
    halved since it was measured (a graph of a different size needs a
    different breadth for the same recall)."""
    stored = (version.metrics or {}).get(CALIBRATION) or {}
    measured = int(stored.get("rows") or 0)
    return measured <= 0 or not measured / 2 < rows < measured * 2
