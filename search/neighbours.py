"""Nearest neighbours: the one query builder for search, "more like this",
evaluation and near-duplicate lookups.

The statement is written with pgvector-python's Django API (`CosineDistance`
on the stored `halfvec` cast to the version's dimension, `HalfVectorField`),
so it matches the version's partial HNSW index expression
(`vector::halfvec(D) halfvec_cosine_ops WHERE model_version_id = N`, see
search/indexing.py) and PostgreSQL orders through that index. The query
vector is bound as one parameter, in binary, through pgvector's psycopg
adapter (pgvector-python `pgvector.psycopg.register_vector`), instead of
being formatted as 1,000+ numbers of text.

A dataset filter is answered by one of three plans, by the subset's size
(measured in docs/scaling.md):

- at most CBIR_EXACT_SEARCH_MAX_ROWS rows of the version: an exact scan of
  them (found through the (dataset, model_version) b-tree, then sorted by
  distance: the ORDER BY uses the plain column, which no HNSW index matches,
  so the plan cannot walk a graph);
- a larger dataset with an HNSW index of its own (search/indexing.py builds
  one for each dataset of up to CBIR_DATASET_INDEX_MAX_SHARE of the version's
  rows): PostgreSQL walks that smaller graph, whose every row matches, as
  approximate as an unfiltered search of that many rows;
- otherwise the version's index with an iterative scan of up to
  CBIR_HNSW_MAX_SCAN_TUPLES tuples, the filter applied on the way.

The last two are one statement, `plan="hnsw"`: both partial indexes match it
and the planner takes the smaller. When a walk yields fewer than k rows the
statement is run again as an exact scan, so a result never has fewer than
min(k, matching rows).

Reads go through the `cbir_search` router hint (cbirsite/routers.py): to the
`replica` database alias when DATABASE_REPLICA_URL is set, else to `default`.

Only the per-transaction search settings (`SET LOCAL hnsw.*`) are raw SQL:
the ORM has no way to say them.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from django.conf import settings
from django.db import connections, transaction
from django.db.models import Expression, F, QuerySet, Subquery
from django.db.models.functions import Cast
from pgvector import HalfVector
from pgvector.django import CosineDistance, HalfVectorField
from pgvector.psycopg import register_vector

from cbirsite.routers import SEARCH_HINT
from search import hnsw
from search.models import Dataset, Embedding
from training.models import ModelVersion

MAX_EF_SEARCH = 1000  # pgvector's upper bound for hnsw.ef_search
# The breadth of a version not yet calibrated (search/calibration.py): recall@10
# 0.985 at a million rows shaped like EfficientNet-Lite0's embeddings (docs/scaling.md).
DEFAULT_EF_SEARCH = 200
CALIBRATION = "search_calibration"  # ModelVersion.metrics key of search/calibration.py's result
EXACT, HNSW = "exact", "hnsw"
PLANS = (EXACT, HNSW)


@dataclass
class Hit:
    """One result: an image and its cosine similarity to the query (1.0 = same direction)."""

    image_id: int
    score: float
    label: str | None
    dataset: str
    file: str
    thumbnail: str

    @property
    def url(self) -> str:
        return settings.MEDIA_URL + self.file

    @property
    def thumbnail_url(self) -> str:
        return settings.MEDIA_URL + self.thumbnail

    def as_dict(self) -> dict:
        return {"image_id": self.image_id, "score": round(self.score, 6), "label": self.label,
                "dataset": self.dataset, "url": self.url, "thumbnail_url": self.thumbnail_url}


class QueryVector(Expression):
    """A query vector as one bound parameter, cast to the version's halfvec(D).

    `vector`: float array of shape (D,). It is sent as a pgvector `HalfVector`;
    with the adapter registered on the connection, psycopg dumps it in binary."""

    def __init__(self, vector: np.ndarray, dimensions: int) -> None:
        super().__init__(output_field=HalfVectorField(dimensions=dimensions))
        values = np.asarray(vector, dtype=np.float32)
        self.vector = HalfVector(values)
        self.dimensions = int(dimensions)
        # Django compares expressions by a hash of their arguments; hashing
        # 1,280 numbers one by one cost ~3 ms a query, a digest of the bytes ~µs.
        self._digest = hashlib.blake2b(values.tobytes(), digest_size=16).digest()

    @property
    def identity(self) -> tuple:
        return (type(self), self.dimensions, self._digest)

    def as_sql(self, compiler: Any, connection: Any) -> tuple[str, list]:
        return f"%s::halfvec({self.dimensions})", [self.vector]


def stored_vector(version: ModelVersion) -> Cast:
    """The indexed expression (search.hnsw.indexed_expression): what a search orders by."""
    return hnsw.indexed_expression(version)


def _search_rows(model):
    """`model`'s manager carrying the search router hint (replica when configured)."""
    return model.objects.db_manager(hints={SEARCH_HINT: True})


