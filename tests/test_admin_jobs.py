"""Jobs started from the admin, run by a real worker."""

import io
import zipfile

import pytest
from django.urls import reverse

from search import hnsw
from search.indexing import build_index
from search.ingest import import_folder
from search.jobs import S
from search.models import Dataset, Embedding, Job
from tests.helpers import image_bytes, wait_for
from training.models import ModelVersion
from training.versions import get_or_create_version

pytestmark = [pytest.mark.worker, pytest.mark.timeout(180)]


def _done(job_id):
    return Job.objects.filter(pk=job_id, status__in=[S.SUCCEEDED, S.FAILED, S.CANCELLED]).first()


@pytest.fixture
def staff(live_worker, admin_client):
    return admin_client


@pytest.fixture
def small_set(live_worker, image_folder):
    dataset = Dataset.objects.create(name="small")
    import_folder(image_folder, dataset, labels_from_folders=True)
    return dataset


def test_build_index_action_starts_a_job_that_builds_the_index(staff, small_set, tiny_version):
    url = reverse("admin:search_dataset_changelist")
    form = staff.post(url, {"action": "build_index", "_selected_action": [small_set.pk]})
    assert form.status_code == 200 and tiny_version.name in form.content.decode()
    response = staff.post(url, {"action": "build_index", "_selected_action": [small_set.pk],
                                "model": f"version:{tiny_version.pk}", "apply": "1"})
    assert response.status_code == 302
    job = Job.objects.get(kind=Job.Kind.EMBED, dataset=small_set)
    assert response["Location"] == reverse("job-detail", args=[job.pk])
    assert job.created_by.username == "admin"
    job = wait_for(lambda: _done(job.pk), message="the index job")
    assert job.status == S.SUCCEEDED and hnsw.is_ready(tiny_version)
    assert Embedding.objects.filter(model_version=tiny_version).count() == 12
    # Links from the dataset and the version lead to their jobs.
    jobs_page = staff.get(reverse("admin:search_job_changelist") + f"?dataset__id__exact={small_set.pk}")
    assert jobs_page.status_code == 200 and f">{job.pk}<" in jobs_page.content.decode()
    assert staff.get(reverse("admin:search_job_change", args=[job.pk])).status_code == 200


def test_zip_upload_in_admin_runs_an_import_job(staff, small_set):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i in range(3):
            zf.writestr(f"dogs/{i}.png", image_bytes(pattern=900 + i))
        zf.writestr("notes.md", "# not an image")
    buffer.seek(0)
    buffer.name = "dogs.zip"
    url = reverse("admin:search_dataset_import_zip", args=[small_set.pk])
    assert staff.get(url).status_code == 200
    response = staff.post(url, {"archive": buffer, "labels_from_folders": "on", "apply": "1"})
    assert response.status_code == 302, response.content.decode()[:2000]
    job = Job.objects.get(kind=Job.Kind.IMPORT)
    job = wait_for(lambda: _done(job.pk), message="the import job")
    assert job.status == S.SUCCEEDED and job.result["imported"] == 3
    assert small_set.images.filter(label="dogs").count() == 3


def test_a_file_that_is_not_a_zip_is_refused_in_the_form(staff, small_set):
    bogus = io.BytesIO(b"not a zip at all")
    bogus.name = "x.zip"
    response = staff.post(reverse("admin:search_dataset_import_zip", args=[small_set.pk]),
                          {"archive": bogus, "apply": "1"})
    assert response.status_code == 200 and "not a zip file" in response.content.decode()
    assert not Job.objects.exists()


def test_activate_action_runs_an_activation_job_and_switches_when_complete(staff, small_set, tiny_version):
    build_index(small_set, tiny_version)
    assert ModelVersion.active() == tiny_version
    newer = get_or_create_version("tiny", random_weights=True, config={"dimension": 16, "size": 32, "seed": 3})
    response = staff.post(reverse("admin:training_modelversion_changelist"),
                          {"action": "activate", "_selected_action": [newer.pk]})
    assert response.status_code == 302
    job = Job.objects.get(kind=Job.Kind.EMBED, model_version=newer)
    assert job.params["activate"] is True
    job = wait_for(lambda: _done(job.pk), message="the activation job")
    assert job.status == S.SUCCEEDED, job.error
    assert ModelVersion.active() == newer and hnsw.is_ready(newer)
    assert Embedding.objects.filter(model_version=newer).count() == 12


def test_jobs_pages_are_for_staff_only(client, django_user_model, small_set):
    job = Job.objects.create(kind=Job.Kind.EMBED, dataset=small_set)
    for url in ("/jobs/", f"/jobs/{job.pk}/"):
        assert client.get(url).status_code == 302
    assert client.get(f"/jobs/{job.pk}/status").status_code == 403
    assert client.post(f"/jobs/{job.pk}/cancel").status_code == 302
    user = django_user_model.objects.create_user("someone", password="pw-12345-long")
    client.force_login(user)
    assert client.get("/jobs/").status_code == 302
    assert client.get(f"/jobs/{job.pk}/status").status_code == 403
    job.refresh_from_db()
    assert job.status == S.QUEUED


def test_jobs_page_lists_jobs_for_staff(staff, small_set):
    job = Job.objects.create(kind=Job.Kind.IMPORT, dataset=small_set, progress_total=10, progress_done=4)
    page = staff.get("/jobs/")
    assert page.status_code == 200 and f"/jobs/{job.pk}/" in page.content.decode()
    detail = staff.get(f"/jobs/{job.pk}/")
    assert detail.status_code == 200 and 'role="progressbar"' in detail.content.decode()
    assert staff.get(f"/jobs/{job.pk}/status").json()["percent"] == 40.0


def test_train_action_shows_a_form_and_creates_a_training_job(staff, small_set):
    url = reverse("admin:search_dataset_changelist")
    form = staff.post(url, {"action": "train_model", "_selected_action": [small_set.pk]})
    assert form.status_code == 200 and 'name="architecture"' in form.content.decode()
    response = staff.post(url, {
        "action": "train_model", "_selected_action": [small_set.pk], "apply": "1",
        "architecture": "tiny", "objective": "auto", "epochs": "1", "batch_size": "4", "learning_rate": "0.001",
        "image_size": "32", "scheduler": "none", "early_stopping_patience": "3",
    })
    assert response.status_code == 302, response.content.decode()[-3000:]
    job = Job.objects.get(kind=Job.Kind.TRAIN, dataset=small_set)
    assert job.params["architecture"] == "tiny" and job.params["epochs"] == 1
    assert response["Location"] == reverse("job-detail", args=[job.pk])
    job = wait_for(lambda: _done(job.pk), timeout=150, message="the training job")
    assert job.status == S.SUCCEEDED, (job.error, job.log[-5:])
    assert job.model_version is not None and hnsw.is_ready(job.model_version)
    assert len(job.result["history"]) == 1


def test_train_action_with_bad_settings_shows_the_error_and_creates_nothing(staff, small_set):
    url = reverse("admin:search_dataset_changelist")
    response = staff.post(url, {
        "action": "train_model", "_selected_action": [small_set.pk], "apply": "1",
        "architecture": "tiny", "objective": "auto", "epochs": "0", "batch_size": "4", "learning_rate": "0.001",
        "scheduler": "none", "early_stopping_patience": "3",
    })
    assert response.status_code == 200 and "errorlist" in response.content.decode()
    assert not Job.objects.filter(kind=Job.Kind.TRAIN).exists()
