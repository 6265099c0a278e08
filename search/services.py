"""Searching: one SQL statement ordered by cosine distance on the active model
version's HNSW index. Views, the API and the search_image command call these."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from django.conf import settings
from django.db import connection, transaction

from search.imaging import ImageRejected, decode_image
from search.models import Dataset, Image
from training.inference import embed_batch, network_for, preprocessing_for
from training.models import ModelVersion


class SearchError(Exception):
    """A search that cannot be answered; `status` is the HTTP status to give."""

    status = 400


class BadParameter(SearchError):
    status = 400


class UploadTooLarge(SearchError):
    status = 413


class NotFound(SearchError):
    status = 404


class IndexNotReady(SearchError):
    status = 503


@dataclass
class Hit:
    image_id: int
    score: float  # cosine similarity, 1.0 = identical direction
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


@dataclass
class SearchResult:
    model: ModelVersion
    k: int
    hits: list[Hit]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    query_rgb: object = None  # the decoded upload (PIL RGB), for a preview; never stored
    notice: str | None = None  # why there are fewer than k results, when there are (result_notice)

    def as_dict(self) -> dict:
        return {"model": self.model.name, "k": self.k, "results": [h.as_dict() for h in self.hits],
                "notice": self.notice}


def result_notice(version: ModelVersion, dataset: Dataset | None, hits: list, k: int, *,
                  excluded: int = 0) -> str | None:
    """Why a search found fewer than k images, in words; None when it found k.
    `excluded`: images left out on purpose (the query image of "more like this")."""
    if len(hits) >= k:
        return None
    where = f"dataset {dataset.name!r}" if dataset is not None else "the collection"
    images = Image.objects.filter(dataset=dataset) if dataset is not None else Image.objects.all()
    embeddings = version.embeddings.filter(image__dataset=dataset) if dataset is not None else version.embeddings
    total, indexed = images.count(), embeddings.count()
    if total == 0:
        return f"{where} has no images yet"
    if indexed == 0:
        return (f"nothing in {where} is indexed yet by {version.name}: build its index "
                f"(python manage.py build_index --dataset NAME, or Build index… in the admin)")
    if indexed < total:
        return f"only {indexed:,} of the {total:,} images of {where} are indexed by {version.name} so far"
    return f"{where} has only {indexed - excluded:,} indexed image{'s' if indexed - excluded != 1 else ''} to show"


def parse_k(raw) -> int:
    if raw is None or raw == "":
        return settings.CBIR_DEFAULT_K
    try:
        k = int(str(raw).strip())
    except (TypeError, ValueError):
        raise BadParameter(f"k must be a whole number from 1 to {settings.CBIR_MAX_K}, not {str(raw)[:20]!r}") from None
    if not 1 <= k <= settings.CBIR_MAX_K:
        raise BadParameter(f"k must be from 1 to {settings.CBIR_MAX_K}, not {k}")
    return k


def parse_dataset(name) -> Dataset | None:
    if name is None or str(name).strip() == "":
        return None
    # PostgreSQL refuses NUL in text (a DataError, so a 500); no dataset has one in its name.
    dataset = None if "\x00" in str(name) else Dataset.objects.filter(name=str(name).strip()).first()
    if dataset is None:
        raise BadParameter(f"unknown dataset {str(name)[:100]!r}")
    return dataset


def ready_version() -> ModelVersion:
    version = ModelVersion.active()
    if version is None or not version.index_exists():
        raise IndexNotReady("no search index is ready yet: import images and build the index "
                            "(python manage.py build_index --dataset NAME)")
    return version


def embed_query(version: ModelVersion, rgb) -> np.ndarray:
    model, device = network_for(version)
    tensor = preprocessing_for(version)(rgb)[None]
    return embed_batch(model, device, tensor)[0]


def _vector_literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.6g}" for x in np.asarray(vector, dtype=np.float32)) + "]"


def nearest_query(version: ModelVersion, *, vector: np.ndarray | None = None, image_id: int | None = None, k: int,
                  dataset: Dataset | None = None, exclude_image_id: int | None = None) -> tuple[str, list]:
    """The SQL (and parameters) of a nearest-neighbour search; see nearest()."""
    dim = int(version.dimension)
    expr = f"e.vector::halfvec({dim})"
    if vector is not None:
        query_sql, query_params = f"%s::halfvec({dim})", [_vector_literal(vector)]
    else:
        query_sql = (f"(SELECT q.vector::halfvec({dim}) FROM search_embedding q "
                     f"WHERE q.image_id = %s AND q.model_version_id = %s)")
        query_params = [image_id, version.pk]
    where = ["e.model_version_id = %s"]
    params: list = [version.pk]
    if dataset is not None:
        where.append("i.dataset_id = %s")
        params.append(dataset.pk)
    if exclude_image_id is not None:
        where.append("e.image_id <> %s")
        params.append(exclude_image_id)
    sql = (
        f"SELECT e.image_id, 1 - ({expr} <=> {query_sql}) AS score, i.label, d.name, i.file, i.thumbnail "
        f"FROM search_embedding e JOIN search_image i ON i.id = e.image_id "
        f"JOIN search_dataset d ON d.id = i.dataset_id "
        f"WHERE {' AND '.join(where)} "
        f"ORDER BY {expr} <=> {query_sql} LIMIT %s"
    )
    return sql, query_params + params + query_params + [k]


def set_search_options(cursor, k: int) -> None:
    """Per-transaction HNSW settings: a search breadth of at least 2k, and an
    iterative scan so a dataset filter still yields k rows, in exact order."""
    ef_search = min(max(settings.CBIR_HNSW_EF_SEARCH, 2 * k), 1000)
    cursor.execute(f"SET LOCAL hnsw.ef_search = {int(ef_search)}")
    cursor.execute("SET LOCAL hnsw.iterative_scan = strict_order")
    # On a small table the planner would rather sort every row of the version
    # than start an HNSW scan; ordering through the index is what scales, and
    # measured faster even at 146 rows (docs/benchmarks.md), so ask for it.
    cursor.execute("SET LOCAL enable_sort = off")


def nearest(version: ModelVersion, *, vector: np.ndarray | None = None, image_id: int | None = None, k: int,
            dataset: Dataset | None = None, exclude_image_id: int | None = None) -> list[Hit]:
    """The k nearest images by cosine distance, in one statement on the version's HNSW index.

    The query is either a vector or an indexed image (its stored vector is read
    inside the same statement).
    """
    sql, params = nearest_query(version, vector=vector, image_id=image_id, k=k, dataset=dataset,
                                exclude_image_id=exclude_image_id)
    with transaction.atomic(), connection.cursor() as cursor:
        set_search_options(cursor, k)
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    return [Hit(image_id=r[0], score=float(r[1]), label=r[2], dataset=r[3], file=r[4], thumbnail=r[5]) for r in rows]


def search_by_upload(data: bytes, *, k=None, dataset=None) -> SearchResult:
    """Search with uploaded bytes. The image is decoded in memory and never stored."""
    k = parse_k(k)
    dataset = parse_dataset(dataset)
    if len(data) > settings.CBIR_MAX_UPLOAD_BYTES:
        raise UploadTooLarge(f"the upload is larger than the limit of {settings.CBIR_MAX_UPLOAD_BYTES:,} bytes")
    version = ready_version()
    timings = {}
    start = time.perf_counter()
    try:
        decoded = decode_image(data, draft_size=2 * input_size(version))
    except ImageRejected as exc:
        raise BadParameter(str(exc)) from None
    timings["decode"] = time.perf_counter() - start
    start = time.perf_counter()
    vector = embed_query(version, decoded.rgb)
    timings["forward"] = time.perf_counter() - start
    start = time.perf_counter()
    hits = nearest(version, vector=vector, k=k, dataset=dataset)
    timings["sql"] = time.perf_counter() - start
    return SearchResult(model=version, k=k, hits=hits, timings=timings, query_rgb=decoded.rgb,
                        notice=result_notice(version, dataset, hits, k))


def input_size(version: ModelVersion) -> int:
    return int((version.preprocessing or {}).get("size", 224))


def search_by_image(image_id: int, *, k=None, dataset=None) -> SearchResult:
    """"More like this": neighbours of an indexed image, the image itself excluded."""
    k = parse_k(k)
    dataset = parse_dataset(dataset)
    version = ready_version()
    if not Image.objects.filter(pk=image_id).exists():
        raise NotFound(f"no image with id {image_id}")
    if not version.embeddings.filter(image_id=image_id).exists():
        raise IndexNotReady(f"image {image_id} is not indexed yet by {version.name}")
    start = time.perf_counter()
    hits = nearest(version, image_id=image_id, k=k, dataset=dataset, exclude_image_id=image_id)
    excluded = int(dataset is None or Image.objects.filter(pk=image_id, dataset=dataset).exists())
    return SearchResult(model=version, k=k, hits=hits, timings={"sql": time.perf_counter() - start},
                        notice=result_notice(version, dataset, hits, k, excluded=excluded))
