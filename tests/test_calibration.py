"""search/calibration.py: each model version's ef_search, chosen after its index
is built from recall@k measured on its own rows, and used by its searches."""

from __future__ import annotations

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from search import calibration, hnsw
from search.calibration import choose_ef_search, lower_bound, recall_with_ties
from search.indexing import build_hnsw_indexes
from search.models import Dataset, Embedding
from search.neighbours import CALIBRATION, DEFAULT_EF_SEARCH, ef_search_for, fetch, nearest, neighbours_queryset
from tests.helpers import store_embeddings

K = 10


def test_recall_counts_rows_tied_with_the_kth_and_misses():
    exact = [0.1, 0.2, 0.3]
    assert recall_with_ties([0.1, 0.2, 0.3], exact, 3) == 1.0
    assert recall_with_ties([0.1, 0.3, 0.3], exact, 3) == 1.0  # another row at the k-th distance
    assert recall_with_ties([0.1, 0.2, 0.35], exact, 3) == pytest.approx(2 / 3)
    assert recall_with_ties([0.25, 0.4], [0.1, 0.2], 2) == 0.0
    assert recall_with_ties([0.1], [0.1], K) == 1.0  # fewer rows than k: all of them found
    assert recall_with_ties([], [], K) == 1.0


def test_the_smallest_breadth_whose_lower_bound_reaches_the_target():
    assert lower_bound([1.0] * 50) == 1.0
    mixed = [1.0] * 45 + [0.8] * 5
    assert np.mean(mixed) == pytest.approx(0.98) and lower_bound(mixed) < 0.98
    assert choose_ef_search({20: 0.9, 40: 0.985, 60: 0.99}, 0.98) == (40, True)
    assert choose_ef_search({60: 0.99, 20: 0.9, 40: 0.985}, 0.98) == (40, True)  # order of the mapping
    assert choose_ef_search({20: 0.9, 40: 0.95, 60: 0.95}, 0.98) == (40, False)  # best, the smaller on a tie
    with pytest.raises(ValueError, match="no ef_search"):
        choose_ef_search({}, 0.9)


@pytest.fixture
def starved_graph(dataset, tiny_version, settings):
    """3,000 random 32-d rows (a high intrinsic dimension) under an index
    with m = 4, ef_construction = 8: a graph whose walk misses true
    neighbours at small breadths, so the measurement has something to find."""
    settings.CBIR_HNSW_M, settings.CBIR_HNSW_EF_CONSTRUCTION = 4, 8
    store_embeddings(dataset, tiny_version, np.random.default_rng(5).normal(size=(3000, 32)))
    return tiny_version


def _stored(version):
    pairs = list(Embedding.objects.filter(model_version=version).values_list("image_id", "vector"))
    ids = np.array([p[0] for p in pairs])
    vectors = np.array([np.asarray(p[1], dtype=np.float32) for p in pairs])
    return ids, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _brute_force_recall(version, query_ids, ef) -> float:
    """The same measurement done in numpy: each query the row reflected through
    its nearest other row, its exact top k over the stored halfvec values, the
    walk's top k at breadth `ef`."""
    ids, vectors = _stored(version)
    row = {int(i): n for n, i in enumerate(ids)}
    recalls = []
    for image_id in query_ids:
        x = vectors[row[image_id]]
        similarity = vectors @ x
        similarity[row[image_id]] = -np.inf
        q = 2 * vectors[np.argmax(similarity)] - x
        q = (q / np.linalg.norm(q)).astype(np.float16).astype(np.float32)  # sent as a halfvec
        exact = np.sort(1.0 - vectors @ (q / np.linalg.norm(q)))[:K]
        hits, _ = fetch(neighbours_queryset(version, vector=q, plan="hnsw"), K, ef_search=ef)
        recalls.append(sum(1 for h in hits if 1.0 - h.score <= exact[-1] + 1e-3) / K)
    return float(np.mean(recalls))


def test_a_held_out_query_is_a_unit_vector_on_no_node(starved_graph):
    ids, vectors = _stored(starved_graph)
    for n in (0, 1, 2):
        q = calibration.held_out_query(starved_graph, int(ids[n]))
        assert q.dtype == np.float32 and q.shape == (32,) and np.linalg.norm(q) == pytest.approx(1.0, abs=1e-5)
        assert (vectors @ q).max() < 0.999  # no stored row is the query


