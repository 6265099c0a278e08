"""The admin, through real HTTP requests: dataset counts and coverage, image
curation (thumbnails, filters, search, label editing, bulk label/split/delete,
adding through the importer's checks) and model versions whose vector-defining
fields cannot change."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from search import hnsw
from search.indexing import build_index
from search.ingest import add_image
from search.models import Dataset, Embedding, Image, Split
from training.models import ModelVersion
from training.versions import get_or_create_version

DATASETS = reverse("admin:search_dataset_changelist")
IMAGES = reverse("admin:search_image_changelist")
IMAGE_ADD = reverse("admin:search_image_add")
VERSIONS = reverse("admin:training_modelversion_changelist")


def _change(model: str, pk: int) -> str:
    app = "training" if model == "modelversion" else "search"
    return reverse(f"admin:{app}_{model}_change", args=[pk])


def _delete(model: str, pk: int) -> str:
    app = "training" if model == "modelversion" else "search"
    return reverse(f"admin:{app}_{model}_delete", args=[pk])


def _files_under(root) -> set[Path]:
    return {p for p in Path(root).rglob("*") if p.is_file()}


def _on_disk(settings, name: str) -> bool:
    return (Path(settings.MEDIA_ROOT) / name).is_file()


def _result_ids(response) -> list[int]:
    return [obj.pk for obj in response.context["cl"].result_list]


def _messages(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def _run_action(admin_client, url: str, action: str, ids, **extra):
    """Choose an action in the changelist's action bar and press Go."""
    return admin_client.post(url, {"action": action, "_selected_action": [str(i) for i in ids], "index": "0", **extra})


@pytest.fixture
def second_version(indexed):
    """Another tiny version, fully embedded and indexed, but not active."""
    version = get_or_create_version("tiny", random_weights=True, config={"dimension": 32, "size": 32})
    build_index(indexed, version)
    version.refresh_from_db()
    assert not version.is_active
    return version


@pytest.fixture
def other_dataset(db, make_image_bytes):
    dataset = Dataset.objects.create(name="other-set")
    add_image(dataset, make_image_bytes((10, 200, 10), pattern=4242), "green.png", "green")
    return dataset


# --- Access -------------------------------------------------------------------

ADMIN_URLS = ["/admin/", DATASETS, IMAGES, IMAGE_ADD, VERSIONS]


@pytest.mark.parametrize("url", ADMIN_URLS)
def test_anonymous_users_are_sent_to_the_login_page(client, db, url):
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


@pytest.mark.parametrize("url", ADMIN_URLS)
def test_non_staff_users_are_sent_to_the_login_page(client, django_user_model, url):
    client.force_login(django_user_model.objects.create_user("visitor", password="a-long-password-1"))
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


def test_anonymous_post_changes_nothing(client, indexed):
    image = Image.objects.filter(label="red").first()
    response = client.post(IMAGES, {"action": "delete_selected", "_selected_action": [image.pk], "post": "yes"})
    assert response.status_code == 302 and Image.objects.filter(pk=image.pk).exists()


# --- Pages render -------------------------------------------------------------

def test_every_page_renders_with_data(admin_client, indexed, tiny_version, second_version):
    image = Image.objects.filter(dataset=indexed).first()
    urls = [
        DATASETS, _change("dataset", indexed.pk), reverse("admin:search_dataset_add"),
        IMAGES, _change("image", image.pk), IMAGE_ADD,
        VERSIONS, _change("modelversion", tiny_version.pk), _change("modelversion", second_version.pk),
        _delete("image", image.pk), _delete("modelversion", second_version.pk),
    ]
    for url in urls:
        assert admin_client.get(url).status_code == 200, url


def test_pages_render_with_no_data(admin_client, db):
    empty = Dataset.objects.create(name="empty")
    for url in (DATASETS, _change("dataset", empty.pk), IMAGES, VERSIONS):
        assert admin_client.get(url).status_code == 200, url


# --- Dataset: counts and coverage ---------------------------------------------

