"""The model comparison page /models/, its example queries and its exports:
they render with no versions, with un-evaluated versions and with evaluated
ones, highlight the best value of each column and plot precision@k."""

from __future__ import annotations

import csv
import io

import pytest
from django.urls import reverse

from search.models import Image, Job
from training.evaluation.retrieval import copy_detection, evaluate_version, save_copy_detection, save_evaluation
from training.models import ModelVersion
from training.views import STUDY_REFERENCE

MODELS = reverse("models")
REPORT_JSON = reverse("models-report-json")
REPORT_CSV = reverse("models-report-csv")


def _version(name: str, **metrics) -> ModelVersion:
    return ModelVersion.objects.create(name=name, architecture="tiny", weights_source="random", dimension=32,
                                       preprocessing={"size": 32}, metrics=metrics)


def _fake_evaluation(dataset: str, p: float, latency: float, r1: float) -> dict:
    return {
        "evaluation": {dataset: {"k": 10, "n_queries": 29, "against": "trainval", "date": "2025-01-02T03:04:05+00:00",
                                 "precision_at_k": p, "recall_at_k": p / 2, "map_at_k": p + 0.1,
                                 "mean_similar": p * 10, "mean_dissimilar": 10 - p * 10, "ann_recall_at_k": 1.0,
                                 "median_latency_ms": latency, "precision_curve": [p] * 50, "examples": []}},
        "copy_detection": {dataset: {"date": "2025-01-02", "summary": {"all": {"recall_at_1": r1,
                                                                               "recall_at_10": 1.0}}}},
    }


@pytest.fixture
def evaluated(indexed, tiny_version):
    """The tiny version evaluated for real on the red/blue set (splits fixed so both colours have queries)."""
    for label in ("red", "blue"):
        ids = list(Image.objects.filter(label=label).order_by("pk").values_list("pk", flat=True))
        Image.objects.filter(pk__in=ids[:2]).update(split="test")
        Image.objects.filter(pk__in=ids[2:]).update(split="train")
    save_evaluation(tiny_version, evaluate_version(tiny_version, indexed, k=10))
    save_copy_detection(tiny_version, copy_detection(tiny_version, indexed, per_kind=2, kinds=("flip", "jpeg")))
    tiny_version.refresh_from_db()
    return tiny_version


def test_the_page_renders_with_no_versions(client, db):
    response = client.get(MODELS)
    assert response.status_code == 200
    html = response.content.decode()
    assert "No model version yet" in html and "No precision curve yet" in html
    for name, _similar, _dissimilar in STUDY_REFERENCE:
        assert f"study (one query): {name}" in html
    assert response.context["rows"] == []


def test_the_page_renders_with_an_unevaluated_version(client, tiny_version):
    response = client.get(MODELS)
    assert response.status_code == 200
    html = response.content.decode()
    assert tiny_version.name in html and "not evaluated" in html
    assert response.context["plot"] is None


def test_an_evaluated_version_shows_its_numbers_curve_and_links(client, evaluated, indexed):
    job = Job.objects.create(kind=Job.Kind.TRAIN, model_version=evaluated, status=Job.Status.SUCCEEDED)
    response = client.get(MODELS)
    assert response.status_code == 200
    row = response.context["rows"][0]
    result = evaluated.metrics["evaluation"][indexed.name]
    assert row.precision_at_k == result["precision_at_k"] and row.map_at_k == result["map_at_k"]
    assert row.copy_recall_at_1 == evaluated.metrics["copy_detection"][indexed.name]["summary"]["all"]["recall_at_1"]
    html = response.content.decode()
    assert f"{result['precision_at_k']:.3f}" in html
    assert 'id="precision-plot"' in html and "<polyline" in html
    assert reverse("job-detail", args=[job.pk]) in html
    assert reverse("model-examples", args=[evaluated.pk]) in html
    assert response.context["dataset"] == indexed.name