def test_calibration_measures_the_walk_against_an_exact_scan(starved_graph):
    result = calibration.calibrate(starved_graph, queries=30, target=0.995)
    assert result is not None and result.queries == 30 and result.rows == 3000 and result.k == K
    breadths = list(result.recall)
    assert breadths == sorted(breadths) and breadths[0] == 2 * K
    assert result.recall[breadths[0]] < 0.95  # the starved graph misses neighbours at breadth 20 ...
    assert result.recall[breadths[-1]] > result.recall[breadths[0]]  # ... and finds more with a wider walk
    for ef in (breadths[0], breadths[-1]):
        assert result.recall[ef] == pytest.approx(_brute_force_recall(starved_graph, result.query_ids, ef), abs=0.02)
    assert all(result.lower_bound[ef] <= result.recall[ef] for ef in breadths)
    assert (result.ef_search, result.met) == choose_ef_search(result.lower_bound, 0.995)
    if result.met:  # the walk stopped at the first breadth that reached the target
        assert breadths[-1] == result.ef_search
        assert all(result.lower_bound[ef] < 0.995 for ef in breadths[:-1])


def test_searches_use_the_stored_breadth_unless_the_setting_fixes_one(dataset, tiny_version, settings):
    version = tiny_version
    store_embeddings(dataset, version, np.random.default_rng(4).normal(size=(500, 32)))
    assert ef_search_for(K, version) == DEFAULT_EF_SEARCH  # not calibrated yet
    result = calibration.calibrate(version, queries=10, target=0.5)
    assert result is not None and result.ef_search == 2 * K  # reached at the first breadth
    calibration.save(version, result)
    version.refresh_from_db()
    stored = version.metrics[CALIBRATION]
    assert stored["ef_search"] == 2 * K and stored["rows"] == 500 and stored["queries"] == 10
    assert ef_search_for(K, version) == 2 * K
    assert ef_search_for(50, version) == 100  # never under 2k
    nearest(version, vector=np.ones(32), k=K)
    with connection.cursor() as cursor:  # SET LOCAL lasts to the end of the test's transaction
        cursor.execute("SHOW hnsw.ef_search")
        assert cursor.fetchone()[0] == str(2 * K)
    settings.CBIR_HNSW_EF_SEARCH = 77
    assert ef_search_for(K, version) == 77
    nearest(version, vector=np.ones(32), k=K)
    with connection.cursor() as cursor:
        cursor.execute("SHOW hnsw.ef_search")
        assert cursor.fetchone()[0] == "77"


def test_a_build_calibrates_a_new_index_and_again_only_when_the_rows_doubled(dataset, tiny_version, settings):
    settings.CBIR_HNSW_CALIBRATION_QUERIES = 5
    logged: list[str] = []
    store_embeddings(dataset, tiny_version, np.random.default_rng(6).normal(size=(200, 32)))  # builds the index
    tiny_version.refresh_from_db()
    first = tiny_version.metrics[CALIBRATION]
    assert first["rows"] == 200 and first["queries"] == 5
    build_hnsw_indexes(tiny_version, log=logged.append)  # nothing new: no index built, no measurement
    assert logged == []
    assert not calibration.is_stale(tiny_version, 399) and calibration.is_stale(tiny_version, 400)
    assert calibration.is_stale(tiny_version, 100) and not calibration.is_stale(tiny_version, 101)
    more = Dataset.objects.create(name="more")
    store_embeddings(more, tiny_version, np.random.default_rng(7).normal(size=(200, 32)))  # index kept, rows x2
    tiny_version.refresh_from_db()
    assert tiny_version.metrics[CALIBRATION]["rows"] == 400
    tiny_version.metrics.pop(CALIBRATION)  # a version indexed before calibration existed
    tiny_version.save(update_fields=["metrics"])
    build_hnsw_indexes(tiny_version, log=logged.append)
    assert len(logged) == 1 and logged[0].startswith("search calibrated: ef_search ")
    assert "on 5 of the version's 400 rows" in logged[0]
    settings.CBIR_HNSW_CALIBRATION_QUERIES = 0  # never
    assert calibration.is_stale(tiny_version, 10_000)
    build_hnsw_indexes(tiny_version, log=logged.append)
    assert len(logged) == 1


