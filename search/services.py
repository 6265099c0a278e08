"""Searching: one SQL statement ordered by cosine distance on the active model
version's HNSW index. Views, the API and the search_image command call these."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from django.conf import settings

from search import feedback
from search.errors import BadParameter, IndexNotReady, NotFound, SearchError, UploadTooLarge  # noqa: F401 - their home for callers
from search.hnsw import VALID, index_state
from search.imaging import ImageRejected, decode_image
from search.models import Dataset, Image, dataset_named
from search.neighbours import Hit, nearest
from training.core.inference import embed_query
from training.models import ModelVersion


@dataclass
class SearchResult:
    model: ModelVersion
    k: int
    hits: list[Hit]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    query_rgb: object = None  # the decoded upload (PIL RGB), for a preview; never stored
    notice: str | None = None  # why there are fewer than k results, when there are (result_notice)
    query_sha256: str | None = None  # an upload's SHA-256: marks and refined searches name it (search.feedback)
    positive: list[int] = field(default_factory=list)  # relevance feedback the query was refined with
    negative: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        answer = {"model": self.model.name, "k": self.k, "results": [h.as_dict() for h in self.hits],
                  "notice": self.notice}
        if self.query_sha256:
            answer["query_sha256"] = self.query_sha256
        if self.positive or self.negative:
            answer["positive"], answer["negative"] = self.positive, self.negative
        return answer


def result_notice(version: ModelVersion, dataset: Dataset | None, hits: list, k: int, *,
                  excluded: int = 0) -> str | None:
    """Why a search found fewer than k images, in words; None when it found k.
    `excluded`: images left out on purpose (the query image of "more like this")."""
    if len(hits) >= k:
        return None
    where = f"dataset {dataset.name!r}" if dataset is not None else "the collection"
    images = Image.objects.filter(dataset=dataset) if dataset is not None else Image.objects.all()
    embeddings = version.embeddings.filter(dataset=dataset) if dataset is not None else version.embeddings
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
    # The spelling datasets are created with (NFC, stripped); a name none can have (NUL, ...) is unknown.
    dataset = dataset_named(name)
    if dataset is None:
        raise BadParameter(f"unknown dataset {str(name)[:100]!r}")
    return dataset


def ready_version() -> ModelVersion:
    version = ModelVersion.active()
    if version is None or index_state(version) != VALID:
        raise IndexNotReady("no search index is ready yet: import images and build the index "
                            "(python manage.py build_index --dataset NAME)")
    return version


def search_by_upload(data: bytes, *, k=None, dataset=None, positive: Sequence = (),
                     negative: Sequence = (), user=None, session_key: str = "",
                     remember: bool = True) -> SearchResult:
    """Search with uploaded bytes. The image is decoded in memory and never
    stored; with `remember`, its embedding is kept under its SHA-256 and who
    searched (`user`, else `session_key`; search.feedback.remember_upload) for
    that searcher's marks and refined searches. `positive` / `negative`: image
    ids marked right / wrong, to refine the query with (search_refined)."""
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
    marks = _parse_marks(version, positive, negative, dataset)
    start = time.perf_counter()
    vector = embed_query(version, decoded.rgb)
    timings["forward"] = time.perf_counter() - start
    sha256 = hashlib.sha256(data).hexdigest()
    if remember:
        feedback.remember_upload(version, sha256, vector, user=user, session_key=session_key)
    if marks[0] or marks[1]:
        result = _refined_search(version, vector, *marks, k=k, dataset=dataset)
        result.timings = {**timings, **result.timings}
    else:
        start = time.perf_counter()
        hits = nearest(version, vector=vector, k=k, dataset=dataset)
        timings["sql"] = time.perf_counter() - start
        result = SearchResult(model=version, k=k, hits=hits, timings=timings, notice=result_notice(version, dataset,
                                                                                                     hits, k))
    result.query_rgb, result.query_sha256 = decoded.rgb, sha256
    return result


def _parse_marks(version: ModelVersion, positive: Sequence, negative: Sequence,
                 dataset: Dataset | None) -> tuple[list[int], list[int], object, object]:
    """(positive ids, negative ids, their vectors (P, D) and (N, D)), checked:
    BadParameter for a bad, unknown, unindexed or out-of-dataset id, an id
    both positive and negative, or more than CBIR_FEEDBACK_MAX_IDS ids."""
    pos, neg = feedback.parse_ids(positive, "positive"), feedback.parse_ids(negative, "negative")
    feedback.check_count(pos, neg)
    both = sorted(set(pos) & set(neg))
    if both:
        raise BadParameter(f"image {', '.join(map(str, both[:10]))} is marked both positive and negative")
    return (pos, neg, feedback.stored_vectors(version, pos, "positive", dataset=dataset),
            feedback.stored_vectors(version, neg, "negative", dataset=dataset))


def _refined_search(version: ModelVersion, query, positive: list[int], negative: list[int], pos_vectors,
                    neg_vectors, *, k: int, dataset: Dataset | None, exclude: Sequence[int] = ()) -> SearchResult:
    """One search with the Rocchio-moved query (search.feedback.rocchio), through
    the same statement as any search. The negatives (and `exclude`, the query
    image) are left out of the results; the positives are not (they are right
    answers, and usually rank first)."""
    try:
        vector = feedback.rocchio(query, pos_vectors, neg_vectors)
    except ValueError as exc:
        raise BadParameter(str(exc)) from None
    left_out = list(dict.fromkeys([*exclude, *negative]))
    start = time.perf_counter()
    hits = nearest(version, vector=vector, k=k, dataset=dataset, exclude_image_ids=left_out)
    seconds = time.perf_counter() - start
    excluded = 0
    if len(hits) < k:  # only a short page needs the notice's count (result_notice); a full one skips the COUNT
        rows = version.embeddings.filter(image_id__in=left_out)
        excluded = (rows.filter(dataset=dataset) if dataset is not None else rows).count()
    return SearchResult(model=version, k=k, hits=hits, timings={"sql": seconds}, positive=positive,
                        negative=negative, notice=result_notice(version, dataset, hits, k, excluded=excluded))


def search_refined(*, k=None, dataset=None, positive: Sequence = (), negative: Sequence = (),
                   query_sha256: str | None = None, user=None, session_key: str = "") -> SearchResult:
    """A search made of marks alone (several positives and no image: a
    multi-image query), or refining a recent upload named by its SHA-256
    (its remembered embedding). BadParameter without a positive and without
    query_sha256, or for a hash this searcher (`user`, else `session_key`) has
    not searched with recently."""
    k = parse_k(k)
    dataset = parse_dataset(dataset)
    version = ready_version()
    sha256 = feedback.parse_sha256(query_sha256) if query_sha256 else None
    query = feedback.upload_vector(version, sha256, user=user, session_key=session_key) if sha256 else None
    marks = _parse_marks(version, positive, negative, dataset)
    result = _refined_search(version, query, *marks, k=k, dataset=dataset)
    result.query_sha256 = sha256
    return result


def input_size(version: ModelVersion) -> int:
    return int((version.preprocessing or {}).get("size", 224))


def search_by_image(image_id: int, *, k=None, dataset=None, positive: Sequence = (),
                    negative: Sequence = ()) -> SearchResult:
    """"More like this": neighbours of an indexed image, the image itself
    excluded; with `positive` / `negative` ids, refined by them (_refined_search)."""
    k = parse_k(k)
    dataset = parse_dataset(dataset)
    version = ready_version()
    if not Image.objects.filter(pk=image_id).exists():
        raise NotFound(f"no image with id {image_id}")
    if not version.embeddings.filter(image_id=image_id).exists():
        raise IndexNotReady(f"image {image_id} is not indexed yet by {version.name}")
    marks = _parse_marks(version, positive, negative, dataset)
    if marks[0] or marks[1]:
        query = feedback.stored_vectors(version, [image_id], "query")[0]
        return _refined_search(version, query, *marks, k=k, dataset=dataset, exclude=[image_id])
    start = time.perf_counter()
    hits = nearest(version, image_id=image_id, k=k, dataset=dataset, exclude_image_id=image_id)
    excluded = int(dataset is None or Image.objects.filter(pk=image_id, dataset=dataset).exists())
    return SearchResult(model=version, k=k, hits=hits, timings={"sql": time.perf_counter() - start},
                        notice=result_notice(version, dataset, hits, k, excluded=excluded))