def test_dataset_list_shows_counts_per_split_labels_and_coverage(admin_client, indexed, tiny_version, other_dataset):
    images = Image.objects.filter(dataset=indexed)
    per_split = {split: images.filter(split=split).count() for split in Split.values}
    assert images.count() == 12 and sum(per_split.values()) == 12

    html = admin_client.get(DATASETS).content.decode()

    assert '<td class="field-n_images">12</td>' in html
    for split, n in per_split.items():
        assert f'<td class="field-n_{split}">{n}</td>' in html
    assert '<td class="field-n_labels">2</td>' in html  # red, blue
    assert f"{tiny_version.name} ★: 12/12" in html
    # The other dataset has one image and nothing embedded.
    assert '<td class="field-n_images">1</td>' in html
    assert '<td class="field-coverage_summary">—</td>' in html


def test_dataset_page_shows_split_label_and_coverage_tables(admin_client, indexed, tiny_version):
    images = Image.objects.filter(dataset=indexed)
    unindexed = get_or_create_version("tiny", random_weights=True, config={"dimension": 32, "size": 32})
    Image.objects.filter(pk=images.filter(label="blue").first().pk).update(label=None)

    html = admin_client.get(_change("dataset", indexed.pk)).content.decode()

    for split in Split.values:
        assert f"<tr><td>{split}</td><td>{images.filter(split=split).count()}</td></tr>" in html
    red = images.filter(label="red")
    assert (f"<tr><td>red</td><td>6</td><td>{red.filter(split='train').count()}</td>"
            f"<td>{red.filter(split='val').count()}</td><td>{red.filter(split='test').count()}</td></tr>") in html
    assert "<tr><td>blue</td><td>5</td>" in html and "<tr><td>(none)</td><td>1</td>" in html
    assert f"<tr><td>{tiny_version.name} (active)</td><td>12 / 12</td><td>ready</td></tr>" in html
    assert f"<tr><td>{unindexed.name}</td><td>0 / 12</td><td>no index</td></tr>" in html


def test_dataset_coverage_counts_only_that_datasets_images(admin_client, indexed, tiny_version, other_dataset):
    build_index(other_dataset, tiny_version)
    html = admin_client.get(_change("dataset", other_dataset.pk)).content.decode()
    assert f"<tr><td>{tiny_version.name} (active)</td><td>1 / 1</td><td>ready</td></tr>" in html


# --- Image list: thumbnails, filters, search -----------------------------------

def test_image_list_shows_a_thumbnail_per_image(admin_client, indexed):
    response = admin_client.get(IMAGES)
    html = response.content.decode()
    images = list(Image.objects.filter(dataset=indexed))
    assert sorted(_result_ids(response)) == sorted(i.pk for i in images)
    for image in images:
        assert f'<img src="{image.thumbnail.url}"' in html


@pytest.mark.parametrize("query, expected", [
    ({"label": "red"}, lambda qs: qs.filter(label="red")),
    ({"label": "blue"}, lambda qs: qs.filter(label="blue")),
    ({"split": "val"}, lambda qs: qs.filter(split="val")),
    ({"split": "train", "label": "blue"}, lambda qs: qs.filter(split="train", label="blue")),
])
def test_image_filters_select_the_matching_rows(admin_client, indexed, other_dataset, query, expected):
    response = admin_client.get(IMAGES, query)
    assert response.status_code == 200
    want = sorted(expected(Image.objects.all()).values_list("pk", flat=True))
    assert want and sorted(_result_ids(response)) == want


def test_image_filter_by_dataset(admin_client, indexed, other_dataset):
    response = admin_client.get(IMAGES, {"dataset__id__exact": other_dataset.pk})
    assert _result_ids(response) == list(other_dataset.images.values_list("pk", flat=True))
    html = admin_client.get(IMAGES).content.decode()
    assert "other-set" in html and "test-set" in html  # both offered in the filter


def test_image_filter_for_unlabelled_images(admin_client, indexed):
    image = Image.objects.filter(label="red").first()
    Image.objects.filter(pk=image.pk).update(label=None)
    response = admin_client.get(IMAGES, {"label": "__none__"})
    assert _result_ids(response) == [image.pk]
    assert "(no label)" in response.content.decode()


def test_image_search_by_file_name(admin_client, indexed):
    response = admin_client.get(IMAGES, {"q": "red-3"})
    assert _result_ids(response) == [Image.objects.get(original_filename="red/red-3.png").pk]
    response = admin_client.get(IMAGES, {"q": "BLUE/"})
    assert sorted(_result_ids(response)) == sorted(Image.objects.filter(label="blue").values_list("pk", flat=True))