def test_too_few_rows_or_a_bad_target(dataset, tiny_version):
    store_embeddings(dataset, tiny_version, np.random.default_rng(8).normal(size=(K, 32)))
    assert calibration.calibrate(tiny_version, queries=5) is None  # every search returns all rows
    with pytest.raises(ValueError, match="target recall"):
        calibration.calibrate(tiny_version, target=1.5)


def test_the_command_prints_the_curve_and_stores_it(dataset, tiny_version, capsys):
    version = tiny_version
    store_embeddings(dataset, version, np.random.default_rng(9).normal(size=(300, 32)))
    call_command("calibrate_search", version.name, "--queries", "8", "--target", "0.5", "--dry-run",
                 "--no-progress")
    out = capsys.readouterr().out
    assert "recall@10 by ef_search" in out and "not stored (dry run)" in out
    version.refresh_from_db()
    assert CALIBRATION not in version.metrics
    call_command("calibrate_search", version.name, "--queries", "8", "--target", "0.5", "--no-progress")
    version.refresh_from_db()
    assert version.metrics[CALIBRATION]["ef_search"] == 2 * K
    with pytest.raises(CommandError, match="unknown model version"):
        call_command("calibrate_search", "no-such-version", "--no-progress")
    with pytest.raises(CommandError, match="at least 1"):
        call_command("calibrate_search", version.name, "--queries", "0", "--no-progress")


def test_the_models_page_shows_each_versions_breadth_and_measured_recall(client, dataset, tiny_version, settings):
    from django.urls import reverse

    store_embeddings(dataset, tiny_version, np.random.default_rng(10).normal(size=(300, 32)))
    html = client.get(reverse("models")).content.decode()
    assert "search: ef_search" not in html  # not measured yet: nothing claimed
    result = calibration.calibrate(tiny_version, queries=12, target=0.5)
    calibration.save(tiny_version, result)
    html = client.get(reverse("models")).content.decode()
    assert (f"search: ef_search {result.ef_search}, recall@10 {result.recall[result.ef_search]:.3f} on 12 queries"
            "</div>" in html)
    settings.CBIR_HNSW_EF_SEARCH = 77
    html = client.get(reverse("models")).content.decode()
    assert "on 12 queries; searches use 77 (CBIR_HNSW_EF_SEARCH)" in html


def test_a_row_with_duplicates_is_reflected_through_its_nearest_distinct_row(dataset, tiny_version):
    rng = np.random.default_rng(12)
    rows = rng.normal(size=(200, 32))
    rows[1] = rows[0]  # an exact duplicate of row 0
    rows[3:6] = rows[2]  # rows 2-5: four copies of one vector ...
    store_embeddings(dataset, tiny_version, rows)
    ids, vectors = _stored(tiny_version)
    q = calibration.held_out_query(tiny_version, int(ids[0]))
    assert q is not None and (vectors @ q).max() < 0.999  # through a distinct row, not the duplicate
    q = calibration.held_out_query(tiny_version, int(ids[2]))
    assert q is not None and (vectors @ q).max() < 0.999  # ... past all three copies
    assert calibration.held_out_query(tiny_version, 999_999_999) is None  # a row that is gone
    queries = calibration.calibrate(tiny_version, query_ids=[int(i) for i in ids[:6]] + [999_999_999], target=0.5)
    assert queries is not None and queries.queries == 6  # the missing row skipped


def test_a_failing_measurement_never_fails_the_build(dataset, tiny_version, settings, monkeypatch):
    settings.CBIR_HNSW_CALIBRATION_QUERIES = 5
    store_embeddings(dataset, tiny_version, np.random.default_rng(13).normal(size=(100, 32)))
    tiny_version.metrics.pop(CALIBRATION)
    tiny_version.save(update_fields=["metrics"])

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(calibration, "calibrate", broken)
    logged: list[str] = []
    reports = build_hnsw_indexes(tiny_version, log=logged.append)
    assert reports[0].name == hnsw.index_name(tiny_version)
    assert logged == ["search breadth not calibrated (RuntimeError('injected')); searches keep ef_search 200"]
    monkeypatch.undo()
    settings.CBIR_HNSW_EF_SEARCH = 60  # a fixed breadth: nothing to measure
    build_hnsw_indexes(tiny_version, log=logged.append)
    assert len(logged) == 1 and CALIBRATION not in tiny_version.metrics
