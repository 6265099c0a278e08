"""Deletes at scale (search/deletion.py, search/delete_jobs.py): a constant
number of queries per batch whatever the number of images, files removed after
commit only when no row references them, batches each complete or untouched,
and the one rule while jobs run: refuse, naming the job. Worker-driven
variants are in tests/test_delete_jobs_worker.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from search import delete_jobs, jobs
from search.deletion import DeleteRefused, delete_images, delete_now, delete_versions, release_files
from search.ingest import add_image
from search.jobs import S
from search.models import Dataset, Embedding, Image, Job
from tests.helpers import image_bytes

DATASETS = reverse("admin:search_dataset_changelist")
IMAGES = reverse("admin:search_image_changelist")


def _fill(name: str, n: int, start: int = 0) -> Dataset:
    dataset = Dataset.objects.create(name=name)
    for i in range(n):
        add_image(dataset, image_bytes(pattern=start + i), f"{i}.png", "x")
    return dataset


def _on_disk(settings, name: str) -> bool:
    return (Path(settings.MEDIA_ROOT) / name).is_file()


def _names(images) -> list[str]:
    return [n for image in images for n in (image.file.name, image.thumbnail.name)]


def _queries_to_delete(n: int, offset: int, django_capture_on_commit_callbacks) -> int:
    dataset = _fill(f"q{n}", n, start=offset)
    with CaptureQueriesContext(connection) as queries, django_capture_on_commit_callbacks(execute=True):
        assert delete_images(dataset, batch_size=1000) == n
    return len(queries)


def test_deleting_costs_the_same_queries_for_5_or_25_images(db, django_capture_on_commit_callbacks):
    """Set-based: no query per image (the old post_delete handler made two
    sequential scans per image)."""
    small = _queries_to_delete(5, 0, django_capture_on_commit_callbacks)
    large = _queries_to_delete(25, 100, django_capture_on_commit_callbacks)
    assert small == large, (small, large)


def test_files_go_after_commit_and_only_when_no_row_references_them(db, settings, django_capture_on_commit_callbacks):
    dataset = _fill("a", 4)
    images = list(dataset.images.order_by("pk"))
    # Another row that shares the first image's file (same bytes referenced twice).
    other = Dataset.objects.create(name="b")
    Image.objects.create(dataset=other, file=images[0].file.name, thumbnail=images[0].thumbnail.name, sha256="0" * 64,
                         split="train", width=1, height=1, original_filename="shared.png")
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        delete_images([im.pk for im in images[:3]])
        assert all(_on_disk(settings, n) for n in _names(images))  # nothing before the commit
    for callback in callbacks:
        callback()
    assert _on_disk(settings, images[0].file.name) and _on_disk(settings, images[0].thumbnail.name)  # still referenced
    assert not any(_on_disk(settings, n) for n in _names(images[1:3]))
    assert all(_on_disk(settings, n) for n in _names(images[3:]))


def test_a_rolled_back_delete_removes_no_file(db, settings, django_capture_on_commit_callbacks):
    dataset = _fill("a", 3)
    first, second, _ = dataset.images.order_by("pk")
    first_pk = first.pk
    with django_capture_on_commit_callbacks(execute=True):
        with pytest.raises(RuntimeError):
            with transaction.atomic():
                Image.objects.filter(pk=first_pk).delete()
                raise RuntimeError("rolled back")
        second.delete()
    assert Image.objects.filter(pk=first_pk).exists()
    assert all(_on_disk(settings, n) for n in _names([first]))
    assert not any(_on_disk(settings, n) for n in _names([second]))


def test_release_files_keeps_referenced_names_and_ignores_missing_ones(db, settings):
    dataset = _fill("a", 1)
    image = dataset.images.get()
    stray = Path(settings.MEDIA_ROOT) / "datasets" / "stray.png"
    stray.write_bytes(b"x")
    assert release_files([image.file.name, "datasets/stray.png", "no/such/file.png", ""]) == 1
    assert _on_disk(settings, image.file.name) and not stray.exists()


def test_a_stopped_delete_leaves_whole_batches(db, settings, django_capture_on_commit_callbacks, tiny_version):
    dataset = _fill("a", 10)
    Embedding.objects.bulk_create([Embedding(image=image, dataset=dataset, model_version=tiny_version,
                                             vector=[1.0] + [0.0] * 31) for image in dataset.images.all()])
    ids = list(dataset.images.order_by("pk").values_list("pk", flat=True))
    batches = []

    def stop() -> bool:
        return len(batches) >= 2

    with django_capture_on_commit_callbacks(execute=True):
        done = delete_images(dataset, batch_size=3, progress=lambda d, t: batches.append((d, t)), should_stop=stop)
    assert done == 6 and batches == [(3, 10), (6, 10)]
    assert list(dataset.images.order_by("pk").values_list("pk", flat=True)) == ids[6:]
    assert Embedding.objects.filter(image__dataset=dataset).count() == 4
    assert all(_on_disk(settings, n) for n in _names(dataset.images.all()))


# --- The rule while jobs run: refuse, naming the job ----------------------------------

def _running(kind: str, **fields) -> Job:
    return Job.objects.create(kind=kind, status=S.RUNNING, **fields)


def test_a_dataset_or_its_images_are_not_deleted_while_a_job_works_on_it(db):
    dataset = _fill("busy", 3)
    job = _running("import", dataset=dataset)
    with pytest.raises(DeleteRefused, match=f"cancel job #{job.pk} first"):
        delete_now(dataset=dataset)
    with pytest.raises(DeleteRefused, match=f"job #{job.pk} \\(import, running\\)"):
        delete_now(image_ids=list(dataset.images.values_list("pk", flat=True)[:1]))
    assert dataset.images.count() == 3
    jobs.cancel(job)
    assert delete_now(dataset=dataset) == 3 and not Dataset.objects.filter(pk=dataset.pk).exists()


def test_a_model_version_is_not_deleted_while_a_job_works_on_it(db, tiny_version, settings):
    from training.versions import get_or_create_version

    other = get_or_create_version("tiny", random_weights=True, config={"dimension": 32, "size": 32})
    job = _running("embed", model_version=other)
    with pytest.raises(DeleteRefused, match=f"cancel job #{job.pk} first"):
        delete_versions([other])
    tiny_version.activate()
    with pytest.raises(DeleteRefused, match="active one"):
        delete_versions([tiny_version])
    other.refresh_from_db()  # still there


def test_no_job_starts_on_a_dataset_being_deleted_and_a_delete_waits_for_jobs(db):
    dataset = _fill("d", 2)
    deleting = _running("delete", dataset=dataset)
    with pytest.raises(jobs.JobError, match=f"cancel job #{deleting.pk} first"):
        jobs.create("import", dataset=dataset, log="queued")
    jobs.cancel(deleting)
    importing = jobs.create("import", dataset=dataset, log="queued")
    with pytest.raises(jobs.JobError, match=f"cancel job #{importing.pk} first"):
        delete_jobs.start_delete_job(dataset=dataset, check=False)
    assert not Job.objects.filter(kind="delete", status__in=jobs.ACTIVE).exists()


def test_the_delete_job_body_deletes_in_batches_with_progress(transactional_db, settings):
    settings.CBIR_DELETE_BATCH_SIZE = 4
    dataset = _fill("big", 10)
    kept = _fill("kept", 1, start=50)
    names = _names(dataset.images.all())
    job = Job.objects.create(kind="delete", dataset=dataset, params={"dataset_id": dataset.pk,
                                                                     "dataset_name": dataset.name, "total": 10})
    assert delete_jobs.run_delete_job(job.pk) == "done"
    job.refresh_from_db()
    assert job.status == S.SUCCEEDED, (job.error, job.log)
    assert job.result["deleted"] == 10 and (job.progress_done, job.progress_total) == (10, 10)
    assert job.message == "deleted 10 image(s) and dataset big"
    assert not Dataset.objects.filter(pk=dataset.pk).exists()
    assert not any(_on_disk(settings, n) for n in names)
    assert all(_on_disk(settings, n) for n in _names(kept.images.all()))


# --- Admin ------------------------------------------------------------------------------

def test_the_admin_refuses_with_the_job_named_and_deletes_nothing(admin_client, db, tiny_version):
    from training.versions import get_or_create_version

    dataset = _fill("busy", 3)
    job = _running("embed", dataset=dataset, model_version=tiny_version)
    url = reverse("admin:search_dataset_delete", args=[dataset.pk])
    response = admin_client.post(url, {"post": "yes"}, follow=True)
    assert response.status_code == 200
    assert any(f"cancel job #{job.pk} first" in str(m) for m in response.context["messages"])
    ids = list(dataset.images.values_list("pk", flat=True))
    response = admin_client.post(IMAGES, {"action": "delete_selected", "_selected_action": ids, "post": "yes"},
                                 follow=True)
    assert response.status_code == 200
    assert any(f"cancel job #{job.pk} first" in str(m) for m in response.context["messages"])
    assert not any("Deleted" in str(m) for m in response.context["messages"])
    version = get_or_create_version("tiny", random_weights=True, config={"dimension": 32, "size": 32})
    Job.objects.filter(pk=job.pk).update(model_version=version)
    response = admin_client.post(reverse("admin:training_modelversion_delete", args=[version.pk]), {"post": "yes"},
                                 follow=True)
    assert any(f"cancel job #{job.pk} first" in str(m) for m in response.context["messages"])
    assert dataset.images.count() == 3 and Dataset.objects.filter(pk=dataset.pk).exists()
    version.refresh_from_db()


def test_the_confirmation_of_a_large_delete_shows_counts_not_every_row(admin_client, db, settings):
    dataset = _fill("big", 101)
    page = admin_client.get(reverse("admin:search_dataset_delete", args=[dataset.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert "101 images" in html and "0.png" not in html


def test_the_confirmation_pages_state_the_rule_and_name_a_busy_job(admin_client, db):
    dataset = _fill("busy", 2)
    page = admin_client.get(reverse("admin:search_dataset_delete", args=[dataset.pk]))
    assert page.status_code == 200 and 'id="delete-rule"' in page.content.decode()
    assert "cannot be deleted now" not in page.content.decode()
    job = _running("import", dataset=dataset)
    html = admin_client.get(reverse("admin:search_dataset_delete", args=[dataset.pk])).content.decode()
    assert "cannot be deleted now" in html and f"job #{job.pk}</a> (import, running)" in html
    ids = list(dataset.images.values_list("pk", flat=True))
    bulk = admin_client.post(IMAGES, {"action": "delete_selected", "_selected_action": ids, "index": "0"})
    assert bulk.status_code == 200 and 'id="delete-rule"' in bulk.content.decode()


def test_a_large_bulk_image_delete_is_a_job_and_says_so_when_no_worker_runs(admin_client, db, settings,
                                                                            django_capture_on_commit_callbacks):
    settings.CBIR_DELETE_IN_REQUEST_MAX = 2
    settings.CELERY_BROKER_URL = "redis+socket:///nonexistent/redis.sock"
    settings.CBIR_WORKER_PING_TIMEOUT = 0.2
    dataset = _fill("many", 6)
    images = list(dataset.images.order_by("pk"))
    chosen = [im.pk for im in images[:5]]
    response = admin_client.post(IMAGES, {"action": "delete_selected", "_selected_action": chosen, "post": "yes"},
                                 follow=True)
    assert response.status_code == 200
    assert any(str(m).startswith("Nothing was deleted:") for m in response.context["messages"])
    assert dataset.images.count() == 6 and not Job.objects.exists()

    job = delete_jobs.start_delete_job(image_ids=chosen, check=False)
    assert job.kind == "delete" and job.params["total"] == 5 and job.dataset is None
    with django_capture_on_commit_callbacks(execute=True):
        assert delete_jobs.run_delete_job(job.pk) == "done"
    job.refresh_from_db()
    assert job.status == S.SUCCEEDED and job.message == "deleted 5 image(s)"
    assert list(dataset.images.values_list("pk", flat=True)) == [images[5].pk]
