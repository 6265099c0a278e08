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

Only the per-transaction search settings (`SET LOCAL hnsw.*`) are raw SQL:
the ORM has no way to say them.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Expression, QuerySet, Subquery
from django.db.models.functions import Cast
from pgvector import HalfVector
from pgvector.django import CosineDistance, HalfVectorField
from pgvector.psycopg import register_vector

from search.models import Dataset, Embedding
from training.models import ModelVersion

MAX_EF_SEARCH = 1000  # pgvector's upper bound for hnsw.ef_search


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
        self.vector = HalfVector(np.asarray(vector, dtype=np.float32))
        self.dimensions = int(dimensions)

    def as_sql(self, compiler: Any, connection: Any) -> tuple[str, list]:
        return f"%s::halfvec({self.dimensions})", [self.vector]


def stored_vector(version: ModelVersion) -> Cast:
    """The indexed expression: the stored vector cast to the version's dimension."""
    return Cast("vector", HalfVectorField(dimensions=int(version.dimension)))


def neighbours_queryset(version: ModelVersion, *, vector: np.ndarray | None = None, image_id: int | None = None,
                        dataset: Dataset | None = None, splits: Sequence[str] | None = None,
                        exclude_image_id: int | None = None, exact: bool = False) -> QuerySet:
    """Embeddings of `version` ordered by cosine distance to the query, as rows
    (image_id, distance, label, dataset name, file, thumbnail).

    The query is a vector of shape (D,) or an indexed image (its stored
    vector is read inside the same statement). Optional filters: a dataset,
    splits, one image left out. With exact=True ties are broken by image id
    (the order metrics.rank_with_ties uses); run it with `exact_options`."""
    if (vector is None) == (image_id is None):
        raise ValueError("give exactly one of vector and image_id")
    query: Expression | Subquery
    if vector is not None:
        query = QueryVector(vector, int(version.dimension))
    else:
        query = Subquery(Embedding.objects.filter(image_id=int(image_id or 0), model_version=version)
                         .values(q=stored_vector(version))[:1])
    rows = Embedding.objects.filter(model_version=version)
    if dataset is not None:
        rows = rows.filter(image__dataset=dataset)
    if splits is not None:
        rows = rows.filter(image__split__in=[str(s) for s in splits])
    if exclude_image_id is not None:
        rows = rows.exclude(image_id=exclude_image_id)
    order = ["distance", "image_id"] if exact else ["distance"]
    return (rows.annotate(distance=CosineDistance(stored_vector(version), query)).order_by(*order)
            .values_list("image_id", "distance", "image__label", "image__dataset__name", "image__file",
                         "image__thumbnail"))


_registered: weakref.WeakSet = weakref.WeakSet()


def _adapted_connection() -> psycopg.Connection:
    """Django's psycopg connection, with pgvector's types registered once."""
    connection.ensure_connection()
    raw = connection.connection
    if raw not in _registered:
        register_vector(raw)
        _registered.add(raw)
    return raw


def compiled(queryset: QuerySet, k: int) -> tuple[str, tuple]:
    """The SQL and parameters of the first k rows of `queryset` (for EXPLAIN and benchmarks)."""
    _adapted_connection()
    return queryset[:k].query.sql_with_params()


def ef_search_for(k: int) -> int:
    """hnsw.ef_search for a top-k query: CBIR_HNSW_EF_SEARCH, at least 2k, at most 1000."""
    return min(max(settings.CBIR_HNSW_EF_SEARCH, 2 * k), MAX_EF_SEARCH)


def search_options(cursor: Any, k: int) -> None:
    """Per-transaction HNSW settings: a search breadth of at least 2k, and an
    iterative scan so a filter still yields k rows, in exact order."""
    cursor.execute(f"SET LOCAL hnsw.ef_search = {ef_search_for(k)}")
    cursor.execute("SET LOCAL hnsw.iterative_scan = strict_order")
    # On a small table the planner would rather sort every row of the version
    # than start an HNSW scan; ordering through the index is what scales, and
    # measured faster even at 146 rows (docs/benchmarks.md), so ask for it.
    cursor.execute("SET LOCAL enable_sort = off")


def exact_options(cursor: Any) -> None:
    """A sequential scan and a sort: the true top k, whatever the index would return."""
    cursor.execute("SET LOCAL enable_indexscan = off")
    cursor.execute("SET LOCAL enable_sort = on")  # search's settings may linger in an outer transaction


def fetch(queryset: QuerySet, k: int, *, exact: bool = False) -> tuple[list[Hit], float]:
    """Run the first k rows of a neighbours_queryset in one transaction with the
    search (or exact) settings; returns (hits, seconds spent in the statement)."""
    sql, params = compiled(queryset, k)
    with transaction.atomic():
        raw = _adapted_connection()
        # A server-side-binding cursor: Django's own (client-side binding)
        # cursor would format the HalfVector parameter as text.
        with psycopg.Cursor(raw) as cursor:
            if exact:
                exact_options(cursor)
            else:
                search_options(cursor, k)
            start = time.perf_counter()
            cursor.execute(sql, params)
            rows = cursor.fetchall()
            seconds = time.perf_counter() - start
    hits = [Hit(image_id=r[0], score=1.0 - float(r[1]), label=r[2], dataset=r[3], file=r[4], thumbnail=r[5])
            for r in rows]
    return hits, seconds


def nearest(version: ModelVersion, *, vector: np.ndarray | None = None, image_id: int | None = None, k: int,
            dataset: Dataset | None = None, splits: Sequence[str] | None = None,
            exclude_image_id: int | None = None, exact: bool = False) -> list[Hit]:
    """The k nearest images by cosine distance, in one statement on the
    version's HNSW index (exact=True: a sequential scan, for ground truth)."""
    queryset = neighbours_queryset(version, vector=vector, image_id=image_id, dataset=dataset, splits=splits,
                                   exclude_image_id=exclude_image_id, exact=exact)
    return fetch(queryset, k, exact=exact)[0]


def explain(queryset: QuerySet, k: int, *, exact: bool = False, analyze: bool = False) -> str:
    """PostgreSQL's plan for the first k rows of `queryset`, run with the same settings as fetch()."""
    sql, params = compiled(queryset, k)
    with transaction.atomic():
        raw = _adapted_connection()
        with psycopg.Cursor(raw) as cursor:
            if exact:
                exact_options(cursor)
            else:
                search_options(cursor, k)
            cursor.execute(("EXPLAIN ANALYZE " if analyze else "EXPLAIN ") + sql, params)
            return "\n".join(row[0] for row in cursor.fetchall())

