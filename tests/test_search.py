"""Search returns exactly the brute-force top k, through the HNSW index."""

import numpy as np
import pytest

from search import hnsw, services
from search.models import Dataset, Embedding, Image
from search.neighbours import explain, nearest, neighbours_queryset
from tests.helpers import store_embeddings
from training.core.inference import embed_query


def _stored_vectors(version):
    rows = list(Embedding.objects.filter(model_version=version).values_list("image_id", "vector"))
    ids = np.array([r[0] for r in rows])
    vectors = np.array([np.asarray(r[1], dtype=np.float32) for r in rows])
    return ids, vectors


def _brute_force(ids, vectors, query, k, exclude=None):
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = vectors @ (query / np.linalg.norm(query))
    order = [i for i in np.argsort(-scores, kind="stable") if ids[i] != exclude]
    return [int(ids[i]) for i in order[:k]], scores


def test_upload_search_returns_exactly_the_brute_force_top_k(indexed, tiny_version, make_image_bytes):
    data = make_image_bytes((240, 30, 30), pattern=4242)
    result = services.search_by_upload(data, k=10)
    decoded_vector = embed_query(tiny_version, services.decode_image(data).rgb)
    ids, vectors = _stored_vectors(tiny_version)
    expected, scores = _brute_force(ids, vectors, decoded_vector, 10)
    assert [h.image_id for h in result.hits] == expected
    by_id = dict(zip(ids.tolist(), scores))
    for hit in result.hits:
        assert hit.score == pytest.approx(by_id[hit.image_id], abs=2e-3)
    assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)


@pytest.mark.parametrize("k", [1, 5, 12])
def test_more_like_this_excludes_the_image_and_matches_brute_force(indexed, tiny_version, k):
    ids, vectors = _stored_vectors(tiny_version)
    query_id = int(ids[3])
    result = services.search_by_image(query_id, k=k)
    expected, _ = _brute_force(ids, vectors, vectors[3], k, exclude=query_id)
    assert [h.image_id for h in result.hits] == expected
    assert query_id not in [h.image_id for h in result.hits]


def test_dataset_filter_keeps_only_that_dataset(indexed, tiny_version, image_folder):
    from search.indexing import build_index
    from search.ingest import import_folder

    other = Dataset.objects.create(name="other")
    import_folder(image_folder, other)
    build_index(other, tiny_version)
    result = services.search_by_image(Image.objects.filter(dataset=other).first().pk, k=11, dataset="other")
    assert len(result.hits) == 11 and {h.dataset for h in result.hits} == {"other"}
    everywhere = services.search_by_image(Image.objects.filter(dataset=other).first().pk, k=20)
    assert {h.dataset for h in everywhere.hits} == {"other", indexed.name}


def test_search_without_an_index_says_so(db):
    with pytest.raises(services.IndexNotReady, match="no search index is ready"):
        services.search_by_upload(b"whatever")


@pytest.fixture
def large_index(dataset, tiny_version):
    """3,000 random 32-d embeddings: enough rows for the planner to prefer the index."""
    vectors = store_embeddings(dataset, tiny_version, np.random.default_rng(0).normal(size=(3000, 32)))
    tiny_version.activate()
    return vectors


@pytest.mark.parametrize("with_dataset", [False, True])
def test_explain_shows_the_search_uses_the_versions_hnsw_index(large_index, tiny_version, dataset, with_dataset):
    queryset = neighbours_queryset(tiny_version, vector=large_index[0], dataset=dataset if with_dataset else None)
    plan = explain(queryset, 10)
    assert f"Index Scan using {hnsw.index_name(tiny_version)}" in plan, plan


def test_explain_more_like_this_uses_the_index(large_index, tiny_version):
    image_id = Embedding.objects.filter(model_version=tiny_version).first().image_id
    queryset = neighbours_queryset(tiny_version, image_id=image_id, exclude_image_id=image_id)
    assert f"Index Scan using {hnsw.index_name(tiny_version)}" in explain(queryset, 10)


def test_hnsw_results_on_many_vectors_agree_with_brute_force(large_index, tiny_version):
    ids, vectors = _stored_vectors(tiny_version)
    overlaps = []
    for q in range(20):
        hits = nearest(tiny_version, vector=vectors[q], k=10)
        expected, _ = _brute_force(ids, vectors, vectors[q], 10)
        overlaps.append(len(set(expected) & {h.image_id for h in hits}) / 10)
    assert np.mean(overlaps) >= 0.9