# --- Image list: editing labels -------------------------------------------------

def _list_editable_post(response, changes: dict[int, str]) -> dict:
    """The changelist formset as the browser would submit it, with some labels changed."""
    objects = response.context["cl"].result_list
    data = {"form-TOTAL_FORMS": str(len(objects)), "form-INITIAL_FORMS": str(len(objects)),
            "form-MIN_NUM_FORMS": "0", "form-MAX_NUM_FORMS": "1000", "_save": "Save"}
    for i, obj in enumerate(objects):
        data[f"form-{i}-id"] = str(obj.pk)
        data[f"form-{i}-label"] = changes.get(obj.pk, obj.label or "")
    return data


def test_label_is_editable_in_the_list(admin_client, indexed):
    red, blue = Image.objects.filter(label="red").first(), Image.objects.filter(label="blue").first()
    others = dict(Image.objects.exclude(pk__in=[red.pk, blue.pk]).values_list("pk", "label"))

    page = admin_client.get(IMAGES)
    assert 'name="form-0-label"' in page.content.decode()
    response = admin_client.post(IMAGES, _list_editable_post(page, {red.pk: "crimson", blue.pk: ""}))

    assert response.status_code == 302
    red.refresh_from_db(), blue.refresh_from_db()
    assert red.label == "crimson"
    assert blue.label is None  # an emptied label is "no label", not ""
    assert dict(Image.objects.exclude(pk__in=[red.pk, blue.pk]).values_list("pk", "label")) == others


# --- Image list: bulk actions ---------------------------------------------------

def test_set_label_action_asks_for_the_label_then_sets_it(admin_client, indexed):
    chosen = list(Image.objects.filter(label="red").values_list("pk", flat=True)[:3])

    form = _run_action(admin_client, IMAGES, "set_label", chosen)
    html = form.content.decode()
    assert form.status_code == 200 and "3 image(s) selected" in html and 'name="apply"' in html
    for pk in chosen:
        assert f'name="_selected_action" value="{pk}"' in html
    assert Image.objects.filter(pk__in=chosen, label="red").count() == 3  # nothing changed yet

    response = admin_client.post(IMAGES, {"action": "set_label", "_selected_action": chosen,
                                          "label": "  scarlet ", "apply": "Apply"}, follow=True)
    assert response.status_code == 200
    assert any("3 image(s)" in m for m in _messages(response))
    assert set(Image.objects.filter(label="scarlet").values_list("pk", flat=True)) == set(chosen)
    assert Image.objects.filter(label="red").count() == 3


def test_set_label_action_with_an_empty_label_clears_it(admin_client, indexed):
    chosen = list(Image.objects.filter(label="blue").values_list("pk", flat=True)[:2])
    admin_client.post(IMAGES, {"action": "set_label", "_selected_action": chosen, "label": "", "apply": "Apply"})
    assert list(Image.objects.filter(pk__in=chosen).values_list("label", flat=True)) == [None, None]


def test_set_split_action_asks_for_the_split_then_sets_it(admin_client, indexed):
    chosen = list(Image.objects.exclude(split=Split.TEST).values_list("pk", flat=True)[:4])
    untouched = dict(Image.objects.exclude(pk__in=chosen).values_list("pk", "split"))

    form = _run_action(admin_client, IMAGES, "set_split", chosen)
    assert form.status_code == 200 and 'name="split"' in form.content.decode()

    response = admin_client.post(IMAGES, {"action": "set_split", "_selected_action": chosen, "split": "test",
                                          "apply": "Apply"})
    assert response.status_code == 302
    assert set(Image.objects.filter(pk__in=chosen).values_list("split", flat=True)) == {"test"}
    assert dict(Image.objects.exclude(pk__in=chosen).values_list("pk", "split")) == untouched


def test_set_split_action_refuses_an_unknown_split(admin_client, indexed):
    chosen = list(Image.objects.values_list("pk", flat=True)[:2])
    before = dict(Image.objects.values_list("pk", "split"))
    response = admin_client.post(IMAGES, {"action": "set_split", "_selected_action": chosen, "split": "holdout",
                                          "apply": "Apply"})
    assert response.status_code == 200 and "Select a valid choice" in response.content.decode()
    assert dict(Image.objects.values_list("pk", "split")) == before


