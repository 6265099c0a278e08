"""Index builds that scale (search/hnsw.py): CONCURRENTLY outside a
transaction, an INVALID index left by a failed concurrent build dropped and
built again, memory sized from the rows, progress read from
pg_stat_progress_create_index and written to the embed job."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection

from cbirsite import machine
from cbirsite.env import env_bytes
from search import hnsw, jobs
from search.embed_jobs import KIND, finish_embed_job
from search.indexing import build_hnsw_index, copy_embeddings
from search.models import Dataset, Image, Job, JobChunk
from search.neighbours import explain, neighbours_queryset
from training.models import ModelVersion
from training.versions import get_or_create_version


def _load(version, n: int, *, seed: int = 0, name: str = "bulk") -> list[int]:
    """n placeholder images with random vectors written by copy_embeddings (binary COPY)."""
    dataset = Dataset.objects.create(name=name)
    images = Image.objects.bulk_create([
        Image(dataset=dataset, file=f"f/{i}.png", thumbnail=f"t/{i}.jpg", sha256=f"{i:064x}", split="train",
              width=1, height=1, original_filename=f"{i}.png") for i in range(n)])
    ids = [im.pk for im in images]
    copy_embeddings(version, ids, np.random.default_rng(seed).normal(size=(n, int(version.dimension))))
    return ids


def _indexdef(version) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", [hnsw.index_name(version)])
        row = cursor.fetchone()
    return row[0] if row else ""


# --- Sizing (no database) -------------------------------------------------------

def test_build_memory_follows_the_rows_within_its_bounds(settings):
    settings.CBIR_INDEX_BUILD_MEMORY = 0
    small = hnsw.build_memory(100, 1280, 16)
    assert small == hnsw.MIN_BUILD_MEMORY
    rows = 200_000
    wanted = hnsw.graph_bytes(rows, 1280, 16) * hnsw.GRAPH_HEADROOM
    cap = machine.memory_bytes() * hnsw.MAX_BUILD_MEMORY_SHARE
    assert hnsw.build_memory(rows, 1280, 16) == pytest.approx(max(hnsw.MIN_BUILD_MEMORY, min(wanted, cap)), rel=1e-6)
    assert hnsw.build_memory(10**9, 1280, 16) <= cap  # never more than a quarter of the machine
    settings.CBIR_INDEX_BUILD_MEMORY = 3 * 2**30
    assert hnsw.build_memory(100, 1280, 16) == 3 * 2**30


def test_graph_estimate_matches_the_measured_bytes_per_row():
    # pgvector 0.8.5's notice: 16 MB held 5,117 rows at 1,280-d and 8 MB 6,831 at 256-d (m = 16).
    assert hnsw.graph_bytes(5117, 1280, 16) == pytest.approx(16 * 2**20, rel=0.01)
    assert hnsw.graph_bytes(6831, 256, 16) == pytest.approx(8 * 2**20, rel=0.01)


def test_build_workers_from_the_cores_or_the_setting(settings):
    settings.CBIR_INDEX_BUILD_WORKERS = -1
    assert hnsw.build_workers() == max(0, min(machine.cores() - 1, 8))
    settings.CBIR_INDEX_BUILD_WORKERS = 3
    assert hnsw.build_workers() == 3


@pytest.mark.parametrize(("raw", "expected"), [("1073741824", 2**30), ("512MB", 512 * 2**20), ("4gb", 4 * 2**30),
                                               ("1.5 GB", int(1.5 * 2**30)), ("64kB", 65536)])
def test_sizes_read_from_the_environment(monkeypatch, raw, expected):
    monkeypatch.setenv("CBIR_TEST_SIZE", raw)
    assert env_bytes("CBIR_TEST_SIZE", 0) == expected


@pytest.mark.parametrize("raw", ["lots", "4 parsecs", "-1GB"])
def test_a_bad_size_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv("CBIR_TEST_SIZE", raw)
    with pytest.raises(ImproperlyConfigured, match="CBIR_TEST_SIZE"):
        env_bytes("CBIR_TEST_SIZE", 0, minimum=0)


def test_postgres_settings_scale_with_the_machine():
    small = machine.postgres_settings(memory=4 * machine.GIB, n_cores=2)
    large = machine.postgres_settings(memory=256 * machine.GIB, n_cores=32)
    assert small["shared_buffers"] == "1024MB" and large["shared_buffers"] == "8192MB"
    assert small["max_parallel_maintenance_workers"] == "1" and large["max_parallel_maintenance_workers"] == "8"
    assert int(large["max_worker_processes"]) >= 32


def test_the_embedded_server_gets_the_settings_in_an_included_file(tmp_path):
    from cbirsite.embedded import SETTINGS_FILE, write_server_settings

    assert not write_server_settings(tmp_path)  # not initialised: left alone
    conf = tmp_path / "postgresql.conf"
    conf.write_text("shared_buffers = 128MB\n")
    assert write_server_settings(tmp_path)
    written = (tmp_path / SETTINGS_FILE).read_text()
    for name, value in machine.postgres_settings().items():
        assert f"{name} = '{value}'" in written
    lines = conf.read_text().splitlines()
    assert lines[0] == "shared_buffers = 128MB" and lines[-1] == f"include_if_exists = '{SETTINGS_FILE}'"
    assert not write_server_settings(tmp_path)  # unchanged: no reload needed
    assert conf.read_text().count("include_if_exists") == 1


@pytest.mark.django_db
def test_the_running_embedded_server_uses_them():
    from django.conf import settings

    if settings.DATABASES["default"]["HOST"] != str(settings.VAR_DIR / "pg"):
        pytest.skip("DATABASE_URL points at another server")
    with connection.cursor() as cursor:
        cursor.execute("SHOW max_parallel_maintenance_workers")
        assert cursor.fetchone()[0] == machine.postgres_settings()["max_parallel_maintenance_workers"]


# --- Builds on the real server --------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_a_build_outside_a_transaction_runs_concurrently_and_is_used(tiny_version):
    _load(tiny_version, 500)
    report = build_hnsw_index(tiny_version)
    assert report.created and report.concurrently and report.rows == 500
    assert report.memory >= hnsw.MIN_BUILD_MEMORY
    assert hnsw.index_state(tiny_version) == hnsw.VALID
    queryset = neighbours_queryset(tiny_version, vector=np.ones(32))
    assert f"Index Scan using {hnsw.index_name(tiny_version)}" in explain(queryset, 10)
    assert not build_hnsw_index(tiny_version).created  # a valid index is kept


@pytest.mark.django_db(transaction=True)
def test_an_invalid_index_from_a_failed_concurrent_build_is_dropped_and_rebuilt(tiny_version):
    _load(tiny_version, 50)
    with connection.cursor() as cursor, pytest.raises(Exception, match="could not create unique index"):
        # A concurrent build that fails half-way leaves an INVALID index behind.
        cursor.execute(f"CREATE UNIQUE INDEX CONCURRENTLY {hnsw.index_name(tiny_version)} "
                       f"ON search_embedding (model_version_id)")
    assert hnsw.index_state(tiny_version) == hnsw.INVALID
    report = build_hnsw_index(tiny_version)
    assert report.created and report.dropped_invalid
    assert hnsw.index_state(tiny_version) == hnsw.VALID
    assert "USING hnsw" in _indexdef(tiny_version)


@pytest.fixture
def version_256(db):
    """A 256-d version: a build of a few thousand rows lasts long enough to watch."""
    return get_or_create_version("tiny", random_weights=True, config={"dimension": 256, "size": 32})


@pytest.mark.django_db(transaction=True)
def test_build_progress_is_read_from_pg_stat_progress_create_index(version_256, settings):
    settings.CBIR_INDEX_PROGRESS_INTERVAL = 0.01
    _load(version_256, 4000)
    calls: list[tuple[int, int, str]] = []
    report = build_hnsw_index(version_256, progress=lambda done, total, message: calls.append((done, total, message)))
    assert report.created and report.samples and len(calls) == len(report.samples)
    loading = [s for s in report.samples if s.phase == "building index: loading tuples"]
    assert loading, [s.phase for s in report.samples]
    assert all(0 <= s.tuples_done <= 4000 and 0 <= s.blocks_done <= s.blocks_total for s in loading)
    assert [s.tuples_done for s in loading] == sorted(s.tuples_done for s in loading)
    # The job's bar: tuples loaded out of the version's rows (pgvector leaves tuples_total at 0).
    assert all(total == 4000 and 0 <= done <= total for done, total, _ in calls)
    assert any(m.startswith("building the HNSW index: building index: loading tuples") for _, _, m in calls)


@pytest.mark.django_db(transaction=True)
def test_the_embed_job_builds_outside_its_transaction_and_shows_the_build_as_progress(version_256, settings):
    settings.CBIR_INDEX_PROGRESS_INTERVAL = 0.01
    ids = _load(version_256, 4000)
    # The job embedded 3 images; the index it builds covers all 4,000 rows of the version.
    # As the kernel leaves it once every chunk succeeded: queued for its finishing step.
    job = Job.objects.create(kind=KIND, model_version=version_256, status=jobs.S.QUEUED,
                             params={"dataset_id": None, "activate": True}, progress_total=3)
    JobChunk.objects.create(job=job, index=0, image_ids=ids[:3], status=jobs.S.SUCCEEDED, done=3)
    seen: list[dict] = []
    finisher = threading.Thread(target=lambda: (finish_embed_job(job.pk), connection.close()))
    finisher.start()
    while finisher.is_alive():
        status = jobs.job_status(Job.objects.get(pk=job.pk))  # what the job page polls
        if status["message"].startswith("building the HNSW index:") and not status["finished"]:
            seen.append(status)
        finisher.join(0.005)
    job.refresh_from_db()
    assert job.status == jobs.S.SUCCEEDED and job.result["index_created"] and job.result["activated"]
    assert job.progress_done == 3 and job.progress_total == 3  # back to the images once succeeded
    assert hnsw.index_state(version_256) == hnsw.VALID and ModelVersion.active() == version_256
    assert seen, "the job page never showed the build's progress"
    # Once every chunk is done the bar is the build's (tuples of the version's rows), not the chunks' sum.
    assert all(st["total"] == len(ids) and 0 <= st["done"] <= st["total"] for st in seen)
    assert max(st["done"] for st in seen) > 3, "the bar showed the chunks' sum, not the build"
    assert any("loading tuples" in st["message"] for st in seen)
    assert any(f"index {hnsw.index_name(version_256)} built: 4,000 rows" in entry["msg"] for entry in job.log)


@pytest.mark.django_db(transaction=True)
def test_an_index_being_built_reads_building_and_search_does_not_use_it(version_256):
    """pg_indexes lists an index from the start of CREATE INDEX CONCURRENTLY;
    index_state says "building" (not ready) until it is valid: the admin,
    evaluation and search all read this one state."""
    import psycopg

    from search.services import IndexNotReady, ready_version
    from tests.helpers import wait_for
    from tests.workers import database_url

    _load(version_256, 300)
    version_256.activate()
    assert hnsw.index_state(version_256) == hnsw.MISSING
    with psycopg.connect(database_url(connection.settings_dict)) as writer:
        writer.execute("LOCK TABLE search_embedding IN ROW EXCLUSIVE MODE")  # a writer the build waits for
        builder = threading.Thread(target=lambda: (build_hnsw_index(version_256), connection.close()))
        builder.start()
        try:
            wait_for(lambda: hnsw.index_state(version_256) == hnsw.BUILDING, timeout=30,
                     message="the build to wait for the writer")
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_indexes WHERE indexname = %s", [hnsw.index_name(version_256)])
                assert cursor.fetchone() is not None  # listed, yet not usable
            assert not hnsw.is_ready(version_256)
            with pytest.raises(IndexNotReady):
                ready_version()
        finally:
            writer.rollback()
            builder.join(60)
    assert hnsw.index_state(version_256) == hnsw.VALID and ready_version() == version_256


def test_the_index_ddl_comes_from_one_definition(version_256):
    """Name, expression, parameters and condition from search.hnsw's definition (pgvector-python's HnswIndex)."""
    sql = hnsw.create_index_sql(version_256, 16, 64, concurrently=True)
    assert sql == (f'CREATE INDEX CONCURRENTLY "{hnsw.index_name(version_256)}" ON "search_embedding" USING hnsw '
                   f'((("vector")::halfvec(256)) halfvec_cosine_ops) WITH (m = 16, ef_construction = 64) '
                   f'WHERE "model_version_id" = {version_256.pk}')
    dataset = Dataset.objects.create(name="d")
    assert hnsw.create_index_sql(version_256, 16, 64, concurrently=False, dataset=dataset).endswith(
        f'WHERE ("model_version_id" = {version_256.pk} AND "dataset_id" = {dataset.pk})')
