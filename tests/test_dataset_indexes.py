"""Per-dataset HNSW indexes (search/indexing.py, search/hnsw.py): a dataset too
large for the exact scan and not most of the version gets a partial index of
its own rows, the planner walks it, and a search of that dataset no longer
depends on the version's walk finding its rows. Also: every writer copies the
image's dataset onto the embedding, the migration backfills it, and deleting
a dataset or a version drops its indexes."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
from django.db import connection

from search import hnsw, neighbours
from search.indexing import build_hnsw_indexes, copy_embeddings, datasets_to_index, write_embeddings
from search.models import Dataset, Embedding, Image
from search.neighbours import explain, fetch, neighbours_queryset, plan_for
from tests.helpers import store_embeddings
from tests.test_filtered_search import brute_force

K = 10
BIG, MID, SMALL = 2400, 600, 7


@pytest.fixture
def three_datasets(dataset, tiny_version, settings):
    """2,400 random 32-d rows in `dataset`, 600 in "mid", 7 in "small", and the
    version's indexes built (by store_embeddings, as after each import) with an
    exact-scan limit of 100 rows."""
    settings.CBIR_EXACT_SEARCH_MAX_ROWS = 100
    rng = np.random.default_rng(11)
    mid, small = Dataset.objects.create(name="mid"), Dataset.objects.create(name="small")
    store_embeddings(dataset, tiny_version, rng.normal(size=(BIG, 32)))
    store_embeddings(mid, tiny_version, rng.normal(size=(MID, 32)), splits=["train", "val", "test"] * (MID // 3))
    store_embeddings(small, tiny_version, rng.normal(size=(SMALL, 32)))
    tiny_version.activate()
    return dataset, mid, small


def _name(version, dataset) -> str:
    return hnsw.index_name(version, dataset)


def test_only_a_dataset_between_the_exact_limit_and_half_the_version_gets_an_index(three_datasets, tiny_version,
                                                                                  settings):
    big, mid, small = three_datasets
    assert datasets_to_index(tiny_version) == [(mid, MID)]  # big is 80 % of the rows, small is scanned
    assert hnsw.index_state(tiny_version, mid) == hnsw.VALID
    assert hnsw.index_state(tiny_version, big) == hnsw.MISSING == hnsw.index_state(tiny_version, small)
    assert hnsw.dataset_indexes(version=tiny_version) == [_name(tiny_version, mid)]
    hnsw.drop_dataset_indexes(mid)
    reports = build_hnsw_indexes(tiny_version)
    assert [(r.name, r.created) for r in reports] == [(hnsw.index_name(tiny_version), False), (_name(tiny_version, mid), True)]
    assert reports[1].rows == MID and "search_embedding_hnsw" in reports[1].describe()
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", [_name(tiny_version, mid)])
        definition = cursor.fetchone()[0]
    assert f"model_version_id = {tiny_version.pk}" in definition and f"dataset_id = {mid.pk}" in definition
    settings.CBIR_DATASET_INDEX_MAX_SHARE = 0.9
    assert [d for d, _ in datasets_to_index(tiny_version)] == [big, mid]  # largest first
    again = build_hnsw_indexes(tiny_version)
    assert [r.created for r in again] == [False, True, False]  # only the missing one is built


def test_the_planner_walks_the_datasets_own_index(three_datasets, tiny_version):
    big, mid, _ = three_datasets
    assert plan_for(tiny_version, mid) == "hnsw"
    plan = explain(neighbours_queryset(tiny_version, vector=np.ones(32), dataset=mid), K)
    assert f"Index Scan using {_name(tiny_version, mid)} " in plan, plan
    unfiltered = explain(neighbours_queryset(tiny_version, vector=np.ones(32)), K)
    assert f"Index Scan using {hnsw.index_name(tiny_version)} " in unfiltered
    on_big = explain(neighbours_queryset(tiny_version, vector=np.ones(32), dataset=big), K)
    assert f"Index Scan using {hnsw.index_name(tiny_version)} " in on_big


def test_a_starved_walk_of_the_datasets_index_gives_the_brute_force_top_k(three_datasets, tiny_version,
                                                                             settings):
    """With a breadth of only 2k = 20 and hnsw.max_scan_tuples at 1, the
    dataset's own graph, whose rows all match, gives the brute-force top k
    without the exact fallback."""
    _, mid, _ = three_datasets
    settings.CBIR_HNSW_MAX_SCAN_TUPLES, settings.CBIR_HNSW_EF_SEARCH = 1, 1
    for seed in range(5):
        query = np.random.default_rng(300 + seed).normal(size=32)
        queryset = neighbours_queryset(tiny_version, vector=query, dataset=mid)
        sql, params = neighbours.compiled(queryset, K)
        rows, _ = neighbours._run(queryset, sql, params, K, exact=False)  # no fallback
        assert [r[0] for r in rows] == brute_force(tiny_version, query, K, dataset=mid)
    hnsw.drop_dataset_indexes(mid)  # without it: the version's walk, and the fallback if that stops short
    queryset = neighbours_queryset(tiny_version, vector=query, dataset=mid)
    assert f"Index Scan using {hnsw.index_name(tiny_version)} " in explain(queryset, K)
    hits, _ = fetch(queryset, K)
    assert len(hits) == K and {h.dataset for h in hits} == {"mid"}


def test_splits_inside_an_indexed_dataset(three_datasets, tiny_version):
    """Evaluation's filter: the test split queried against train + val of one dataset."""
    _, mid, _ = three_datasets
    for image_id in Image.objects.filter(dataset=mid, split="test").order_by("pk").values_list("pk", flat=True)[:3]:
        vector = np.asarray(Embedding.objects.get(image_id=image_id, model_version=tiny_version).vector,
                            dtype=np.float32)
        hits, _ = fetch(neighbours_queryset(tiny_version, image_id=image_id, dataset=mid, splits=["train", "val"],
                                            exclude_image_id=image_id), K)
        assert [h.image_id for h in hits] == brute_force(tiny_version, vector, K, dataset=mid,
                                                          splits=["train", "val"], exclude=image_id)