def test_bulk_delete_removes_rows_embeddings_and_files(admin_client, indexed, settings,
                                                       django_capture_on_commit_callbacks):
    doomed = list(Image.objects.filter(label="red"))
    kept = list(Image.objects.filter(label="blue"))
    ids = [i.pk for i in doomed]
    assert Embedding.objects.filter(image_id__in=ids).count() == len(doomed)

    confirm = _run_action(admin_client, IMAGES, "delete_selected", ids)
    assert confirm.status_code == 200 and "Are you sure" in confirm.content.decode()
    assert Image.objects.filter(pk__in=ids).count() == len(doomed)

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(IMAGES, {"action": "delete_selected", "_selected_action": ids, "post": "yes"})

    assert response.status_code == 302
    assert not Image.objects.filter(pk__in=ids).exists()
    assert not Embedding.objects.filter(image_id__in=ids).exists()
    for image in doomed:
        assert not _on_disk(settings, image.file.name) and not _on_disk(settings, image.thumbnail.name)
    for image in kept:
        assert _on_disk(settings, image.file.name) and _on_disk(settings, image.thumbnail.name)
    assert Embedding.objects.filter(image__in=kept).count() == len(kept)


def test_deleting_one_image_removes_its_files(admin_client, indexed, settings, django_capture_on_commit_callbacks):
    image = Image.objects.first()
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(_delete("image", image.pk), {"post": "yes"})
    assert response.status_code == 302 and not Image.objects.filter(pk=image.pk).exists()
    assert not _on_disk(settings, image.file.name) and not _on_disk(settings, image.thumbnail.name)
    assert not Embedding.objects.filter(image_id=image.pk).exists()


def test_deleting_a_dataset_removes_its_images_files(admin_client, indexed, other_dataset, settings,
                                                     django_capture_on_commit_callbacks):
    names = [n for i in indexed.images.all() for n in (i.file.name, i.thumbnail.name)]
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(_delete("dataset", indexed.pk), {"post": "yes"})
    assert response.status_code == 302 and not Image.objects.filter(dataset_id=indexed.pk).exists()
    assert not any(_on_disk(settings, n) for n in names)
    assert _on_disk(settings, other_dataset.images.get().file.name)


# --- Image: change page -----------------------------------------------------------

def test_image_page_edits_the_label_only(admin_client, indexed, other_dataset):
    image = Image.objects.filter(dataset=indexed).first()
    before = Image.objects.filter(pk=image.pk).values().get()
    page = admin_client.get(_change("image", image.pk))
    assert set(page.context["adminform"].form.fields) == {"label"}
    assert image.thumbnail.url in page.content.decode()

    response = admin_client.post(_change("image", image.pk), {
        "label": "relabelled", "split": "test", "dataset": other_dataset.pk, "sha256": "0" * 64, "width": 1,
    })
    assert response.status_code == 302
    after = Image.objects.filter(pk=image.pk).values().get()
    assert after.pop("label") == "relabelled"
    before.pop("label")
    assert after == before


# --- Image: adding through the importer's checks --------------------------------

def test_adding_an_image_stores_file_and_thumbnail(admin_client, dataset, settings, make_image_bytes):
    page = admin_client.get(IMAGE_ADD)
    assert 'enctype="multipart/form-data"' in page.content.decode()
    upload = SimpleUploadedFile("Green Leaf.PNG", make_image_bytes((10, 220, 10), size=(40, 30), pattern=7),
                                content_type="image/png")

    response = admin_client.post(IMAGE_ADD, {"dataset": dataset.pk, "label": "green", "upload": upload})

    assert response.status_code == 302
    image = Image.objects.get()
    assert response["Location"] in (IMAGES, _change("image", image.pk))
    assert (image.dataset, image.label, image.original_filename) == (dataset, "green", "Green Leaf.PNG")
    assert (image.width, image.height) == (40, 30) and image.split in Split.values and len(image.sha256) == 64
    assert _on_disk(settings, image.file.name) and _on_disk(settings, image.thumbnail.name)
    assert image.file.name.endswith(".png") and image.thumbnail.name.endswith(".jpg")
    assert admin_client.get(_change("image", image.pk)).status_code == 200


