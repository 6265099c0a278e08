"""Measuring a model version on a labelled dataset, through the database.

Two measurements, both plain functions that the `evaluate` command, the
evaluation job and the tests call:

* `evaluate_version`: category retrieval. Every labelled test image is a query
  against the dataset's train + validation images (or the whole dataset), run
  through pgvector's HNSW index the same way search runs; a result is right
  when it has the query's label. Optionally the exact (sequential-scan) top k
  of each query too, to report how much the approximate index loses.
* `copy_detection`: identical-image retrieval. Modified copies of indexed
  images (crop, JPEG, rotation, ...) are embedded with the version's network
  and searched; the rank of the original is recorded per kind of change.

Results are plain JSON-able dicts, saved on `ModelVersion.metrics` under
"evaluation" and "copy_detection", keyed by dataset name. docs/evaluation.md
defines every field.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from django.conf import settings
from django.utils import timezone

from search import hnsw
from search.feedback import as_array
from search.models import Dataset, Embedding, Image, Split
from search.neighbours import Hit, ef_search_for, fetch, nearest, neighbours_queryset
from training.core.inference import embed_query
from training.core.mark_training import marks_precision_at_k
from training.evaluation.copies import KINDS, generate_queries
from training.evaluation.metrics import QueryResult, copy_detection_summary, precision_curve, summarize
from training.models import ModelVersion
from training.rows import marks_among

Progress = Callable[[int, int, str], None]

# What a test query is searched against.
AGAINST: dict[str, tuple[str, ...] | None] = {
    "trainval": (Split.TRAIN, Split.VAL),  # the images a trained model may have learnt from
    "all": None,  # the whole dataset, the query itself excluded
}
N_EXAMPLES = 5  # example queries kept for the page: the first test images by id
EXAMPLE_DEPTH = 10  # results shown per example query, as on the search page


class EvaluationError(Exception):
    """An evaluation that cannot run; the message says what to do about it."""


def _noop(done: int, total: int, message: str) -> None:
    pass


# --- Checks -------------------------------------------------------------------

def _build_index_hint(version: ModelVersion, dataset: Dataset) -> str:
    return f"python manage.py build_index --dataset {dataset.name} --model {version.name}"


def check_indexed(version: ModelVersion, dataset: Dataset) -> None:
    """Raise EvaluationError unless every image of `dataset` is embedded by
    `version` and the version's HNSW index exists."""
    total = Image.objects.filter(dataset=dataset).count()
    if total == 0:
        raise EvaluationError(f"dataset {dataset.name!r} has no images; import some first")
    embedded = Image.objects.filter(dataset=dataset, embeddings__model_version=version).count()
    if embedded < total:
        raise EvaluationError(
            f"{version.name} has embedded {embedded} of the {total} images of {dataset.name!r}; "
            f"index them first: {_build_index_hint(version, dataset)}")
    state = hnsw.index_state(version)
    if state != hnsw.VALID:
        raise EvaluationError(f"{version.name}'s HNSW index is {state}, not ready for search; "
                              f"build it: {_build_index_hint(version, dataset)}")


def check_evaluable(version: ModelVersion, dataset: Dataset, *, against: str = "trainval") -> None:
    """Raise EvaluationError unless `evaluate_version` can run (labels, test
    images, something to search, everything indexed)."""
    if against not in AGAINST:
        raise EvaluationError(f"against must be one of {', '.join(AGAINST)}, not {against!r}")
    images = Image.objects.filter(dataset=dataset)
    if not images.exclude(label=None).exclude(label="").exists():
        raise EvaluationError(
            f"dataset {dataset.name!r} has no labels, so there is no ground truth; import it with labels from "
            f"folders (import_images --labels-from-folders) or set labels in the admin")
    if not images.filter(split=Split.TEST).exclude(label=None).exclude(label="").exists():
        raise EvaluationError(
            f"dataset {dataset.name!r} has no labelled test images to use as queries; set the split of some "
            f"images to test in the admin")
    splits = AGAINST[against]
    if splits is None and images.count() < 2:
        raise EvaluationError(f"dataset {dataset.name!r} has a single image: nothing to search but the query")
    if splits is not None and not images.filter(split__in=splits).exists():
        raise EvaluationError(f"dataset {dataset.name!r} has no train or validation images to search; "
                              f"use against='all' (--against all) or set some images' split in the admin")
    check_indexed(version, dataset)


# --- Category retrieval -------------------------------------------------------