def test_deleting_a_dataset_or_a_version_drops_its_indexes(three_datasets, tiny_version,
                                                           django_capture_on_commit_callbacks):
    _, mid, _ = three_datasets
    name = _name(tiny_version, mid)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        mid.delete()
        assert hnsw.dataset_indexes(version=tiny_version) == [name]  # until the commit
    assert callbacks and hnsw.dataset_indexes(version=tiny_version) == []  # (the files are released too)
    version_pk = tiny_version.pk
    assert hnsw.index_state(version_pk) == hnsw.VALID
    tiny_version.delete()
    assert hnsw.index_state(version_pk) == hnsw.MISSING


@pytest.mark.django_db(transaction=True)
def test_a_committed_dataset_delete_drops_its_index_concurrently(three_datasets, tiny_version):
    from search.deletion import delete_now

    _, mid, _ = three_datasets
    delete_now(dataset=mid)
    assert hnsw.dataset_indexes(version=tiny_version) == []


def test_an_index_left_by_a_deleted_dataset_goes_at_the_next_build(three_datasets, tiny_version):
    """A dataset deleted while its index was built, or whose drop timed out."""
    orphan = f"{hnsw.index_name(tiny_version)}_d999999"
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE INDEX {orphan} ON search_embedding USING hnsw ((vector::halfvec(32)) "
                       f"halfvec_cosine_ops) WHERE model_version_id = {tiny_version.pk} AND dataset_id = 999999")
    assert orphan in hnsw.dataset_indexes(version=tiny_version)
    build_hnsw_indexes(tiny_version)
    assert orphan not in hnsw.dataset_indexes(version=tiny_version)
    assert hnsw.dataset_indexes(version=tiny_version) == [_name(tiny_version, three_datasets[1])]