def _bad_upload(kind: str, make_image_bytes) -> tuple[bytes, str, str]:
    """(bytes, file name, expected words in the error)"""
    if kind == "text":
        return b"hello, I am text", "photo.jpg", "not a supported image"
    if kind == "truncated":
        data = make_image_bytes(size=(64, 64), fmt="PNG", pattern=3)
        return data[: len(data) // 2], "cut.png", "truncated"
    if kind == "empty":
        return b"", "empty.png", "empty"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["text", "truncated", "empty"])
def test_adding_a_bad_file_is_a_form_error_and_stores_nothing(admin_client, dataset, settings, make_image_bytes, kind):
    data, name, words = _bad_upload(kind, make_image_bytes)
    files_before = _files_under(settings.MEDIA_ROOT)

    response = admin_client.post(IMAGE_ADD, {"dataset": dataset.pk, "upload": SimpleUploadedFile(name, data)})

    assert response.status_code == 200
    assert words in response.content.decode()
    assert response.context["adminform"].form.errors
    assert not Image.objects.exists()
    assert _files_under(settings.MEDIA_ROOT) == files_before


def test_adding_an_oversized_file_is_a_form_error(admin_client, dataset, settings, make_image_bytes):
    settings.CBIR_MAX_IMPORT_FILE_BYTES = 1024
    data = make_image_bytes(size=(64, 64), pattern=8)
    assert len(data) > 1024
    response = admin_client.post(IMAGE_ADD, {"dataset": dataset.pk, "upload": SimpleUploadedFile("big.png", data)})
    assert response.status_code == 200 and "larger than the limit" in response.content.decode()
    assert not Image.objects.exists()


def test_adding_a_duplicate_is_a_form_error(admin_client, indexed, settings, image_folder):
    data = (image_folder / "red" / "red-0.png").read_bytes()
    existing = Image.objects.get(sha256=hashlib.sha256(data).hexdigest())
    rows_before, files_before = Image.objects.count(), _files_under(settings.MEDIA_ROOT)

    response = admin_client.post(IMAGE_ADD, {"dataset": indexed.pk, "label": "other",
                                             "upload": SimpleUploadedFile("again.png", data)})

    assert response.status_code == 200
    html = response.content.decode()
    assert "already in" in html and f"#{existing.pk}" in html
    assert Image.objects.count() == rows_before and _files_under(settings.MEDIA_ROOT) == files_before
    existing.refresh_from_db()
    assert existing.label == "red"


def test_the_same_file_may_go_into_another_dataset(admin_client, indexed, image_folder):
    other = Dataset.objects.create(name="second")
    data = (image_folder / "red" / "red-0.png").read_bytes()
    response = admin_client.post(IMAGE_ADD, {"dataset": other.pk, "upload": SimpleUploadedFile("red-0.png", data)})
    assert response.status_code == 302 and other.images.count() == 1


def test_adding_without_a_file_or_dataset_is_a_form_error(admin_client, dataset):
    response = admin_client.post(IMAGE_ADD, {"dataset": dataset.pk})
    assert response.status_code == 200 and "upload" in response.context["adminform"].form.errors
    response = admin_client.post(IMAGE_ADD, {"upload": SimpleUploadedFile("x.png", b"\x89PNG")})
    assert response.status_code == 200 and "dataset" in response.context["adminform"].form.errors
    assert not Image.objects.exists()


# --- Model versions -------------------------------------------------------------

def test_version_list_shows_architecture_dimension_weights_and_active(admin_client, indexed, tiny_version,
                                                                     second_version):
    html = admin_client.get(VERSIONS).content.decode()
    for version in (tiny_version, second_version):
        assert version.name in html and version.weights_sha256[:12] in html
    assert '<td class="field-architecture">tiny</td>' in html
    assert '<td class="field-dimension">32</td>' in html
    assert "random initial weights" in html
    assert '<td class="field-n_embeddings">12</td>' in html
    # Exactly one row is marked active.
    assert html.count('<td class="field-active_mark"><img src="/static/admin/img/icon-yes.svg" alt="True"') == 1