def subset_is_small(version: ModelVersion, dataset: Dataset, limit: int | None = None) -> bool:
    """True when `version` has at most `limit` (CBIR_EXACT_SEARCH_MAX_ROWS)
    rows of `dataset`: an exact scan of them is the plan. Counted up to
    limit + 1 rows only, on the (dataset, model_version) b-tree (an index-only
    scan), so it costs O(limit) at most whatever the dataset's size."""
    limit = settings.CBIR_EXACT_SEARCH_MAX_ROWS if limit is None else int(limit)
    if limit <= 0:
        return False
    rows = _search_rows(Embedding).filter(dataset=dataset, model_version=version)
    # A column of the b-tree, not the id: the count can then read the index alone.
    return rows.order_by().values("model_version")[:limit + 1].count() <= limit


def plan_for(version: ModelVersion, dataset: Dataset | None, splits: Sequence[str] | None = None) -> str:
    """"exact" for a dataset small enough to scan (subset_is_small), else
    "hnsw". A split filter alone keeps a large share of the rows (60/20/20),
    so it stays on the index."""
    return EXACT if dataset is not None and subset_is_small(version, dataset) else HNSW


def neighbours_queryset(version: ModelVersion, *, vector: np.ndarray | None = None, image_id: int | None = None,
                        dataset: Dataset | None = None, splits: Sequence[str] | None = None,
                        exclude_image_id: int | None = None, exact: bool = False,
                        plan: str | None = None, exclude_image_ids: Sequence[int] = ()) -> QuerySet:
    """Embeddings of `version` ordered by cosine distance to the query, as rows
    (image_id, distance, label, dataset name, file, thumbnail).

    The query is a vector of shape (D,) or an indexed image (its stored
    vector is read inside the same statement). Optional filters: a dataset,
    splits, one image left out (or several, `exclude_image_ids`). `plan`: "exact" or "hnsw", default plan_for()
    (exact=True means "exact"). The exact plan orders by the plain column, so
    it sorts the filtered rows whatever the session settings; ties are broken
    by image id (the order metrics.rank_with_ties uses). The "hnsw" plan orders
    by the indexed expression; run it with fetch(), which sets the scan and
    falls back to an exact scan when the walk finds fewer than k rows.
    Raises ValueError for a bad combination of arguments."""
    if (vector is None) == (image_id is None):
        raise ValueError("give exactly one of vector and image_id")
    if plan is not None and plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, not {plan!r}")
    if exact:
        plan = EXACT
    elif plan is None:
        plan = plan_for(version, dataset, splits)
    query: Expression | Subquery
    if vector is not None:
        query = QueryVector(vector, int(version.dimension))
    else:
        query = Subquery(Embedding.objects.filter(image_id=int(image_id or 0), model_version=version)
                         .values(q=stored_vector(version))[:1])
    rows = _search_rows(Embedding).filter(model_version=version)
    if dataset is not None:
        rows = rows.filter(dataset=dataset)
    if splits is not None:
        rows = rows.filter(image__split__in=[str(s) for s in splits])
    if exclude_image_id is not None:
        rows = rows.exclude(image_id=exclude_image_id)
    if exclude_image_ids:
        rows = rows.exclude(image_id__in=[int(i) for i in exclude_image_ids])
    if plan == EXACT:
        # The uncast column: equal distances, but no index expression matches it.
        distance = CosineDistance(F("vector"), query)
        order = ["distance", "image_id"]
    else:
        distance = CosineDistance(stored_vector(version), query)
        order = ["distance"]
    return (rows.annotate(distance=distance).order_by(*order)
            .values_list("image_id", "distance", "image__label", "image__dataset__name", "image__file",
                         "image__thumbnail"))


_registered: weakref.WeakSet = weakref.WeakSet()


def adapted_connection(alias: str = "default") -> psycopg.Connection:
    """Django's psycopg connection for `alias`, with pgvector's types registered once."""
    wrapper = connections[alias]
    wrapper.ensure_connection()
    raw = wrapper.connection
    if raw not in _registered:
        register_vector(raw)
        _registered.add(raw)
    return raw


def compiled(queryset: QuerySet, k: int) -> tuple[str, tuple]:
    """The SQL and parameters of the first k rows of `queryset` (for EXPLAIN and benchmarks)."""
    adapted_connection(queryset.db)
    return queryset[:k].query.get_compiler(using=queryset.db).as_sql()


def ef_search_for(k: int, version: ModelVersion | None = None) -> int:
    """hnsw.ef_search for a top-k query of `version`: CBIR_HNSW_EF_SEARCH when
    it is set, else the version's calibrated breadth (search/calibration.py),
    else DEFAULT_EF_SEARCH; at least 2k, at most 1,000."""
    chosen = settings.CBIR_HNSW_EF_SEARCH
    if chosen is None and version is not None:
        chosen = ((version.metrics or {}).get(CALIBRATION) or {}).get("ef_search")
    return min(max(int(chosen or DEFAULT_EF_SEARCH), 2 * k), MAX_EF_SEARCH)


