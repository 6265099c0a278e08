"""Jobs as plain functions: state rules, chunk claims, finishing, cancel, re-run,
recovery; and the refusal to start a job that no worker would run."""

import pytest
from django.utils import timezone

from search import embed_jobs, hnsw, jobs
from search.embed_jobs import run_chunk
from search.ingest import import_folder
from search.jobs import S, transition
from search.models import Embedding, Job, JobChunk


@pytest.fixture
def imported(dataset, image_folder):
    import_folder(image_folder, dataset, labels_from_folders=True)
    return dataset


def _embed_job(version, dataset, chunk_size=5, activate=False):
    # check=False: no worker in these tests; tasks are run by calling run_chunk.
    return embed_jobs.start_embed_job(version, dataset, chunk_size=chunk_size, activate=activate, check=False)


@pytest.mark.django_db
def test_allowed_transitions_are_enforced():
    job = Job.objects.create(kind=Job.Kind.EMBED)
    with pytest.raises(jobs.InvalidTransition):
        transition(job.pk, S.SUCCEEDED, expect=[S.QUEUED])  # queued can never jump to succeeded
    assert not transition(job.pk, S.SUCCEEDED)  # nor by accident
    assert transition(job.pk, S.RUNNING)
    assert not transition(job.pk, S.RUNNING, expect=[S.QUEUED])  # a second claim fails
    assert transition(job.pk, S.SUCCEEDED)
    job.refresh_from_db()
    assert job.started and job.finished and job.status == S.SUCCEEDED
    assert not transition(job.pk, S.QUEUED)  # succeeded is final
    assert not transition(job.pk, S.FAILED)


@pytest.mark.django_db
def test_the_log_keeps_the_last_lines():
    job = Job.objects.create(kind=Job.Kind.EMBED)
    for i in range(jobs.LOG_LIMIT + 5):
        jobs.add_log(job.pk, f"line {i}")
    job.refresh_from_db()
    assert len(job.log) == jobs.LOG_LIMIT and job.log[-1]["msg"] == f"line {jobs.LOG_LIMIT + 4}"
    assert job.message == f"line {jobs.LOG_LIMIT + 4}"


def _run_chunk_as_a_worker(chunk_id: int) -> str:
    """run_chunk, then the finishing step when the kernel queued it (what a
    worker does when the finish task it was sent arrives)."""
    outcome = run_chunk(chunk_id)
    job = JobChunk.objects.get(pk=chunk_id).job
    if job.status == S.QUEUED and not job.chunks.exclude(status=S.SUCCEEDED).exists():
        assert any(line["msg"] == "all chunks done; finishing step queued" for line in job.log)
        assert embed_jobs.finish_embed_job(job.pk) == "done"
    return outcome


def test_an_embed_job_is_split_into_chunks_and_finishes_with_the_index(imported, tiny_version,
                                                                        django_capture_on_commit_callbacks):
    job = _embed_job(tiny_version, imported)
    chunks = list(job.chunks.order_by("index"))
    assert [len(c.image_ids) for c in chunks] == [5, 5, 2]
    assert job.progress_total == 12
    for chunk in chunks[:-1]:
        assert run_chunk(chunk.pk) == "done"
    job.refresh_from_db()
    assert job.status == S.RUNNING and job.claimed is None  # the chunks' phase
    assert _run_chunk_as_a_worker(chunks[-1].pk) == "done"
    job.refresh_from_db()
    assert job.status == S.SUCCEEDED and job.result["embedded"] == 12
    assert hnsw.is_ready(tiny_version)
    assert Embedding.objects.filter(model_version=tiny_version).count() == 12
    assert jobs.job_status(job)["percent"] == 100.0


def test_a_chunk_delivered_twice_does_no_harm(imported, tiny_version):
    job = _embed_job(tiny_version, imported)
    chunk = job.chunks.first()
    assert run_chunk(chunk.pk) == "done"
    assert run_chunk(chunk.pk) == "already claimed"
    # Even a forced second run only rewrites the same rows (upsert on image, version).
    JobChunk.objects.filter(pk=chunk.pk).update(status=S.QUEUED)
    run_chunk(chunk.pk)
    assert Embedding.objects.filter(model_version=tiny_version).count() == len(chunk.image_ids)


def test_a_failed_chunk_fails_the_job_and_a_rerun_does_only_the_missing_work(imported, tiny_version, settings):
    from pathlib import Path

    job = _embed_job(tiny_version, imported, chunk_size=6)
    first, second = job.chunks.order_by("index")
    run_chunk(first.pk)
    weights = Path(tiny_version.weights_path)
    saved = weights.read_bytes()
    weights.write_bytes(b"corrupt")  # the next chunk cannot load the network
    from training.core.inference import _cached_network

    _cached_network.cache_clear()
    with pytest.raises(Exception):  # noqa: B017 - whatever torch raises for a corrupt file
        run_chunk(second.pk)
    job.refresh_from_db()
    assert job.status == S.FAILED and "chunk 1" in job.error
    weights.write_bytes(saved)
    _cached_network.cache_clear()
    jobs.rerun(job, check=False)
    job.refresh_from_db()
    assert job.status == S.QUEUED and job.progress_total == 6  # only the missing images
    (chunk,) = job.chunks.all()
    assert set(chunk.image_ids) == set(second.image_ids)
    _run_chunk_as_a_worker(chunk.pk)
    job.refresh_from_db()
    assert job.status == S.SUCCEEDED
    assert Embedding.objects.filter(model_version=tiny_version).count() == 12