def test_version_page_shows_weights_checksum_and_metrics(admin_client, indexed, tiny_version):
    ModelVersion.objects.filter(pk=tiny_version.pk).update(metrics={"map_at_10": 0.875, "recall_at_1": 0.5})
    html = admin_client.get(_change("modelversion", tiny_version.pk)).content.decode()
    assert tiny_version.weights_sha256 in html and tiny_version.weights_path in html
    assert "map_at_10" in html and "0.875" in html and "random initial weights" in html


def test_vector_defining_fields_are_read_only(admin_client, indexed, tiny_version):
    url = _change("modelversion", tiny_version.pk)
    assert set(admin_client.get(url).context["adminform"].form.fields) == {"name", "notes"}
    before = ModelVersion.objects.filter(pk=tiny_version.pk).values().get()

    response = admin_client.post(url, {
        "name": tiny_version.name, "notes": "checked by hand", "architecture": "resnet50", "dimension": "2048",
        "weights_sha256": "f" * 64, "weights_path": "/elsewhere.pt", "weights_source": "checkpoint",
        "config": '{"dimension": 2048}', "preprocessing": "{}", "metrics": '{"map_at_10": 1.0}', "is_active": "",
    })

    assert response.status_code == 302
    after = ModelVersion.objects.filter(pk=tiny_version.pk).values().get()
    assert after.pop("notes") == "checked by hand"
    before.pop("notes")
    assert after == before


def test_versions_cannot_be_added_by_hand(admin_client, db):
    assert admin_client.get(reverse("admin:training_modelversion_add")).status_code == 403


def test_the_active_version_cannot_be_deleted(admin_client, indexed, tiny_version, second_version):
    url = _delete("modelversion", tiny_version.pk)
    assert admin_client.get(url).status_code == 403
    assert admin_client.post(url, {"post": "yes"}).status_code == 403

    confirm = _run_action(admin_client, VERSIONS, "delete_selected", [tiny_version.pk])
    assert confirm.status_code == 200 and "Cannot delete model version" in confirm.content.decode()
    for selected in ([tiny_version.pk], [tiny_version.pk, second_version.pk]):
        response = admin_client.post(VERSIONS, {"action": "delete_selected", "_selected_action": selected,
                                                "post": "yes"})
        assert response.status_code == 403
    assert ModelVersion.objects.filter(pk=second_version.pk).exists()  # all or nothing

    tiny_version.refresh_from_db()
    assert tiny_version.is_active and hnsw.is_ready(tiny_version)
    assert Embedding.objects.filter(model_version=tiny_version).count() == 12


def test_an_inactive_version_can_be_deleted_with_its_index(admin_client, indexed, tiny_version, second_version):
    assert hnsw.is_ready(second_version)
    response = admin_client.post(_delete("modelversion", second_version.pk), {"post": "yes"})
    assert response.status_code == 302
    assert not ModelVersion.objects.filter(pk=second_version.pk).exists()
    assert not Embedding.objects.filter(model_version_id=second_version.pk).exists()
    assert hnsw.index_state(second_version) == hnsw.MISSING
    assert Embedding.objects.filter(model_version=tiny_version).count() == 12


def test_activate_action_switches_the_active_version(admin_client, indexed, tiny_version, second_version):
    response = _run_action(admin_client, VERSIONS, "activate", [second_version.pk])
    assert response.status_code == 302

    assert list(ModelVersion.objects.filter(is_active=True).values_list("pk", flat=True)) == [second_version.pk]
    assert ModelVersion.active() == second_version
    page = admin_client.get(VERSIONS)
    assert any(f"{second_version.name} is now used for search" in m for m in _messages(page))
    # The old one may now be deleted, the new one not.
    assert admin_client.get(_delete("modelversion", tiny_version.pk)).status_code == 200
    assert admin_client.get(_delete("modelversion", second_version.pk)).status_code == 403


def test_activating_an_unindexed_version_needs_a_job_and_says_when_none_can_run(admin_client, indexed, tiny_version,
                                                                                  settings, tmp_path):
    from cbirsite.celery import app

    bare = get_or_create_version("tiny", random_weights=True, config={"dimension": 32, "size": 32})
    old = app.conf.broker_url
    app.conf.broker_url = f"redis+socket://{tmp_path}/no-redis.sock"  # no broker, so no job can start
    try:
        response = _run_action(admin_client, VERSIONS, "activate", [bare.pk])
    finally:
        app.conf.broker_url = old
    assert response.status_code == 302
    assert ModelVersion.active() == tiny_version  # search keeps its complete version
    assert any("cannot be reached" in m for m in _messages(admin_client.get(VERSIONS)))