def search_options(cursor: Any, k: int, ef_search: int | None = None) -> None:
    """Per-transaction HNSW settings: a search breadth of `ef_search` (default
    ef_search_for(k)), at least 2k, and an iterative scan so a filter still
    yields k rows, in exact order, visiting at most CBIR_HNSW_MAX_SCAN_TUPLES
    tuples."""
    ef = min(max(int(ef_search or ef_search_for(k)), 2 * k), MAX_EF_SEARCH)
    # One round trip: several statements are allowed in a call without parameters.
    cursor.execute(f"SET LOCAL hnsw.ef_search = {ef}; "
                   "SET LOCAL hnsw.iterative_scan = strict_order; "
                   f"SET LOCAL hnsw.max_scan_tuples = {int(settings.CBIR_HNSW_MAX_SCAN_TUPLES)}; "
                   # On a small table the planner would rather sort every row of the version
                   # than start an HNSW scan; ordering through the index is what scales, and
                   # measured faster even at 146 rows (docs/benchmarks.md), so ask for it.
                   "SET LOCAL enable_sort = off; "
                   "SET LOCAL enable_indexscan = on")  # exact_options may have run earlier in an outer transaction


def exact_options(cursor: Any) -> None:
    """A sequential scan and a sort: the true top k, whatever the index would return."""
    # enable_sort: search's settings may linger in an outer transaction.
    cursor.execute("SET LOCAL enable_indexscan = off; SET LOCAL enable_sort = on")


def _run(queryset: QuerySet, sql: str, params: tuple, k: int, *, exact: bool,
         ef_search: int | None = None) -> tuple[list[tuple], float]:
    alias = queryset.db
    with transaction.atomic(using=alias):
        raw = adapted_connection(alias)
        # A server-side-binding cursor: Django's own (client-side binding)
        # cursor would format the HalfVector parameter as text.
        with psycopg.Cursor(raw) as cursor:
            if exact:
                exact_options(cursor)
            else:
                search_options(cursor, k, ef_search)
            start = time.perf_counter()
            cursor.execute(sql, params)
            rows = cursor.fetchall()
            return rows, time.perf_counter() - start


def walks_index(queryset: QuerySet) -> bool:
    """True for a neighbours_queryset of the "hnsw" plan (it orders by the
    indexed expression, the cast); the "exact" plan orders by the column."""
    distance = queryset.query.annotations.get("distance")
    return distance is not None and isinstance(distance.get_source_expressions()[0], Cast)


def fetch(queryset: QuerySet, k: int, *, exact: bool = False,
          ef_search: int | None = None) -> tuple[list[Hit], float]:
    """Run the first k rows of a neighbours_queryset in one transaction with the
    search (or exact) settings; returns (hits, seconds spent in the statements).
    `ef_search`: the walk's breadth, default ef_search_for(k) (give
    ef_search_for(k, version) for the version's calibrated one).

    When the index walk returns fewer than k rows (a filter the iterative scan
    could not satisfy within hnsw.max_scan_tuples), the statement runs again
    as an exact scan, so a result never has fewer than min(k, matching rows)."""
    sql, params = compiled(queryset, k)
    rows, seconds = _run(queryset, sql, params, k, exact=exact, ef_search=ef_search)
    if not exact and len(rows) < k and walks_index(queryset):
        rows, more = _run(queryset, sql, params, k, exact=True)
        seconds += more
    hits = [Hit(image_id=r[0], score=1.0 - float(r[1]), label=r[2], dataset=r[3], file=r[4], thumbnail=r[5])
            for r in rows]
    return hits, seconds


def nearest(version: ModelVersion, *, vector: np.ndarray | None = None, image_id: int | None = None, k: int,
            dataset: Dataset | None = None, splits: Sequence[str] | None = None,
            exclude_image_id: int | None = None, exact: bool = False,
            exclude_image_ids: Sequence[int] = ()) -> list[Hit]:
    """The k nearest images by cosine distance, in one statement: through an
    HNSW index (the dataset's own when it has one, else the version's) at the
    version's breadth (ef_search_for), or an exact scan for a small filtered
    subset (plan_for) or with exact=True (ground truth)."""
    queryset = neighbours_queryset(version, vector=vector, image_id=image_id, dataset=dataset, splits=splits,
                                   exclude_image_id=exclude_image_id, exact=exact,
                                   exclude_image_ids=exclude_image_ids)
    return fetch(queryset, k, exact=exact, ef_search=ef_search_for(k, version))[0]


def explain(queryset: QuerySet, k: int, *, exact: bool = False, analyze: bool = False,
            ef_search: int | None = None) -> str:
    """PostgreSQL's plan for the first k rows of `queryset`, run with the same settings as fetch()."""
    sql, params = compiled(queryset, k)
    rows, _ = _run(queryset, ("EXPLAIN ANALYZE " if analyze else "EXPLAIN ") + sql, params, k, exact=exact,
                   ef_search=ef_search)
    return "\n".join(row[0] for row in rows)