def test_the_exact_count_decides_the_plan_per_version(three_datasets, tiny_version, settings):
    """The plan counts the version's rows of the dataset, not its images."""
    _, _, small = three_datasets
    settings.CBIR_EXACT_SEARCH_MAX_ROWS = SMALL
    assert plan_for(tiny_version, small) == "exact"
    Image.objects.bulk_create([Image(dataset=small, file=f"x/{i}.png", thumbnail=f"x/{i}.jpg", sha256=f"{i:063x}x",
                                     split="train", width=1, height=1, original_filename=f"{i}.png")
                               for i in range(5)])  # not embedded: still 7 rows for the version
    assert plan_for(tiny_version, small) == "exact"


@pytest.mark.django_db
def test_every_writer_copies_the_images_dataset_and_the_upsert_replaces(dataset, tiny_version):
    other = Dataset.objects.create(name="other")
    images = Image.objects.bulk_create([
        Image(dataset=dataset if i % 2 else other, file=f"w/{i}.png", thumbnail=f"w/{i}.jpg", sha256=f"{i:064x}",
              split="train", width=1, height=1, original_filename=f"{i}.png") for i in range(6)])
    vectors = np.random.default_rng(0).normal(size=(6, 32))
    write_embeddings(tiny_version, [im.pk for im in images[:3]], vectors[:3])
    copy_embeddings(tiny_version, [im.pk for im in images[3:]], vectors[3:])
    stored = dict(Embedding.objects.filter(model_version=tiny_version).values_list("image_id", "dataset_id"))
    assert stored == {im.pk: im.dataset_id for im in images}
    # The upsert: the same images again replace their vectors; an image deleted meanwhile is skipped.
    again = np.random.default_rng(1).normal(size=(4, 32))
    assert write_embeddings(tiny_version, [im.pk for im in images[:3]] + [images[-1].pk + 999], again) == 3
    assert Embedding.objects.filter(model_version=tiny_version).count() == 6
    for im, vector in zip(images[:3], again):
        got = np.asarray(Embedding.objects.get(image=im, model_version=tiny_version).vector, dtype=np.float32)
        np.testing.assert_allclose(got, vector.astype(np.float16).astype(np.float32), rtol=0, atol=1e-6)


@pytest.mark.django_db
def test_copy_refuses_an_unknown_image_and_writes_nothing(dataset, tiny_version):
    image = Image.objects.create(dataset=dataset, file="u/1.png", thumbnail="u/1.jpg", sha256="1" * 64,
                                 split="train", width=1, height=1, original_filename="1.png")
    with pytest.raises(psycopg.IntegrityError, match="dataset_id"):
        copy_embeddings(tiny_version, [image.pk, image.pk + 10_000], np.ones((2, 32)))
    assert not Embedding.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_the_migration_copies_each_rows_dataset(tiny_version):
    """Rows written before the column existed get their image's dataset."""
    from django.db.migrations.executor import MigrationExecutor

    before, after = [("search", "0005_deletes_at_scale")], [("search", "0006_embedding_dataset")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    try:
        old = executor.loader.project_state(before).apps
        OldDataset, OldImage = old.get_model("search", "Dataset"), old.get_model("search", "Image")
        sets = [OldDataset.objects.create(name=f"m{i}") for i in range(2)]
        images = [OldImage.objects.create(dataset=sets[i % 2], file=f"m/{i}.png", thumbnail=f"m/{i}.jpg",
                                          sha256=f"{i:064x}", split="train", width=1, height=1,
                                          original_filename=f"{i}.png") for i in range(4)]
        with connection.cursor() as cursor:
            for im in images:
                cursor.execute("INSERT INTO search_embedding (image_id, model_version_id, vector, created) "
                               "VALUES (%s, %s, %s::halfvec, now())", [im.pk, tiny_version.pk, str([1.0] * 32)])
    finally:
        executor.loader.build_graph()
        executor.migrate(after)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())  # the later migrations too, for the tests after this one
    stored = dict(Embedding.objects.values_list("image_id", "dataset_id"))
    assert stored == {im.pk: im.dataset_id for im in images}
