"""Jobs on real Celery workers against a real Redis: end to end, a worker
killed with SIGKILL mid-job, Redis restarted mid-job."""

import zipfile
from pathlib import Path

import pytest
from django.db.models import Count

from search import embed_jobs, hnsw, import_jobs
from search.ingest import import_folder
from search.jobs import S
from search.models import Dataset, Embedding, Image, Job, JobChunk
from search.neighbours import CALIBRATION
from tests.helpers import image_bytes, wait_for

pytestmark = [pytest.mark.worker, pytest.mark.timeout(240)]


def _finished(job_id):
    return Job.objects.filter(pk=job_id, status__in=[S.SUCCEEDED, S.FAILED, S.CANCELLED]).first()


def _assert_each_image_embedded_once(version, dataset):
    counts = Embedding.objects.filter(model_version=version).values("image").annotate(n=Count("id"))
    assert all(row["n"] == 1 for row in counts)
    assert counts.count() == Image.objects.filter(dataset=dataset).count()


@pytest.fixture
def many_images(live_worker, tmp_path):
    """40 distinct images in a dataset, files in the media the worker shares."""
    folder = tmp_path / "many"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(20):
            (folder / label / f"{i}.png").write_bytes(image_bytes(pattern=1000 * (label == "a") + i))
    dataset = Dataset.objects.create(name="many")
    report = import_folder(folder, dataset, labels_from_folders=True)
    assert report.imported == 40
    return dataset


def test_an_embedding_job_runs_on_a_worker_end_to_end(many_images, tiny_version):
    job = embed_jobs.start_embed_job(tiny_version, many_images, chunk_size=8)
    job = wait_for(lambda: _finished(job.pk), message="the job to finish")
    assert job.status == S.SUCCEEDED, (job.error, job.log)
    assert job.result["embedded"] == 40 and job.progress_done == 40
    assert hnsw.is_ready(tiny_version)
    _assert_each_image_embedded_once(tiny_version, many_images)
    assert set(JobChunk.objects.filter(job=job).values_list("status", flat=True)) == {S.SUCCEEDED}
    assert any("started on" in line["msg"] for line in job.log)
    tiny_version.refresh_from_db()  # the worker measured the new index's recall and chose its ef_search
    calibrated = tiny_version.metrics[CALIBRATION]
    assert calibrated["rows"] == 40 and calibrated["queries"] == 40 and calibrated["k"] == 10
    assert any(line["msg"].startswith("search calibrated: ef_search ") for line in job.log)


def test_a_zip_import_job_imports_and_then_indexes(live_worker, tiny_version, tmp_path):
    from search.indexing import build_index

    seed = Dataset.objects.create(name="seed")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.png").write_bytes(image_bytes(pattern=1))
    import_folder(tmp_path / "s", seed)
    build_index(seed, tiny_version)  # makes tiny the active version
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(5):
            zf.writestr(f"cats/{i}.png", image_bytes(pattern=500 + i))
        zf.writestr("cats/0-again.png", image_bytes(pattern=500))
        zf.writestr("../../evil.png", image_bytes(pattern=600))
        zf.writestr("docs/readme.txt", "hello")
        zf.writestr("broken.jpg", b"\xff\xd8\xff\xe0 nope")
    target = Dataset.objects.create(name="zipped")
    job = import_jobs.start_import_job(target, str(archive), labels_from_folders=True, original_name="upload.zip")
    job = wait_for(lambda: _finished(job.pk), message="the import job")
    assert job.status == S.SUCCEEDED, (job.error, job.log)
    assert job.result["imported"] == 6 and job.result["duplicates"] == 1
    assert job.result["not_images"] == 1 and job.result["rejected"] == 2
    assert set(target.images.values_list("label", flat=True)) == {"cats", None}
    assert not archive.exists()  # the upload is removed once imported
    follow = wait_for(lambda: Job.objects.filter(kind=Job.Kind.EMBED, dataset=target,
                                                 status=S.SUCCEEDED).first(), message="the follow-up index job")
    assert follow.result["embedded"] == 6


def test_a_worker_killed_mid_job_is_replaced_and_the_job_finishes(many_images, tiny_version, worker_env,
                                                                   tmp_path, session_worker):
    """SIGKILL a worker while it embeds; a fresh worker finishes the job, every image embedded once."""
    from cbirsite.celery import app
    from tests.workers import Worker

    # The session worker stays out of this: only the doomed worker takes the chunks at first.
    session_worker.stop()
    slow_env = dict(worker_env, CBIR_EMBED_THROTTLE_SECONDS="0.4", CBIR_EMBED_BATCH_SIZE="2")
    doomed = Worker("doomed", slow_env, tmp_path / "doomed.log").start()
    doomed.wait_ready(app)
    replacement = None
    try:
        job = embed_jobs.start_embed_job(tiny_version, many_images, chunk_size=10)
        wait_for(lambda: JobChunk.objects.filter(job=job, status=S.RUNNING, done__gt=0).exists(),
                 message="a chunk to be under way")
        doomed.kill()
        assert Job.objects.get(pk=job.pk).status == S.RUNNING
        replacement = Worker("replacement", worker_env, tmp_path / "replacement.log").start()
        job = wait_for(lambda: _finished(job.pk), timeout=120, message="the job to finish after the kill")
        assert job.status == S.SUCCEEDED, (job.error, job.log)
        assert any("stopped answering" in line["msg"] for line in job.log)
        assert JobChunk.objects.filter(job=job, attempts__gte=2).exists()
        _assert_each_image_embedded_once(tiny_version, many_images)
    finally:
        doomed.kill()
        if replacement:
            replacement.wait_idle()
            replacement.stop()
        doomed.purge()
        session_worker.start()
        session_worker.wait_ready(app)


