"""The activation gate: activating a version shows its measured quality next to
the active one's, asks to confirm what gets worse, logs who switched; Roll
back returns to the previous version in one click."""

from __future__ import annotations

import pytest

from training.activation import compare, previous_version
from training.models import Activation, ModelVersion

URL = "/admin/training/modelversion/"


@pytest.fixture
def candidate(indexed, tiny_version):
    """A second tiny version with a complete index of the same dataset (not active)."""
    from search.indexing import build_index
    from training.versions import get_or_create_version

    other = get_or_create_version("tiny", random_weights=True, config={"dimension": 32, "size": 32})
    build_index(indexed, other)
    assert not ModelVersion.objects.get(pk=other.pk).is_active
    return other


def _measured(version: ModelVersion, p: float, marks: float | None = None, dataset: str = "test-set") -> None:
    def change(metrics: dict) -> None:
        metrics["evaluation"] = {dataset: {"precision_at_k": p, "map_at_k": p, "marks_precision_at_k": marks}}

    version.update_metrics(change)


def _activate(admin_client, version, **extra):
    return admin_client.post(URL, {"action": "activate", "_selected_action": [version.pk], "index": "0", **extra},
                             follow=True)


def test_a_worse_version_needs_confirmation_saying_what_gets_worse(admin_client, admin_user, tiny_version,
                                                                 candidate):
    _measured(tiny_version, 0.8, marks=0.7)
    _measured(candidate, 0.6, marks=0.9)
    page = _activate(admin_client, candidate)
    text = page.content.decode()
    assert page.status_code == 200 and "P@k on test-set drops from 0.800 to 0.600" in text
    assert "P@k on held-out marks on test-set" not in text.split('id="worse"')[1].split("</ul>")[0]  # better there
    assert ModelVersion.active() == tiny_version and not Activation.objects.filter(version=candidate).exists()

    page = _activate(admin_client, candidate, confirm="yes")
    assert ModelVersion.active() == candidate
    log = Activation.objects.get(version=candidate)
    assert (log.previous, log.user, log.reason) == (tiny_version, admin_user, "admin (confirmed: worse on some sets)")


def test_a_set_the_new_version_was_not_measured_on_counts_as_worse(tiny_version, candidate):
    _measured(tiny_version, 0.8)
    lines = compare(candidate, tiny_version)
    assert [line.describe() for line in lines if line.worse] == [
        "P@k on test-set: not measured for the new version (active: 0.800)",
        "mAP@k on test-set: not measured for the new version (active: 0.800)"]


def test_a_version_as_good_or_better_switches_at_once_and_shows_the_comparison(admin_client, tiny_version, candidate):
    _measured(tiny_version, 0.5)
    _measured(candidate, 0.75)
    page = _activate(admin_client, candidate)
    assert ModelVersion.active() == candidate
    assert "P@k on test-set 0.500 → 0.750" in page.content.decode()


def test_roll_back_returns_to_the_previous_version_in_one_click(admin_client, admin_user, tiny_version, candidate):
    candidate.activate(user=admin_user, reason="admin")
    assert previous_version() == tiny_version
    listing = admin_client.get(URL).content.decode()
    assert f"Roll back to {tiny_version}" in listing
    admin_client.post(URL + "rollback/", follow=True)
    assert ModelVersion.active() == tiny_version
    last = Activation.objects.first()
    assert (last.version, last.previous, last.reason, last.user) == (tiny_version, candidate, "rollback", admin_user)
    assert admin_client.get(URL + "rollback/").status_code == 405  # a click that changes something is a POST


def test_every_activation_is_logged_the_first_by_the_index_build(indexed, tiny_version):
    first = Activation.objects.get()
    assert (first.version, first.previous, first.user, first.reason) == (
        tiny_version, None, None, "first version indexed")
    tiny_version.activate()  # already active: nothing switches, nothing logged
    assert Activation.objects.count() == 1


def test_staff_see_the_activation_log(admin_client, indexed):
    page = admin_client.get("/admin/training/activation/")
    assert page.status_code == 200 and b"first version indexed" in page.content


