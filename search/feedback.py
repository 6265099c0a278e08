"""Relevance feedback (Rui, Huang, Ortega & Mehrotra 1998, "Relevance Feedback:
A Power Tool for Interactive Content-Based Image Retrieval", IEEE TCSVT 8(5)):
users mark results "right" or "wrong", and a refined search moves the query
vector towards the right ones and away from the wrong ones.

- `rocchio` (search/rocchio.py, plain numpy): the query-point movement of Rocchio (1971), with the weights of
  Manning, Raghavan & Schütze, *Introduction to Information Retrieval* (2008),
  §9.1.1: q' = α·q + β·mean(positives) − γ·mean(negatives), α = 1, β = 0.75,
  γ = 0.15, then L2-normalised (cosine search ignores length, the index
  stores unit vectors).
- `remember_upload` / `upload_vector`: an upload's embedding is kept per
  model version and SHA-256 (search.models.QueryEmbedding) when it is
  searched, so marks and refined searches can name the upload afterwards.
- `record_marks`: validates a batch of marks and stores them, all or none.

Bad input raises search.services.BadParameter (400) with what is wrong, and
nothing is stored.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from search.errors import BadParameter
from search.models import Dataset, Embedding, Feedback, Image, QueryEmbedding
from search.rocchio import ROCCHIO_ALPHA, ROCCHIO_BETA, ROCCHIO_GAMMA, rocchio  # noqa: F401 - re-exported
from training.models import ModelVersion

VERDICTS = tuple(Feedback.Verdict.values)  # ("right", "wrong")
CLEANUP_ONE_IN = 200  # one remembered upload in this many also deletes the expired ones
IMAGE_ID = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() also takes "²" and "①"


def as_array(value) -> np.ndarray:
    """A stored halfvec (pgvector's HalfVector, or the list Django gives) as float32 (D,)."""
    return np.asarray(value.to_list() if hasattr(value, "to_list") else value, dtype=np.float32)


def parse_ids(values: Iterable[object], name: str) -> list[int]:
    """Whole-number image ids from request values, duplicates dropped, order kept;
    BadParameter for anything else."""
    ids: list[int] = []
    for raw in values:
        text = str(raw).strip()
        if not IMAGE_ID.fullmatch(text):
            raise BadParameter(f"{name} must be image ids (whole numbers), not {text[:20]!r}")
        if int(text) not in ids:
            ids.append(int(text))
    return ids


def check_count(*groups: Sequence[int]) -> None:
    total = sum(len(group) for group in groups)
    if total > settings.CBIR_FEEDBACK_MAX_IDS:
        raise BadParameter(f"too many image ids: {total}, at most {settings.CBIR_FEEDBACK_MAX_IDS} in one request")


def stored_vectors(version: ModelVersion, ids: Sequence[int], what: str, *,
                   dataset: Dataset | None = None) -> np.ndarray:
    """The vectors `version` stored for images `ids`, shape (len(ids), D), in
    the order given. BadParameter naming the ids that are not images, not in
    `dataset`, or not indexed by `version`."""
    if not ids:
        return np.zeros((0, int(version.dimension)), dtype=np.float32)
    images = dict(Image.objects.filter(pk__in=ids).values_list("pk", "dataset_id"))
    unknown = [i for i in ids if i not in images]
    if unknown:
        raise BadParameter(f"{what}: no image with id {', '.join(map(str, unknown[:10]))}")
    if dataset is not None:
        elsewhere = [i for i in ids if images[i] != dataset.pk]
        if elsewhere:
            raise BadParameter(f"{what}: image {', '.join(map(str, elsewhere[:10]))} is not in dataset "
                               f"{dataset.name!r}")
    vectors = dict(Embedding.objects.filter(model_version=version, image_id__in=ids).values_list("image_id", "vector"))
    missing = [i for i in ids if i not in vectors]
    if missing:
        raise BadParameter(f"{what}: image {', '.join(map(str, missing[:10]))} is not indexed by {version.name}")
    return np.stack([as_array(vectors[i]) for i in ids])


def remember_upload(version: ModelVersion, sha256: str, vector: np.ndarray) -> None:
    """Keep an upload's embedding (shape (D,)) under (version, sha256), or refresh
    its last_seen; now and then delete those unseen for CBIR_QUERY_EMBEDDING_DAYS."""
    now = timezone.now()
    QueryEmbedding.objects.update_or_create(model_version=version, sha256=sha256,
                                            defaults={"vector": np.asarray(vector, dtype=np.float32),
                                                      "last_seen": now})
    if random.randrange(CLEANUP_ONE_IN) == 0:
        QueryEmbedding.objects.filter(last_seen__lt=now - timedelta(days=settings.CBIR_QUERY_EMBEDDING_DAYS)).delete()


def parse_sha256(raw: object) -> str:
    text = str(raw).strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise BadParameter(f"query_sha256 must be 64 hexadecimal digits, not {str(raw)[:70]!r}")
    return text


def upload_vector(version: ModelVersion, sha256: str) -> np.ndarray:
    """The remembered embedding (D,) of an upload searched with `version` in the
    last CBIR_QUERY_EMBEDDING_DAYS; BadParameter when there is none."""
    cutoff = timezone.now() - timedelta(days=settings.CBIR_QUERY_EMBEDDING_DAYS)
    row = QueryEmbedding.objects.filter(model_version=version, sha256=sha256, last_seen__gte=cutoff).first()
    if row is None:
        raise BadParameter(f"no recent search with an upload of SHA-256 {sha256[:12]}… under {version.name}: "
                           "search with the image first")
    return as_array(row.vector)


@dataclass
class Marks:
    """What a mark request says, validated: see record_marks."""

    query_image_id: int | None
    query_sha256: str
    result_ids: list[int]
    verdict: str


def parse_marks(data, version: ModelVersion, dataset: Dataset | None = None) -> Marks:
    """Read and check a mark request's fields (a QueryDict or a dict of lists):
    exactly one of query_image_id (an image indexed by `version`) and
    query_sha256 (an upload searched with `version` recently); image_id, one or
    more results indexed by `version`, none the query itself; verdict right or
    wrong; optional model (the version the results came from: must be the
    active one). `dataset`: the search's dataset (the request's `dataset`,
    parsed by the caller): the results must be in it."""
    def values(name: str) -> list:
        got = data.getlist(name) if hasattr(data, "getlist") else data.get(name, [])
        return [v for v in (got if isinstance(got, list) else [got]) if str(v).strip() != ""]

    model = values("model")
    if model and str(model[0]) != version.name:
        raise BadParameter(f"these results came from model version {str(model[0])[:100]!r}, but search now uses "
                           f"{version.name}: search again and mark the new results")
    verdicts = values("verdict")
    if len(verdicts) != 1 or str(verdicts[0]) not in VERDICTS:
        shown = str(verdicts[0])[:20] if verdicts else ""
        raise BadParameter(f"verdict must be one of {', '.join(VERDICTS)}, not {shown!r}")
    query_ids = parse_ids(values("query_image_id"), "query_image_id")
    hashes = values("query_sha256")
    if len(query_ids) + len(hashes) != 1:
        raise BadParameter("give the query as exactly one of query_image_id (an indexed image) and query_sha256 "
                           "(an uploaded image's SHA-256)")
    results = parse_ids(values("image_id"), "image_id")
    if not results:
        raise BadParameter("no result was named: send the marked result as image_id")
    check_count(results)
    if query_ids:
        stored_vectors(version, query_ids, "query_image_id")
        if query_ids[0] in results:
            raise BadParameter(f"image {query_ids[0]} is the query itself: a result cannot be marked against itself")
        sha = ""
    else:
        sha = parse_sha256(hashes[0])
        upload_vector(version, sha)
    stored_vectors(version, results, "image_id", dataset=dataset)
    return Marks(query_image_id=query_ids[0] if query_ids else None, query_sha256=sha, result_ids=results,
                 verdict=str(verdicts[0]))


@transaction.atomic
def record_marks(version: ModelVersion, marks: Marks, *, user=None, session_key: str = "") -> list[Feedback]:
    """Store `marks` (from parse_marks) for `version`, by `user` (a signed-in user
    or an API token's owner) or else the anonymous `session_key`. A mark by
    the same person on the same query and result replaces the earlier one."""
    vector = upload_vector(version, marks.query_sha256) if marks.query_sha256 else None
    who: dict[str, object] = {"user": user} if user is not None else {"user": None, "session_key": session_key}
    query: dict[str, object] = ({"query_image_id": marks.query_image_id} if marks.query_image_id is not None
             else {"query_image": None, "query_sha256": marks.query_sha256})
    Feedback.objects.filter(model_version=version, result_id__in=marks.result_ids, **query, **who).delete()
    rows = [Feedback(model_version=version, result_id=result, verdict=marks.verdict,
                     query_vector=vector, user=user, session_key="" if user is not None else session_key,
                     query_image_id=marks.query_image_id, query_sha256=marks.query_sha256)
            for result in marks.result_ids]
    return Feedback.objects.bulk_create(rows)