def test_the_best_value_of_each_column_is_highlighted(client, db):
    _version("weaker", training={"seconds": 600}, **_fake_evaluation("animals", 0.4, 2.0, 0.9))
    _version("stronger", training={"seconds": 900}, **_fake_evaluation("animals", 0.6, 3.0, 0.8))
    _version("untested")
    rows = {row.name: row for row in client.get(MODELS).context["rows"]}
    assert rows["stronger"].best["precision_at_k"] and not rows["weaker"].best["precision_at_k"]
    assert rows["stronger"].best["mean_similar"] and rows["stronger"].best["mean_dissimilar"]
    assert rows["weaker"].best["median_latency_ms"] and rows["weaker"].best["copy_recall_at_1"]
    assert rows["weaker"].best["training_seconds"]
    assert not any(rows["untested"].best.values())
    html = client.get(MODELS).content.decode()
    assert html.count('class="num best"') == 7


def test_the_dataset_can_be_chosen(client, db):
    _version("a", **_fake_evaluation("animals", 0.4, 2.0, 0.9))
    _version("b", **_fake_evaluation("plants", 0.7, 2.0, 0.9))
    assert client.get(MODELS, {"dataset": "plants"}).context["rows"][1].precision_at_k == 0.7
    assert client.get(MODELS, {"dataset": "plants"}).context["rows"][0].precision_at_k is None
    assert client.get(MODELS, {"dataset": "unknown"}).status_code == 200


def test_examples_page_marks_right_and_wrong_results(client, evaluated, indexed):
    response = client.get(reverse("model-examples", args=[evaluated.pk]))
    assert response.status_code == 200
    examples = response.context["examples"]
    stored = evaluated.metrics["evaluation"][indexed.name]["examples"]
    assert [e["image_id"] for e in examples] == [e["image_id"] for e in stored] and len(examples) == 4
    html = response.content.decode()
    rights = sum(h["correct"] for e in stored for h in e["results"])
    assert html.count('data-correct="1"') == rights
    assert html.count('data-correct="0"') == sum(len(e["results"]) for e in stored) - rights


def test_examples_page_of_an_unevaluated_version(client, tiny_version):
    response = client.get(reverse("model-examples", args=[tiny_version.pk]))
    assert response.status_code == 200 and "not been evaluated" in response.content.decode()
    assert client.get(reverse("model-examples", args=[99999])).status_code == 404


def test_report_json(client, evaluated, indexed):
    _version("untested")
    data = client.get(REPORT_JSON).json()
    assert data["dataset"] == indexed.name and data["datasets"] == [indexed.name]
    by_name = {m["name"]: m for m in data["models"]}
    assert by_name[evaluated.name]["precision_at_k"] == evaluated.metrics["evaluation"][indexed.name]["precision_at_k"]
    assert len(by_name[evaluated.name]["precision_curve"]) == 50
    assert by_name["untested"]["precision_at_k"] is None
    assert [(s["model"], s["similar"], s["dissimilar"]) for s in data["study_reference"]] == STUDY_REFERENCE


def test_report_csv(client, evaluated, indexed):
    response = client.get(REPORT_CSV)
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert len(rows) == 1 + len(STUDY_REFERENCE)
    assert rows[0]["name"] == evaluated.name and rows[0]["source"] == "measured"
    assert float(rows[0]["precision_at_k"]) == evaluated.metrics["evaluation"][indexed.name]["precision_at_k"]
    assert rows[1]["source"] == "study (one query)" and rows[1]["mean_similar"] == "6"


def test_exports_with_no_versions(client, db):
    assert client.get(REPORT_JSON).json()["models"] == []
    assert len(list(csv.DictReader(io.StringIO(client.get(REPORT_CSV).content.decode())))) == len(STUDY_REFERENCE)


def test_the_page_says_what_precision_a_version_was_embedded_in(client, indexed, tiny_version):
    tiny_version.refresh_from_db()
    precisions = tiny_version.metrics["embedding_precision"]
    assert precisions == ["float32"]  # the suite runs with CBIR_CPU_PRECISION=float32 (tests/conftest.py)
    row = next(r for r in client.get(MODELS).context["rows"] if r.id == tiny_version.pk)
    assert row.precision == precisions[0]
    assert 'title="the precision its embeddings' in client.get(MODELS).content.decode()