def test_cancel_stops_the_job_and_its_chunks(imported, tiny_version):
    job = _embed_job(tiny_version, imported)
    assert jobs.cancel(job)
    job.refresh_from_db()
    assert job.status == S.CANCELLED
    assert set(job.chunks.values_list("status", flat=True)) == {S.CANCELLED}
    assert run_chunk(job.chunks.first().pk) == "job cancelled"
    assert Embedding.objects.count() == 0
    assert not jobs.cancel(job)


def test_activation_switches_only_when_complete(imported, tiny_version):
    from search.indexing import build_index
    from training.versions import get_or_create_version

    build_index(imported, tiny_version)
    tiny_version.activate()
    newer = get_or_create_version("tiny", random_weights=True, config={"dimension": 16, "size": 32, "seed": 1})
    job = embed_jobs.start_activation(newer, check=False)
    chunks = list(job.chunks.order_by("index"))
    for chunk in chunks[:-1]:
        run_chunk(chunk.pk)
        from training.models import ModelVersion

        assert ModelVersion.active() == tiny_version  # search still uses the complete version
    _run_chunk_as_a_worker(chunks[-1].pk)
    from training.models import ModelVersion

    assert ModelVersion.active() == newer and hnsw.is_ready(newer)


def test_stale_running_chunks_are_queued_again(imported, tiny_version, settings, django_capture_on_commit_callbacks):
    settings.CBIR_JOB_STALE_SECONDS = 5
    job = _embed_job(tiny_version, imported)
    chunk = job.chunks.first()
    long_ago = timezone.now() - timezone.timedelta(seconds=60)
    JobChunk.objects.filter(pk=chunk.pk).update(status=S.RUNNING, heartbeat=long_ago, worker="dead:1")
    JobChunk.objects.filter(job=job).exclude(pk=chunk.pk).update(status=S.RUNNING, heartbeat=timezone.now())
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert jobs.recover_stale() == 1
    assert len(callbacks) == 1  # one message sent again, after commit
    chunk.refresh_from_db()
    assert chunk.status == S.QUEUED


def test_starting_a_job_without_a_broker_says_why(imported, tiny_version, settings, tmp_path):
    from cbirsite.celery import app

    old = app.conf.broker_url
    app.conf.broker_url = f"redis+socket://{tmp_path}/no-redis.sock"
    try:
        with pytest.raises(jobs.JobsUnavailable, match="cannot be reached.*Search keeps working"):
            embed_jobs.start_embed_job(tiny_version, imported)
    finally:
        app.conf.broker_url = old
    assert Job.objects.count() == 0


def test_starting_a_job_with_no_worker_says_why(imported, tiny_version, redis_server):
    # The test Redis is up, but no worker consumes the queue yet.
    with pytest.raises(jobs.JobsUnavailable, match="no Celery worker"):
        embed_jobs.start_embed_job(tiny_version, imported)
    assert Job.objects.count() == 0


def test_an_empty_job_finishes_at_once(imported, tiny_version, django_capture_on_commit_callbacks):
    from search.indexing import build_index

    build_index(imported, tiny_version)
    from search.embed_jobs import finish_embed_job

    job = _embed_job(tiny_version, imported)
    assert job.chunks.count() == 0
    finish_embed_job(job.pk)
    job.refresh_from_db()
    assert job.status == S.SUCCEEDED


def test_the_finishing_step_is_queued_once_and_never_while_it_runs(imported, tiny_version,
                                                                 django_capture_on_commit_callbacks):
    """Two chunks ending together both ask; only one queues the finish, and a
    finish that has claimed the job is never queued again by a late chunk."""
    from search.runner import queue_finish

    job = _embed_job(tiny_version, imported, chunk_size=12)
    (chunk,) = job.chunks.all()
    assert not queue_finish(job.pk)  # a chunk is not done yet
    Job.objects.filter(pk=job.pk).update(status=S.RUNNING, claimed=None)
    JobChunk.objects.filter(pk=chunk.pk).update(status=S.SUCCEEDED)
    with django_capture_on_commit_callbacks() as sent:
        assert queue_finish(job.pk)
        assert not queue_finish(job.pk)
    assert len(sent) == 1  # one message to the broker
    Job.objects.filter(pk=job.pk).update(status=S.RUNNING, claimed=timezone.now())  # the finish has it
    assert not queue_finish(job.pk)