def test_a_queued_job_whose_message_was_lost_runs_on_an_idle_worker(live_worker, tmp_path):
    """A queued import whose message Redis no longer holds (flushed): the
    worker's recovery loop sends it again and the idle worker runs it."""
    from datetime import timedelta

    from django.utils import timezone

    from search.import_jobs import uploads_dir

    archive = uploads_dir() / "lost.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.png", image_bytes(pattern=900))
    dataset = Dataset.objects.create(name="lost")
    job = Job.objects.create(kind=Job.Kind.IMPORT, dataset=dataset, celery_task_id="flushed-with-redis",
                             params={"zip_path": str(archive), "labels_from_folders": False},
                             heartbeat=timezone.now() - timedelta(minutes=10))  # queued, its message gone
    job = wait_for(lambda: _finished(job.pk), timeout=60, message="the lost job to be sent again and run")
    assert job.status == S.SUCCEEDED, (job.error, job.log)
    assert any("no longer in the broker; sent again" in line["msg"] for line in job.log)
    assert job.celery_task_id != "flushed-with-redis" and dataset.images.count() == 1


def _pool_processes(parent: int) -> list[int]:
    """The pids of a worker's pool processes (its main process's children)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def test_a_killed_pool_process_shows_on_the_job_at_once_and_the_job_finishes(many_images, tiny_version, worker_env,
                                                                            tmp_path, session_worker):
    """SIGKILL the pool process running a chunk: Celery's main process sees
    WorkerLostError at once, and the job says so long before a heartbeat
    could go stale (600 s here); the redelivered chunk finishes the job."""
    import os
    import signal
    import time

    from tests.workers import worker_in_place_of

    slow_env = dict(worker_env, CBIR_EMBED_THROTTLE_SECONDS="0.4", CBIR_EMBED_BATCH_SIZE="2",
                    CBIR_JOB_STALE_SECONDS="600")
    with worker_in_place_of(session_worker, "losing", slow_env, tmp_path / "losing.log") as worker:
        job = embed_jobs.start_embed_job(tiny_version, many_images, chunk_size=10)
        wait_for(lambda: JobChunk.objects.filter(job=job, status=S.RUNNING, done__gt=0).exists(),
                 message="a chunk to be under way")
        (child,) = _pool_processes(worker.process.pid)
        os.kill(child, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: any("worker process was lost" in line["msg"] for line in Job.objects.get(pk=job.pk).log),
                 timeout=30, message="the job to say its worker process was lost")
        assert time.monotonic() - killed < 30
        job = wait_for(lambda: _finished(job.pk), timeout=150, message="the job to finish after the kill")
        assert job.status == S.SUCCEEDED, (job.error, job.log)
        assert JobChunk.objects.filter(job=job, attempts__gte=2).exists()
        _assert_each_image_embedded_once(tiny_version, many_images)
        assert "WorkerLostError" in (tmp_path / "losing.log").read_text()


def test_redis_restarted_mid_job_the_job_still_finishes(many_images, tiny_version, redis_server, worker_env,
                                                       tmp_path, session_worker):
    from tests.workers import worker_in_place_of

    slow_env = dict(worker_env, CBIR_EMBED_THROTTLE_SECONDS="0.3", CBIR_EMBED_BATCH_SIZE="2")
    with worker_in_place_of(session_worker, "survivor", slow_env, tmp_path / "survivor.log"):
        job = embed_jobs.start_embed_job(tiny_version, many_images, chunk_size=10)
        wait_for(lambda: JobChunk.objects.filter(job=job, status=S.RUNNING, done__gt=0).exists(),
                 message="a chunk to be under way")
        redis_server.restart(pause=1.0)
        job = wait_for(lambda: _finished(job.pk), timeout=150, message="the job to finish after the restart")
        assert job.status == S.SUCCEEDED, (job.error, job.log, (tmp_path / "survivor.log").read_text()[-2000:])
        _assert_each_image_embedded_once(tiny_version, many_images)


def test_cancel_from_the_job_page_stops_a_running_job(many_images, tiny_version, admin_client, worker_env, tmp_path,
                                                     session_worker):
    from tests.workers import worker_in_place_of

    env = dict(worker_env, CBIR_EMBED_THROTTLE_SECONDS="0.5", CBIR_EMBED_BATCH_SIZE="2")
    with worker_in_place_of(session_worker, "slow", env, tmp_path / "slow.log"):
        job = embed_jobs.start_embed_job(tiny_version, many_images, chunk_size=40)
        wait_for(lambda: Job.objects.filter(pk=job.pk, status=S.RUNNING).exists(), message="the job to run")
        page = admin_client.get(f"/jobs/{job.pk}/")
        assert page.status_code == 200 and b"Cancel" in page.content
        response = admin_client.post(f"/jobs/{job.pk}/cancel")
        assert response.status_code == 302
        wait_for(lambda: JobChunk.objects.filter(job=job, status=S.CANCELLED).exists(), message="the chunk to stop")
        job.refresh_from_db()
        assert job.status == S.CANCELLED
        assert Embedding.objects.filter(model_version=tiny_version).count() < 40
        status = admin_client.get(f"/jobs/{job.pk}/status").json()
        assert status["status"] == "cancelled" and status["finished"]


def test_a_large_enough_embedding_job_runs_the_compiled_network_on_the_worker(many_images, tiny_version, settings,
                                                                              live_worker):
    """From CBIR_COMPILE_MIN_IMAGES images the worker embeds through torch.compile
    (short last batches padded): the stored vectors are the eager network's."""
    import numpy as np
    import torch
    from django.conf import settings as conf

    from search.indexing import _FileImages
    from training.core.inference import embed_batch, network_for, preprocessing_for

    settings.CBIR_COMPILE_MIN_IMAGES = 40
    job = embed_jobs.start_embed_job(tiny_version, many_images, chunk_size=12)  # chunks of 12, 12, 12, 4 images
    assert job.params["compile"] is True and "torch.compile" in job.log[-1]["msg"]
    job = wait_for(lambda: _finished(job.pk), message="the job to finish")
    assert job.status == S.SUCCEEDED, (job.error, job.log)
    assert f"compiled {tiny_version.architecture} for batches of 32" in live_worker.log.read_text(errors="replace")
    _assert_each_image_embedded_once(tiny_version, many_images)
    items = [(pk, str(Path(conf.MEDIA_ROOT) / f)) for pk, f in
             Image.objects.filter(dataset=many_images).order_by("pk").values_list("pk", "file")[:12]]
    files = _FileImages(items, preprocessing_for(tiny_version))
    model, device = network_for(tiny_version)
    expected = embed_batch(model, device, torch.stack([files[i][0] for i in range(len(items))]))
    stored = dict(Embedding.objects.filter(model_version=tiny_version).values_list("image_id", "vector"))
    got = np.stack([np.asarray(stored[pk], dtype=np.float32) for pk, _ in items])
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3)