def evaluate_version(version: ModelVersion, dataset: Dataset, *, k: int = 10, against: str = "trainval",
                     exact: bool = True, curve_max_k: int = 50, progress: Progress | None = None,
                     exact_queries: int | None = None) -> dict[str, Any]:
    """Category retrieval of `version` on `dataset`'s labelled test images.

    Each query's results come from the version's HNSW index with the same
    search options as the site (search.neighbours); ground truth is "same label".
    `n_relevant_total` of a query is the number of searched images with its
    label. With exact=True queries are also answered by a sequential scan
    and `ann_recall_at_k` says how much of that exact top k the index found:
    at most `exact_queries` of them (None: CBIR_EVAL_EXACT_QUERIES, default
    500; 0: every query), spread evenly over the test split. An exact scan
    reads every searched row: Fashion-MNIST's evaluation (14,113 queries
    against 55,887 rows, docs/evaluation.md) took 311 s with 500 of them,
    about 0.3 s per exact scan, so all 14,113 would add over an hour.
    Fields: see summarize() and docs/evaluation.md.
    """
    if not isinstance(k, int) or k < 1 or not isinstance(curve_max_k, int) or curve_max_k < 1:
        raise EvaluationError(f"k and curve_max_k must be positive whole numbers, not {k!r} and {curve_max_k!r}")
    check_evaluable(version, dataset, against=against)
    progress = progress or _noop
    splits = AGAINST[against]
    rows = list(Image.objects.filter(dataset=dataset, embeddings__model_version=version)
                .order_by("pk").values_list("pk", "label", "split", "thumbnail"))
    labels = {pk: (label or None) for pk, label, _, _ in rows}
    searched = [pk for pk, _, split, _ in rows if splits is None or split in splits]
    per_label = Counter(labels[pk] for pk in searched if labels[pk] is not None)
    queries = [(pk, label) for pk, label, split, _ in rows if split == Split.TEST and label]
    thumbnails = {pk: thumb for pk, _, _, thumb in rows}
    depth = max(k, curve_max_k, EXAMPLE_DEPTH)
    if exact_queries is None:
        exact_queries = settings.CBIR_EVAL_EXACT_QUERIES
    exact_at = exact_sample(len(queries), exact_queries) if exact else set()

    results: list[QueryResult] = []
    latencies: list[float] = []
    examples: list[dict] = []
    for done, (query_id, label) in enumerate(queries, start=1):
        query: dict[str, Any] = {"image_id": query_id, "dataset": dataset, "splits": splits, "exclude_image_id": query_id}
        hits, seconds = fetch(neighbours_queryset(version, **query), depth, ef_search=ef_search_for(depth, version))
        latencies.append(seconds)
        exact_ids = None
        if done - 1 in exact_at:
            exact_ids = [hit.image_id for hit in fetch(neighbours_queryset(version, **query, exact=True), depth,
                                                       exact=True)[0]]
        # With against="all" the query is in the collection but never a result.
        n_relevant = per_label[label] - (1 if splits is None else 0)
        result_ids = [hit.image_id for hit in hits]
        relevant = [hit.label == label for hit in hits]
        results.append(QueryResult(query_id=query_id, query_label=label, result_ids=result_ids, relevant=relevant,
                                   n_relevant_total=n_relevant, exact_ids=exact_ids))
        if len(examples) < N_EXAMPLES:
            examples.append(_example(query_id, label, thumbnails[query_id], n_relevant, hits[:EXAMPLE_DEPTH]))
        progress(done, len(queries), f"query {done}/{len(queries)}")

    summary = summarize(results, k)
    return {
        **summary,
        # The best P@k any ranking could reach here: a label with 3 searched
        # images caps that query's P@10 at 0.3.
        "precision_at_k_ceiling": statistics.fmean(min(k, q.n_relevant_total) / k for q in results),
        "dataset": dataset.name,
        "model": version.name,
        "model_version_id": version.pk,
        "date": timezone.now().isoformat(timespec="seconds"),
        "against": against,
        "n_searched": len(searched),
        "n_labels": len({labels[pk] for pk, _ in queries}),
        "n_unlabelled_test_images": sum(1 for pk, label, split, _ in rows if split == Split.TEST and not label),
        "exact": exact,
        "curve_max_k": curve_max_k,
        "precision_curve": [round(p, 6) for p in precision_curve(results, range(1, curve_max_k + 1))],
        "median_latency_ms": round(statistics.median(latencies) * 1000, 3),
        "ef_search": ef_search_for(depth, version),
        "examples": examples,
        **held_out_marks(version, dataset, k),
    }


def held_out_marks(version: ModelVersion, dataset: Dataset, k: int = 10) -> dict[str, Any]:
    """P@k of `version` against held-out relevance marks: marks whose query is
    a test-split image of `dataset` (training on marks reads only train and
    val queries, training.rows.marks_among), measured on the condensed list
    (training.core.mark_training.marks_precision_at_k: each query's marked
    results ranked by the version's cosine similarity). Returns
    {"marks_precision_at_k": value or None, "marks_queries": queries counted,
    "marks_held_out": marks read, "marks_set": a digest of those marks, so the
    activation gate compares only values measured on the same marks}."""
    marks = marks_among(dataset, (Split.TEST,))
    digest = hashlib.sha256(repr(sorted(tuple(m) for m in marks)).encode()).hexdigest()[:16]
    ids = sorted({i for m in marks for i in m[:2]})
    vectors = dict(Embedding.objects.filter(model_version=version, image_id__in=ids).values_list("image_id", "vector"))
    usable = [m for m in marks if m[0] in vectors and m[1] in vectors]
    if not usable:
        return {"marks_precision_at_k": None, "marks_queries": 0, "marks_held_out": len(marks), "marks_set": digest}
    where = {pk: i for i, pk in enumerate(sorted(vectors))}
    matrix = torch.from_numpy(np.stack([as_array(vectors[pk]) for pk in sorted(vectors)]))
    value, counted = marks_precision_at_k(matrix, matrix, [(where[q], where[r], ok) for q, r, ok in usable], k=k)
    return {"marks_precision_at_k": round(value, 6) if counted else None, "marks_queries": counted,
            "marks_held_out": len(marks), "marks_set": digest}