def test_roll_back_to_a_version_missing_embeddings_embeds_them_first(admin_client, admin_user, indexed,
                                                                     tiny_version, candidate, monkeypatch):
    from search import embed_jobs, jobs
    from search.indexing import missing_image_ids
    from search.models import Image

    candidate.activate(user=admin_user, reason="admin")
    # An image added since, which tiny_version has not embedded (its index is still "ready").
    added = Image.objects.create(dataset=indexed, file="new.png", thumbnail="new.jpg", sha256="1" * 64,
                                 original_filename="new.png", width=1, height=1, split="train")
    assert added.pk in missing_image_ids(None, tiny_version)
    started = []

    def start_activation(version, *, user=None, check=True):
        started.append(version)
        raise jobs.JobError("no worker in this test")

    monkeypatch.setattr(embed_jobs, "start_activation", start_activation)
    admin_client.post(URL + "rollback/", follow=True)
    assert ModelVersion.active() == candidate  # not switched to a version that would miss the new image
    assert started == [tiny_version]  # the activation job, as Activate starts


def test_view_only_staff_can_neither_activate_nor_roll_back(client, admin_user, tiny_version, candidate,
                                                            django_user_model):
    from django.contrib.auth.models import Permission

    candidate.activate(user=admin_user, reason="admin")
    viewer = django_user_model.objects.create_user("viewer", password="pw-123456", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_modelversion"))
    client.force_login(viewer)
    listing = client.get(URL)
    assert listing.status_code == 200
    text = listing.content.decode()
    assert "Roll back to" not in text and 'value="activate"' not in text
    client.post(URL, {"action": "activate", "_selected_action": [tiny_version.pk], "index": "0", "confirm": "yes"})
    assert ModelVersion.active() == candidate
    client.post(URL + "rollback/")
    assert ModelVersion.active() == candidate and Activation.objects.first().version == candidate


def _measured_as(version: ModelVersion, **entry) -> None:
    def change(metrics: dict) -> None:
        metrics["evaluation"] = {"test-set": entry}

    version.update_metrics(change)


def test_only_values_measured_alike_are_compared(tiny_version, candidate):
    _measured_as(tiny_version, precision_at_k=0.5, map_at_k=0.5, k=10, against="test+train",
                 marks_precision_at_k=0.4, marks_held_out=20, marks_set="aaaa")
    _measured_as(candidate, precision_at_k=0.9, map_at_k=0.9, k=5, against="test+train",
                 marks_precision_at_k=0.9, marks_held_out=20, marks_set="bbbb")
    lines = {line.measure: line for line in compare(candidate, tiny_version)}
    assert all(line.worse for line in lines.values())  # higher, but not measured the same way: confirm
    assert lines["P@k"].describe() == ("P@k on test-set: not comparable (k 10 vs 5; active 0.500, new 0.900)")
    assert "held-out marks aaaa vs bbbb" in lines["P@k on held-out marks"].not_comparable
    _measured_as(candidate, precision_at_k=0.9, map_at_k=0.9, k=10, against="test only",
                 marks_precision_at_k=0.9, marks_held_out=21)
    lines = {line.measure: line for line in compare(candidate, tiny_version)}
    assert lines["mAP@k"].not_comparable == "searched test+train vs test only"
    assert "held-out marks" in lines["P@k on held-out marks"].not_comparable
    _measured_as(candidate, precision_at_k=0.9, map_at_k=0.9, k=10, against="test+train",
                 marks_precision_at_k=0.9, marks_held_out=20, marks_set="aaaa")
    assert not any(line.worse or line.not_comparable for line in compare(candidate, tiny_version))


def test_sets_only_the_candidate_was_measured_on_are_not_listed(tiny_version, candidate):
    _measured(tiny_version, 0.5, dataset="a")
    _measured(candidate, 0.9, dataset="b")
    assert {line.dataset for line in compare(candidate, tiny_version)} == {"a"}
