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
  model version, SHA-256 and searcher (user or session; search.models.QueryEmbedding)
  when it is searched, so that searcher's marks and refined searches can name the
  upload afterwards; nobody else can. `delete_expired_uploads` removes old ones
  in bounded batches.
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
from django.db import IntegrityError, transaction
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


def searcher(request) -> dict:
    """Who is asking, as QueryEmbedding and Feedback record it: {"user": the
    API token's owner or the signed-in user} or else {"user": None,
    "session_key": the session's key}, a session being started (and its cookie
    sent) when there is none yet."""
    token = getattr(request, "api_token", None)
    user = token.user if token is not None else (request.user if request.user.is_authenticated else None)
    if user is not None:
        return {"user": user, "session_key": ""}
    if request.session.session_key is None:
        request.session.save()
    return {"user": None, "session_key": request.session.session_key or ""}


def _owner(user, session_key: str) -> dict | None:
    """The filter naming one searcher's rows; None for nobody (no user, no session)."""
    if user is not None:
        return {"user": user}
    return {"user": None, "session_key": session_key} if session_key else None


def remember_upload(version: ModelVersion, sha256: str, vector: np.ndarray, *, user=None,
                    session_key: str = "") -> None:
    """Keep an upload's embedding (shape (D,)) under (version, sha256, who
    searched: `user` or else `session_key`), or refresh its last_seen; now and
    then delete a few batches of those unseen for CBIR_QUERY_EMBEDDING_DAYS
    (delete_expired_uploads). Nobody (no user, no session): nothing is kept."""
    owner = _owner(user, session_key)
    if owner is None:
        return
    now = timezone.now()
    defaults = {"vector": np.asarray(vector, dtype=np.float32), "last_seen": now}
    try:
        with transaction.atomic():
            QueryEmbedding.objects.update_or_create(model_version=version, sha256=sha256, **owner, defaults=defaults)
    except IntegrityError:  # the same search twice at once: the other inserted it; refresh that row
        QueryEmbedding.objects.filter(model_version=version, sha256=sha256, **owner).update(**defaults)
    if random.randrange(CLEANUP_ONE_IN) == 0:
        delete_expired_uploads()


CLEANUP_BATCH = 1000  # rows one DELETE removes
CLEANUP_BATCHES = 3  # DELETEs one call of delete_expired_uploads makes, unless told otherwise


def delete_expired_uploads(*, batch: int = CLEANUP_BATCH, batches: int | None = CLEANUP_BATCHES) -> int:
    """Delete remembered uploads unseen for CBIR_QUERY_EMBEDDING_DAYS, `batch`
    rows (by primary key) per DELETE and at most `batches` DELETEs (None: until
    none is left), so that a search request never waits on an unbounded delete.
    Returns how many were deleted. Also run by the worker's recovery loop and by
    `manage.py forget_uploads`."""
    cutoff = timezone.now() - timedelta(days=settings.CBIR_QUERY_EMBEDDING_DAYS)
    deleted, done = 0, 0
    while batches is None or done < batches:
        pks = list(QueryEmbedding.objects.filter(last_seen__lt=cutoff).order_by("pk")
                   .values_list("pk", flat=True)[:batch])
        if not pks:
            break
        deleted += QueryEmbedding.objects.filter(pk__in=pks).delete()[0]
        done += 1
    return deleted


def parse_sha256(raw: object) -> str:
    text = str(raw).strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise BadParameter(f"query_sha256 must be 64 hexadecimal digits, not {str(raw)[:70]!r}")
    return text


def upload_vector(version: ModelVersion, sha256: str, *, user=None, session_key: str = "") -> np.ndarray:
    """The remembered embedding (D,) of an upload searched with `version` in the
    last CBIR_QUERY_EMBEDDING_DAYS by the same searcher (`user`, or else the
    anonymous `session_key`); BadParameter when there is none. An upload searched
    by someone else gets the same answer as one never searched."""
    cutoff = timezone.now() - timedelta(days=settings.CBIR_QUERY_EMBEDDING_DAYS)
    owner = _owner(user, session_key)
    row = (None if owner is None else
           QueryEmbedding.objects.filter(model_version=version, sha256=sha256, last_seen__gte=cutoff, **owner).first())
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
    query_vector: np.ndarray | None = None  # the upload's embedding, read once by parse_marks


def parse_marks(data, version: ModelVersion, dataset: Dataset | None = None, *, user=None,
                session_key: str = "") -> Marks:
    """Read and check a mark request's fields (a QueryDict or a dict of lists):
    exactly one of query_image_id (an image indexed by `version`) and
    query_sha256 (an upload searched with `version` recently); image_id, one or
    more results indexed by `version`, none the query itself; verdict right or
    wrong; optional model (the version the results came from: must be the
    active one). `dataset`: the search's dataset (the request's `dataset`,
    parsed by the caller): the results must be in it. `user` / `session_key`:
    who is marking; an upload must be one they searched with."""
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
    vector = None
    if query_ids:
        stored_vectors(version, query_ids, "query_image_id")
        if query_ids[0] in results:
            raise BadParameter(f"image {query_ids[0]} is the query itself: a result cannot be marked against itself")
        sha = ""
    else:
        sha = parse_sha256(hashes[0])
        vector = upload_vector(version, sha, user=user, session_key=session_key)
    stored_vectors(version, results, "image_id", dataset=dataset)
    return Marks(query_image_id=query_ids[0] if query_ids else None, query_sha256=sha, result_ids=results,
                 verdict=str(verdicts[0]), query_vector=vector)


@transaction.atomic
def record_marks(version: ModelVersion, marks: Marks, *, user=None, session_key: str = "") -> list[Feedback]:
    """Store `marks` (from parse_marks, which read the upload's embedding) for
    `version`, by `user` (a signed-in user or an API token's owner) or else the
    anonymous `session_key`. A mark by the same person on the same query and
    result replaces the earlier one: one row each, by the unique constraints,
    even for two requests at once (a double click). BadParameter, nothing
    stored, when an image was deleted since parse_marks: the images are locked
    here (FOR NO KEY UPDATE, which a DELETE waits for), so none can go before
    the marks are committed."""
    named = {*marks.result_ids, *([marks.query_image_id] if marks.query_image_id is not None else [])}
    present = set(Image.objects.select_for_update(no_key=True).filter(pk__in=named).values_list("pk", flat=True))
    gone = sorted(named - present)
    if gone:
        raise BadParameter(f"image {', '.join(map(str, gone[:10]))} no longer exists: search again")
    who: dict[str, object] = {"user": user} if user is not None else {"user": None, "session_key": session_key}
    query: dict[str, object] = ({"query_image_id": marks.query_image_id} if marks.query_image_id is not None
             else {"query_image": None, "query_sha256": marks.query_sha256})
    vector = marks.query_vector if marks.query_image_id is None else None
    rows = [Feedback(model_version=version, result_id=result, verdict=marks.verdict,
                     query_vector=vector, user=user, session_key="" if user is not None else session_key,
                     query_image_id=marks.query_image_id, query_sha256=marks.query_sha256)
            for result in marks.result_ids]
    # Insert what is new; a row another request (or an earlier mark) holds is
    # then brought up to date, so the last mark wins.
    Feedback.objects.bulk_create(rows, ignore_conflicts=True)
    mine = Feedback.objects.filter(model_version=version, result_id__in=marks.result_ids, **query, **who)
    mine.update(verdict=marks.verdict, query_vector=vector, created=timezone.now())
    order = {pk: i for i, pk in enumerate(marks.result_ids)}
    return sorted(mine, key=lambda m: order[m.result_id])