def exact_sample(n: int, limit: int) -> set[int]:
    """Indices of the queries (of n) that also get an exact search: all of them
    when `limit` is 0 or at least n, else `limit` spread evenly (the first,
    then every n/limit-th), so the sample covers the whole test split.
    Raises EvaluationError for a negative limit."""
    if not isinstance(limit, int) or limit < 0:
        raise EvaluationError(f"exact_queries must be 0 (every query) or a positive whole number, not {limit!r}")
    if limit == 0 or limit >= n:
        return set(range(n))
    return {int(i * n / limit) for i in range(limit)}


def _example(query_id: int, label: str, thumbnail: str, n_relevant: int, hits: list[Hit]) -> dict:
    return {
        "image_id": query_id, "label": label, "thumbnail": thumbnail, "n_relevant_total": n_relevant,
        "results": [{"image_id": hit.image_id, "label": hit.label, "score": round(float(hit.score), 6),
                     "correct": hit.label == label, "thumbnail": hit.thumbnail}
                    for hit in hits],
    }


# --- Saving on the version ----------------------------------------------------

def _save(version: ModelVersion, section: str, dataset_name: str, result: dict) -> None:
    """metrics[section][dataset_name] = result, keeping every other key (ModelVersion.update_metrics)."""
    def change(metrics: dict) -> None:
        metrics[section] = {**(metrics.get(section) or {}), dataset_name: result}

    version.update_metrics(change)


def save_evaluation(version: ModelVersion, result: dict) -> None:
    """Store `result` (from evaluate_version) under metrics["evaluation"][dataset]."""
    result.setdefault("date", timezone.now().isoformat(timespec="seconds"))
    _save(version, "evaluation", result["dataset"], result)


def save_copy_detection(version: ModelVersion, result: dict) -> None:
    """Store `result` (from copy_detection) under metrics["copy_detection"][dataset]."""
    result.setdefault("date", timezone.now().isoformat(timespec="seconds"))
    _save(version, "copy_detection", result["dataset"], result)


# --- Copy detection -----------------------------------------------------------

def copy_detection(version: ModelVersion, dataset: Dataset, *, per_kind: int = 10, seed: int = 0,
                   kinds: Sequence[str] = KINDS, depth: int = 10, progress: Progress | None = None) -> dict[str, Any]:
    """Find originals from modified copies.

    `per_kind` indexed images of `dataset` are drawn with `seed` (fewer if the
    dataset is smaller); for each kind of change one copy of each is made
    (copies.generate_queries), embedded with the version's network and
    searched in the dataset, `depth` results deep, exactly as an upload is.
    The rank of the original (1-based, None if not in the results) goes into
    metrics.copy_detection_summary. The same seed gives the same copies.
    """
    if depth < 10:
        raise EvaluationError(f"depth must be at least 10 (recall@10 is reported), not {depth}")
    check_indexed(version, dataset)
    progress = progress or _noop
    media = Path(settings.MEDIA_ROOT)
    items = [(pk, media / name) for pk, name in Image.objects.filter(
        dataset=dataset, embeddings__model_version=version).order_by("pk").values_list("pk", "file")]
    per_kind = min(per_kind, len(items))
    kinds = tuple(kinds)
    try:
        queries = generate_queries(items, kinds=kinds, per_kind=per_kind, seed=seed)
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    total = per_kind * len(kinds)
    ranks: dict[str, list[int | None]] = {kind: [] for kind in kinds}
    records: list[dict] = []
    forward: list[float] = []
    sql: list[float] = []
    for done, query in enumerate(queries, start=1):
        start = time.perf_counter()
        vector = embed_query(version, query.image)
        forward.append(time.perf_counter() - start)
        start = time.perf_counter()
        hits = nearest(version, vector=vector, k=depth, dataset=dataset)
        sql.append(time.perf_counter() - start)
        ids: list = [hit.image_id for hit in hits]
        rank = ids.index(query.original_id) + 1 if query.original_id in ids else None
        ranks[query.kind].append(rank)
        records.append({"original_id": query.original_id, "kind": query.kind, "rank": rank,
                        "top_id": ids[0] if ids else None})
        progress(done, total, f"copy {done}/{total} ({query.kind})")
    return {
        "dataset": dataset.name,
        "model": version.name,
        "model_version_id": version.pk,
        "date": timezone.now().isoformat(timespec="seconds"),
        "seed": seed,
        "per_kind": per_kind,
        "depth": depth,
        "kinds": list(kinds),
        "summary": copy_detection_summary(ranks),
        "median_forward_ms": round(statistics.median(forward) * 1000, 3) if forward else None,
        "median_latency_ms": round(statistics.median(sql) * 1000, 3) if sql else None,
        "queries": records,
    }
