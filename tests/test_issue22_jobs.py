"""Issue 22, the job kernel: a queued job whose broker message was lost, a
worker process lost mid-task, uploads left behind. Real PostgreSQL, the
test run's real Redis, real Celery workers where a worker is the point."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from search import broker, jobs, runner
from search.jobs import S
from search.models import Job, JobChunk

LOST_QUEUE = "cbir-test-lost"  # no worker consumes it: what is sent there stays


@pytest.fixture
def lost_kinds():
    """Two job kinds on a queue of their own: a whole job, and a split one."""
    whole = jobs.JobKind("lostwhole", task="search.tasks.run_import", queue=LOST_QUEUE)
    split = jobs.JobKind("lostsplit", task="search.tasks.finish_embed_job", queue=LOST_QUEUE,
                         chunk_task="search.tasks.embed_chunk")
    for kind in (whole, split):
        jobs.register_kind(kind)
    _purge(LOST_QUEUE)
    yield whole, split
    _purge(LOST_QUEUE)
    for kind in (whole, split):
        jobs.KINDS.pop(kind.name, None)


def _purge(queue: str) -> None:
    """What a Redis flush does to one queue."""
    from cbirsite.celery import app

    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge(queue)


def _waiting() -> set[str]:
    ids = broker.waiting_task_ids([LOST_QUEUE])
    assert ids is not None
    return ids


def _age(model, pk: int, seconds: float) -> None:
    model.objects.filter(pk=pk).update(heartbeat=timezone.now() - timedelta(seconds=seconds))


def test_a_queued_job_whose_message_was_lost_is_sent_again_once(lost_kinds, db, settings,
                                                                django_capture_on_commit_callbacks):
    settings.CBIR_JOB_QUEUED_RESEND_SECONDS = 60
    with django_capture_on_commit_callbacks(execute=True):
        job = jobs.create("lostwhole", log="created")
    job.refresh_from_db()
    assert job.celery_task_id in _waiting()

    _age(Job, job.pk, 30)  # queued, but not for long: left alone
    assert jobs.resend_lost() == 0
    _age(Job, job.pk, 3600)  # waiting behind a long task: its message is still there
    assert jobs.resend_lost() == 0
    assert Job.objects.get(pk=job.pk).celery_task_id == job.celery_task_id

    _purge(LOST_QUEUE)  # Redis flushed: the message is gone
    with django_capture_on_commit_callbacks(execute=True):
        assert jobs.resend_lost() == 1
    job.refresh_from_db()
    assert job.status == S.QUEUED and job.celery_task_id in _waiting()
    assert "no longer in the broker; sent again" in job.log[-1]["msg"]
    assert len(_waiting()) == 1
    with django_capture_on_commit_callbacks(execute=True):
        assert jobs.recover_stale() == 0  # just sent: no second copy

    # Should both copies reach workers, the claim lets only one run it.
    runs = []
    assert runner.execute(job.pk, lambda run: runs.append(run.job_id)) == "done"
    assert runner.execute(job.pk, lambda run: runs.append(run.job_id)) == "not claimed"
    assert runs == [job.pk]


def test_a_lost_chunk_is_sent_again_and_its_split_job_is_not_finished_early(lost_kinds, db, settings,
                                                                            django_capture_on_commit_callbacks):
    settings.CBIR_JOB_QUEUED_RESEND_SECONDS = 60
    with django_capture_on_commit_callbacks(execute=True):
        job = jobs.create("lostsplit", log="created")
        chunks = [JobChunk.objects.create(job=job, index=i, image_ids=[], heartbeat=timezone.now())
                  for i in range(2)]
        for chunk in chunks:
            jobs.send_chunk(chunk)
    assert job.celery_task_id == ""  # a split job sends its chunks, not itself
    Job.objects.filter(pk=job.pk).update(created=timezone.now() - timedelta(hours=1))
    for chunk in chunks:
        _age(JobChunk, chunk.pk, 3600)
    assert jobs.resend_lost() == 0  # both messages still wait

    _purge(LOST_QUEUE)
    with django_capture_on_commit_callbacks(execute=True):
        assert jobs.resend_lost() == 2  # the two chunks; the job's finishing step waits for them
    sent = set(JobChunk.objects.filter(job=job).values_list("celery_task_id", flat=True))
    assert sent == _waiting() and len(sent) == 2
    assert Job.objects.get(pk=job.pk).celery_task_id == ""

    # Once every chunk is done the finishing step is queued; lost too, it is sent again.
    JobChunk.objects.filter(job=job).update(status=S.SUCCEEDED)
    Job.objects.filter(pk=job.pk).update(status=S.RUNNING)
    _purge(LOST_QUEUE)
    with django_capture_on_commit_callbacks(execute=True):
        assert runner.queue_finish(job.pk)
    _age(Job, job.pk, 3600)
    _purge(LOST_QUEUE)
    with django_capture_on_commit_callbacks(execute=True):
        assert jobs.resend_lost() == 1
    assert Job.objects.get(pk=job.pk).celery_task_id in _waiting()


def test_no_broker_means_nothing_is_sent_and_nothing_changes(lost_kinds, db, settings, tmp_path,
                                                             django_capture_on_commit_callbacks):
    from cbirsite.celery import app

    settings.CBIR_JOB_QUEUED_RESEND_SECONDS = 60
    with django_capture_on_commit_callbacks(execute=True):
        job = jobs.create("lostwhole", log="created")
    _age(Job, job.pk, 3600)
    _purge(LOST_QUEUE)  # lost: with the broker answering it would be sent again
    before = Job.objects.get(pk=job.pk)
    good = app.conf.broker_url
    app.conf.broker_url = f"redis+socket://{tmp_path}/no-redis.sock"  # as test_jobs does: no pool reset
    try:
        assert jobs.resend_lost() == 0
    finally:
        app.conf.broker_url = good
    after = Job.objects.get(pk=job.pk)
    assert (after.heartbeat, after.celery_task_id, after.log) == (before.heartbeat, before.celery_task_id, before.log)


# --- uploads of import jobs that can no longer run -------------------------------

def _upload(name: str, folder=None):
    import zipfile

    from search.import_jobs import uploads_dir
    from tests.helpers import image_bytes

    path = (folder or uploads_dir()) / name
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.png", image_bytes(pattern=3))
    return path


def test_a_cancelled_import_keeps_its_upload_until_its_dataset_is_deleted(db, django_capture_on_commit_callbacks):
    from search import deletion
    from search.import_jobs import start_import_job
    from search.models import Dataset

    dataset = Dataset.objects.create(name="uploads")
    zip_path = _upload("cancelled.zip")
    with django_capture_on_commit_callbacks(execute=True):
        job = start_import_job(dataset, zip_path, check=False)
    assert jobs.cancel(job)
    assert zip_path.exists()  # Run again still needs it
    with django_capture_on_commit_callbacks(execute=True):
        assert deletion.delete_now(dataset=dataset) == 0
    assert not zip_path.exists()
    assert Job.objects.get(pk=job.pk).status == S.CANCELLED


def test_a_rolled_back_dataset_delete_keeps_the_upload(db, django_capture_on_commit_callbacks):
    from django.db import transaction

    from search.import_jobs import start_import_job
    from search.models import Dataset

    dataset = Dataset.objects.create(name="kept")
    zip_path = _upload("kept.zip")
    job = start_import_job(dataset, zip_path, check=False)
    jobs.cancel(job)
    with django_capture_on_commit_callbacks(execute=True):
        with pytest.raises(RuntimeError), transaction.atomic():
            dataset.delete()
            raise RuntimeError("rolled back")
    assert zip_path.exists()


def test_deleting_an_import_job_removes_its_upload_but_never_a_file_outside_the_uploads(
        db, tmp_path, django_capture_on_commit_callbacks):
    from search.import_jobs import run_import_job, start_import_job
    from search.models import Dataset

    dataset = Dataset.objects.create(name="jobs")
    ours, theirs = _upload("ours.zip"), _upload("theirs.zip", folder=tmp_path)
    first = start_import_job(dataset, ours, check=False)
    second = start_import_job(dataset, theirs, check=False)
    jobs.cancel(first), jobs.cancel(second)
    with django_capture_on_commit_callbacks(execute=True):
        Job.objects.filter(pk__in=[first.pk, second.pk]).delete()
    assert not ours.exists() and theirs.exists()

    # A queued import whose dataset went meanwhile fails and drops its upload.
    late = _upload("late.zip")
    job = start_import_job(dataset, late, check=False)
    with django_capture_on_commit_callbacks(execute=True):
        Dataset.objects.filter(pk=dataset.pk).delete()  # the signal removes it too; run once more to be sure
    late = _upload("late.zip")
    with django_capture_on_commit_callbacks(execute=True):
        assert run_import_job(job.pk) == "failed"
    assert not late.exists()
    assert Job.objects.get(pk=job.pk).error == "the job's dataset was deleted"


# --- a worker silent mid-job (the whole worker killed) ------------------------------

def test_the_job_page_says_so_when_the_worker_goes_silent(db, settings, admin_client):
    settings.CBIR_JOB_STALE_SECONDS = 120  # heartbeats every 30 s: silent after 62 s
    job = Job.objects.create(kind=Job.Kind.IMPORT, status=S.RUNNING, heartbeat=timezone.now())
    assert jobs.silence_warning(job) == ""
    _age(Job, job.pk, 61)
    assert jobs.silence_warning(Job.objects.get(pk=job.pk)) == ""
    _age(Job, job.pk, 70)
    status = admin_client.get(f"/jobs/{job.pk}/status").json()
    assert re.match(r"no sign of life from its worker for 7\d s", status["warning"]), status
    assert "CBIR_JOB_STALE_SECONDS" in status["warning"]
    page = admin_client.get(f"/jobs/{job.pk}/")
    assert "no sign of life from its worker" in page.content.decode()

    # A split job lives while any running chunk beats; ended jobs never warn.
    split = Job.objects.create(kind=Job.Kind.EMBED, status=S.RUNNING, heartbeat=timezone.now() - timedelta(hours=1))
    chunk = JobChunk.objects.create(job=split, index=0, image_ids=[], status=S.RUNNING, heartbeat=timezone.now())
    assert jobs.silence_warning(split) == ""
    _age(JobChunk, chunk.pk, 600)
    assert re.search(r"for 60\d s", jobs.silence_warning(split))
    Job.objects.filter(pk__in=[job.pk, split.pk]).update(status=S.FAILED)
    assert jobs.silence_warning(Job.objects.get(pk=split.pk)) == ""