def test_a_finishing_step_longer_than_the_chunk_time_limit_still_succeeds(many_images, tiny_version, worker_env,
                                                                          tmp_path, session_worker):
    """The index build runs as a task of its own under CBIR_FINISH_TIME_LIMIT, not
    inside the last chunk's task: with chunks limited to 10 s, a build held up
    for longer (a transaction holding the lock CREATE INDEX CONCURRENTLY needs)
    still ends succeeded, and the chunks' limit is not what ends it."""
    import time

    import psycopg
    from django.db import connection

    from tests.workers import database_url, worker_in_place_of

    env = dict(worker_env, CBIR_CHUNK_TIME_LIMIT="10", CBIR_FINISH_TIME_LIMIT="120")
    held_for = 14.0
    with worker_in_place_of(session_worker, "finisher", env, tmp_path / "finisher.log"), \
            psycopg.connect(database_url(connection.settings_dict)) as blocker:
        blocker.execute("LOCK TABLE search_embedding IN SHARE UPDATE EXCLUSIVE MODE")  # conflicts with the build
        job = embed_jobs.start_embed_job(tiny_version, many_images, chunk_size=20)
        wait_for(lambda: Job.objects.filter(pk=job.pk, message__startswith="building the HNSW index").exists(),
                 timeout=120, message="the finishing step to start building")
        time.sleep(held_for)
        blocker.rollback()  # releases the lock: the build goes on
        job = wait_for(lambda: _finished(job.pk), timeout=120, message="the job to finish")
        log = (tmp_path / "finisher.log").read_text()
    assert job.status == S.SUCCEEDED, (job.error, job.log, log[-2000:])
    assert job.result["index_created"] and hnsw.is_ready(tiny_version)
    from datetime import datetime

    queued = datetime.fromisoformat(next(line["t"] for line in job.log
                                         if line["msg"] == "all chunks done; finishing step queued"))
    assert "TimeLimitExceeded" not in log
    # The finishing step alone ran longer than a chunk may.
    assert (job.finished - queued).total_seconds() > held_for > 10
