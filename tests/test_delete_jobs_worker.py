"""Deleting while a job works on it, and the delete job itself, on a real
Celery worker against a real Redis (issue 11 item 7, issue 10 item 5).

The rule: a dataset, an image or a model version is not deleted while a
queued or running job works on it; the admin says which job ("cancel job #N
first") and deletes nothing. Once the job is cancelled it ends *cancelled*,
and the delete leaves no row without its files and no file without its row.
The worker is slowed down (CBIR_EMBED_THROTTLE_SECONDS) so the delete lands
mid-run."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from django.urls import reverse

from search import embed_jobs, import_jobs, jobs
from search.ingest import import_folder
from search.jobs import S
from search.models import Dataset, Embedding, Image, Job, JobChunk
from tests.helpers import image_bytes, wait_for

pytestmark = [pytest.mark.worker, pytest.mark.timeout(240)]

IMAGES = reverse("admin:search_image_changelist")


@pytest.fixture
def slow_worker(live_worker, session_worker, worker_env, tmp_path):
    """The only worker while the test runs: 0.3 s between batches, 2 images per
    embedding batch, 2 rows per delete batch."""
    from tests.workers import worker_in_place_of

    env = dict(worker_env, CBIR_EMBED_THROTTLE_SECONDS="0.3", CBIR_EMBED_BATCH_SIZE="2", CBIR_DELETE_BATCH_SIZE="2")
    with worker_in_place_of(session_worker, "slow", env, tmp_path / "slow.log") as worker:
        yield worker


@pytest.fixture
def forty(slow_worker, tmp_path):
    folder = tmp_path / "forty"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i}.png").write_bytes(image_bytes(pattern=3000 + i))
    dataset = Dataset.objects.create(name="forty")
    assert import_folder(folder, dataset).imported == 40
    return dataset


def _files_of(dataset_id: int, media: Path) -> set[Path]:
    return {p for folder in ("datasets", "thumbnails") for p in (media / folder / str(dataset_id)).rglob("*")
            if p.is_file()}


def _messages(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def _assert_rows_and_files_agree(media: Path, *datasets: Dataset) -> None:
    """For these datasets (the media folder is shared with other tests): every
    image row has both files; every stored file belongs to a row."""
    names = set()
    for file, thumbnail in Image.objects.filter(dataset_id__in=[d.pk for d in datasets]).values_list(
            "file", "thumbnail"):
        assert (media / file).is_file() and (media / thumbnail).is_file()
        names.update((file, thumbnail))
    stored = {str(p.relative_to(media)) for d in datasets for p in _files_of(d.pk, media)}
    assert stored <= names, stored - names


def test_deleting_a_dataset_during_its_import(slow_worker, admin_client, shared_media, tmp_path):
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(30):
            zf.writestr(f"{i}.png", image_bytes(pattern=7000 + i))
    dataset = Dataset.objects.create(name="importing")
    job = import_jobs.start_import_job(dataset, str(archive), original_name="upload.zip")
    wait_for(lambda: Job.objects.filter(pk=job.pk, status=S.RUNNING, progress_done__gte=2).exists(),
             message="the import to be under way")
    delete_url = reverse("admin:search_dataset_delete", args=[dataset.pk])

    refused = admin_client.post(delete_url, {"post": "yes"}, follow=True)
    assert refused.status_code == 200
    assert any(f"cancel job #{job.pk} first" in m for m in _messages(refused)), _messages(refused)
    assert Dataset.objects.filter(pk=dataset.pk).exists()

    assert admin_client.post(reverse("job-cancel", args=[job.pk])).status_code == 302
    deleted = admin_client.post(delete_url, {"post": "yes"}, follow=True)  # at once: the worker may be mid-file
    assert deleted.status_code == 200 and not Dataset.objects.filter(pk=dataset.pk).exists()
    wait_for(lambda: not _files_of(dataset.pk, shared_media), timeout=30, message="the worker to stop writing")
    job.refresh_from_db()
    assert job.status == S.CANCELLED, (job.status, job.log)
    assert not Image.objects.filter(dataset_id=dataset.pk).exists()
    _assert_rows_and_files_agree(shared_media, dataset)


def test_deleting_during_an_embedding_job(forty, tiny_version, admin_client, shared_media):
    job = embed_jobs.start_embed_job(tiny_version, forty, chunk_size=10)
    wait_for(lambda: JobChunk.objects.filter(job=job, status=S.RUNNING, done__gt=0).exists(),
             message="a chunk to be under way")
    for url in (reverse("admin:search_dataset_delete", args=[forty.pk]),
                reverse("admin:training_modelversion_delete", args=[tiny_version.pk])):
        response = admin_client.post(url, {"post": "yes"}, follow=True)
        assert response.status_code == 200
        assert any(f"cancel job #{job.pk} first" in m for m in _messages(response)), (url, _messages(response))
    ids = list(forty.images.values_list("pk", flat=True)[:3])
    response = admin_client.post(IMAGES, {"action": "delete_selected", "_selected_action": ids, "post": "yes"},
                                 follow=True)
    assert any(f"cancel job #{job.pk} first" in m for m in _messages(response))
    assert forty.images.count() == 40

    assert admin_client.post(reverse("job-cancel", args=[job.pk])).status_code == 302
    response = admin_client.post(reverse("admin:search_dataset_delete", args=[forty.pk]), {"post": "yes"})
    assert response.status_code == 302 and not Dataset.objects.filter(pk=forty.pk).exists()
    wait_for(lambda: not JobChunk.objects.filter(job=job, status=S.RUNNING).exists(), timeout=30,
             message="the chunks to stop")
    job.refresh_from_db()
    assert job.status == S.CANCELLED and "unreadable" not in job.message, (job.message, job.log)
    assert not Embedding.objects.filter(image__dataset_id=forty.pk).exists()
    _assert_rows_and_files_agree(shared_media, forty)


def test_a_large_delete_runs_as_a_job_search_answers_meanwhile_and_cancel_keeps_whole_rows(
        forty, tiny_version, admin_client, shared_media, settings, tmp_path):
    from search.indexing import build_index

    settings.CBIR_DELETE_IN_REQUEST_MAX = 5
    other = Dataset.objects.create(name="other")
    (tmp_path / "o").mkdir()
    for i in range(3):
        (tmp_path / "o" / f"{i}.png").write_bytes(image_bytes(pattern=9000 + i))
    import_folder(tmp_path / "o", other)
    build_index(other, tiny_version)  # the active version: search works
    probe = other.images.first()

    response = admin_client.post(reverse("admin:search_dataset_delete", args=[forty.pk]), {"post": "yes"})
    job = Job.objects.get(kind="delete")
    assert response.status_code == 302 and response.url == reverse("job-detail", args=[job.pk])
    wait_for(lambda: Job.objects.filter(pk=job.pk, status=S.RUNNING, progress_done__gte=4).exists(),
             message="the delete job to be under way")
    # Search keeps answering, and no job starts on the dataset being deleted.
    similar = admin_client.get(reverse("api-similar", args=[probe.pk]), {"k": 3})
    assert similar.status_code == 200 and similar.json()["results"]
    with pytest.raises(jobs.JobError, match=f"cancel job #{job.pk} first"):
        embed_jobs.start_embed_job(tiny_version, forty)

    assert admin_client.post(reverse("job-cancel", args=[job.pk])).status_code == 302
    wait_for(lambda: any("cancelled after deleting" in line["msg"] for line in Job.objects.get(pk=job.pk).log),
             timeout=30, message="the delete job to stop")
    job.refresh_from_db()
    left = forty.images.count()
    assert job.status == S.CANCELLED and 0 < left < 40
    assert f"cancelled after deleting {40 - left} of 40 image(s)" in job.message, job.message
    _assert_rows_and_files_agree(shared_media, forty, other)

    assert admin_client.post(reverse("job-rerun", args=[job.pk])).status_code == 302
    job = wait_for(lambda: Job.objects.filter(pk=job.pk, status=S.SUCCEEDED).first(), timeout=60,
                   message="the delete job to finish after Run again")
    assert not Dataset.objects.filter(pk=forty.pk).exists() and not _files_of(forty.pk, shared_media)
    assert other.images.count() == 3
    _assert_rows_and_files_agree(shared_media, forty, other)
