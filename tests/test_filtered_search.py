"""A filtered search is exact at any selectivity (search/neighbours.py): a small
dataset inside a larger index gives exactly numpy's brute-force top k, never
fewer than min(k, its size) rows, even when the HNSW walk is starved by a low
hnsw.max_scan_tuples and ef_search (the bad condition, provoked at test size)."""

from __future__ import annotations

import numpy as np
import pytest

from search import hnsw, neighbours
from search.models import Dataset, Embedding, Image
from search.neighbours import explain, fetch, nearest, neighbours_queryset, plan_for
from tests.helpers import store_embeddings

K = 10
BIG, SMALL = 3000, 7


@pytest.fixture
def two_datasets(dataset, tiny_version):
    """3,000 random 32-d rows in `dataset` and 7 in "small", one HNSW index over all."""
    rng = np.random.default_rng(7)
    store_embeddings(dataset, tiny_version, rng.normal(size=(BIG, 32)))
    small = Dataset.objects.create(name="small")
    splits = ["train", "val", "test", "train", "val", "train", "test"]
    store_embeddings(small, tiny_version, rng.normal(size=(SMALL, 32)), splits=splits)
    tiny_version.activate()
    return dataset, small


@pytest.fixture
def starved(settings):
    """The HNSW walk may visit 20 tuples with a breadth of 2k: a filter on 7 of
    3,007 rows cannot be satisfied by it."""
    settings.CBIR_HNSW_MAX_SCAN_TUPLES = 20
    settings.CBIR_HNSW_EF_SEARCH = 1
    return settings


def brute_force(version, query, k, *, dataset=None, splits=None, exclude=None):
    """Ids of the exact top k by cosine similarity over the stored (halfvec) vectors, numpy."""
    rows = Embedding.objects.filter(model_version=version)
    if dataset is not None:
        rows = rows.filter(image__dataset=dataset)
    if splits is not None:
        rows = rows.filter(image__split__in=splits)
    if exclude is not None:
        rows = rows.exclude(image_id=exclude)
    pairs = list(rows.values_list("image_id", "vector"))
    ids = np.array([p[0] for p in pairs])
    vectors = np.array([np.asarray(p[1], dtype=np.float32) for p in pairs])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    q = np.asarray(query, dtype=np.float16).astype(np.float32)
    scores = vectors @ (q / np.linalg.norm(q))
    return [int(ids[i]) for i in np.argsort(-scores, kind="stable")[:k]]


def test_the_starved_index_walk_alone_returns_too_few_rows(two_datasets, tiny_version, starved):
    """The condition the plan choice and the fallback exist for, reproduced:
    without them the walk finds fewer than min(k, subset) rows."""
    _, small = two_datasets
    query = np.random.default_rng(1).normal(size=32)
    queryset = neighbours_queryset(tiny_version, vector=query, dataset=small, plan="hnsw")
    sql, params = neighbours.compiled(queryset, K)
    rows, _ = neighbours._run(queryset, sql, params, K, exact=False)
    assert len(rows) < SMALL


@pytest.mark.parametrize("k", [1, 3, K])
def test_a_small_dataset_gets_exactly_the_brute_force_top_k(two_datasets, tiny_version, starved, k):
    _, small = two_datasets
    assert plan_for(tiny_version, small) == "exact"
    for seed in range(5):
        query = np.random.default_rng(100 + seed).normal(size=32)
        hits = nearest(tiny_version, vector=query, k=k, dataset=small)
        assert [h.image_id for h in hits] == brute_force(tiny_version, query, k, dataset=small)
        assert len(hits) == min(k, SMALL)


def test_a_forced_index_walk_that_finds_too_few_rows_falls_back_to_exact(two_datasets, tiny_version, starved):
    _, small = two_datasets
    starved.CBIR_EXACT_SEARCH_MAX_ROWS = 0  # always the index
    assert plan_for(tiny_version, small) == "hnsw"
    for seed in range(5):
        query = np.random.default_rng(200 + seed).normal(size=32)
        hits, _ = fetch(neighbours_queryset(tiny_version, vector=query, dataset=small), K)
        assert [h.image_id for h in hits] == brute_force(tiny_version, query, K, dataset=small)


def test_splits_and_more_like_this_in_a_small_dataset_are_exact(two_datasets, tiny_version, starved):
    """Evaluation's split filter and "more like this" (image query, itself left out)."""
    _, small = two_datasets
    image_ids = list(Image.objects.filter(dataset=small).values_list("pk", flat=True))
    for image_id in image_ids[:3]:
        vector = np.asarray(Embedding.objects.get(image_id=image_id, model_version=tiny_version).vector, dtype=np.float32)
        hits = nearest(tiny_version, image_id=image_id, k=K, dataset=small, splits=["train", "val"],
                       exclude_image_id=image_id)
        expected = brute_force(tiny_version, vector, K, dataset=small, splits=["train", "val"], exclude=image_id)
        assert [h.image_id for h in hits] == expected
        assert image_id not in [h.image_id for h in hits]


def test_a_large_dataset_stays_on_the_index_and_gets_k_rows(two_datasets, tiny_version, starved):
    big, _ = two_datasets
    starved.CBIR_EXACT_SEARCH_MAX_ROWS = 100
    assert plan_for(tiny_version, big) == "hnsw" and plan_for(tiny_version, None) == "hnsw"
    query = np.random.default_rng(3).normal(size=32)
    queryset = neighbours_queryset(tiny_version, vector=query, dataset=big)
    assert f"Index Scan using {hnsw.index_name(tiny_version)}" in explain(queryset, K)
    hits, _ = fetch(queryset, K)
    assert len(hits) == K and {h.dataset for h in hits} == {big.name}


def test_the_exact_plan_never_walks_the_index_even_with_the_search_settings(two_datasets, tiny_version):
    _, small = two_datasets
    queryset = neighbours_queryset(tiny_version, vector=np.ones(32), dataset=small)
    plan = explain(queryset, K)  # run with search_options: sorting discouraged, index scans allowed
    assert hnsw.index_name(tiny_version) not in plan and "Sort" in plan


def test_the_threshold_decides_the_plan(two_datasets, tiny_version, settings):
    big, small = two_datasets
    settings.CBIR_EXACT_SEARCH_MAX_ROWS = SMALL
    assert plan_for(tiny_version, small) == "exact" and plan_for(tiny_version, big) == "hnsw"
    settings.CBIR_EXACT_SEARCH_MAX_ROWS = SMALL - 1
    assert plan_for(tiny_version, small) == "hnsw"
    settings.CBIR_EXACT_SEARCH_MAX_ROWS = BIG
    assert plan_for(tiny_version, big) == "exact"


def test_a_bad_plan_name_is_refused(tiny_version):
    with pytest.raises(ValueError, match="plan must be one of"):
        neighbours_queryset(tiny_version, vector=np.ones(32), plan="fastest")