def test_activate_refuses_more_than_one_version(admin_client, indexed, tiny_version, second_version):
    _run_action(admin_client, VERSIONS, "activate", [tiny_version.pk, second_version.pk])
    assert ModelVersion.active() == tiny_version
    assert any("exactly one" in m for m in _messages(admin_client.get(VERSIONS)))


# --- Odds and ends ----------------------------------------------------------------

def test_datasets_can_be_added_and_described(admin_client, indexed):
    response = admin_client.post(reverse("admin:search_dataset_add"), {"name": "new-set", "description": "fresh"})
    assert response.status_code == 302 and Dataset.objects.filter(name="new-set", description="fresh").exists()
    response = admin_client.post(_change("dataset", indexed.pk), {"name": indexed.name, "description": "photos"})
    assert response.status_code == 302
    indexed.refresh_from_db()
    assert indexed.description == "photos" and indexed.images.count() == 12


def test_labels_are_escaped_everywhere(admin_client, indexed):
    Image.objects.filter(label="red").update(label="<script>alert(1)</script>")
    image = Image.objects.filter(label__startswith="<").first()
    pages = [IMAGES, _change("dataset", indexed.pk), _change("image", image.pk)]
    for url in pages:
        html = admin_client.get(url).content.decode()
        assert "<script>alert(1)</script>" not in html, url
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html, url


def test_set_label_action_refuses_an_overlong_label(admin_client, indexed):
    chosen = list(Image.objects.values_list("pk", flat=True)[:2])
    response = admin_client.post(IMAGES, {"action": "set_label", "_selected_action": chosen, "label": "x" * 201,
                                          "apply": "Apply"})
    assert response.status_code == 200 and "at most 200 characters" in response.content.decode()
    assert not Image.objects.filter(label__startswith="xxx").exists()


def test_bulk_actions_keep_the_list_filter(admin_client, indexed):
    # The intermediate form posts back to the filtered list, so only the selected rows change.
    chosen = list(Image.objects.filter(label="red").values_list("pk", flat=True)[:2])
    url = f"{IMAGES}?label=red"
    form = _run_action(admin_client, url, "set_label", chosen)
    assert form.status_code == 200 and "<form method=\"post\">" in form.content.decode()
    response = admin_client.post(url, {"action": "set_label", "_selected_action": chosen, "label": "rose",
                                       "apply": "Apply"})
    assert response.status_code == 302 and response["Location"].endswith("?label=red")
    assert sorted(Image.objects.filter(label="rose").values_list("pk", flat=True)) == sorted(chosen)


def test_adding_and_continue_editing_opens_the_new_image(admin_client, dataset, make_image_bytes):
    upload = SimpleUploadedFile("x.png", make_image_bytes(pattern=31))
    response = admin_client.post(IMAGE_ADD, {"dataset": dataset.pk, "upload": upload, "_continue": "1"})
    image = Image.objects.get()
    assert response.status_code == 302 and response["Location"] == _change("image", image.pk)
    assert image.label is None


def test_the_intermediate_form_works_with_csrf_checks(indexed, admin_user):
    """As a browser does it: every POST carries the token from the page before."""
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(admin_user)

    def token(response) -> str:
        return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', response.content.decode()).group(1)

    chosen = list(Image.objects.filter(label="blue").values_list("pk", flat=True)[:2])
    page = browser.get(IMAGES)
    form = browser.post(IMAGES, {"csrfmiddlewaretoken": token(page), "action": "set_split",
                                 "_selected_action": chosen, "index": "0"})
    assert form.status_code == 200
    response = browser.post(IMAGES, {"csrfmiddlewaretoken": token(form), "action": "set_split",
                                     "_selected_action": chosen, "split": "val", "apply": "Apply"})
    assert response.status_code == 302
    assert set(Image.objects.filter(pk__in=chosen).values_list("split", flat=True)) == {"val"}
