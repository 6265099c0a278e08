"""Measuring retrieval quality through the database: category retrieval checked
against a brute-force computation, the split-filtered query on the HNSW index,
the evaluate command, copy detection, and the evaluation job on a real worker."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from PIL import Image as PILImage

from search import hnsw
from search.indexing import build_index
from search.ingest import add_image
from search.jobs import JobError, S
from search.models import Dataset, Embedding, Image, Job
from search.neighbours import explain, neighbours_queryset
from tests.helpers import store_embeddings, wait_for
from training.evaluation.jobs import run_evaluation_job, start_evaluation_job
from training.evaluation.retrieval import (
    EvaluationError,
    copy_detection,
    evaluate_version,
    save_copy_detection,
    save_evaluation,
)
from training.versions import get_or_create_version

DOCS = Path(__file__).resolve().parent.parent / "docs" / "evaluation.md"


@pytest.fixture
def labelled(indexed):
    """The indexed red/blue set with fixed splits: per colour the first two
    images are test, the third val, the rest train. One red train image is
    labelled blue (a labelling mistake, so the numbers are not all perfect)
    and one blue train image has no label."""
    for label in ("red", "blue"):
        ids = list(Image.objects.filter(dataset=indexed, label=label).order_by("pk").values_list("pk", flat=True))
        Image.objects.filter(pk__in=ids[:2]).update(split="test")
        Image.objects.filter(pk__in=ids[2:3]).update(split="val")
        Image.objects.filter(pk__in=ids[3:]).update(split="train")
    red_train = Image.objects.filter(dataset=indexed, label="red", split="train").order_by("pk")
    Image.objects.filter(pk=red_train[0].pk).update(label="blue")
    Image.objects.filter(pk=Image.objects.filter(dataset=indexed, label="blue", split="train")
                         .order_by("-pk")[0].pk).update(label=None)
    return indexed


def _unit_vectors(version) -> dict[int, np.ndarray]:
    vectors = {}
    for image_id, vector in Embedding.objects.filter(model_version=version).values_list("image_id", "vector"):
        v = np.asarray(vector, dtype=np.float64)
        vectors[image_id] = v / np.linalg.norm(v)
    return vectors


def _brute_force(version, dataset, *, k: int, against: str, depth: int = 50) -> dict:
    """The expected numbers, computed here independently of the code under test."""
    vectors = _unit_vectors(version)
    rows = list(Image.objects.filter(dataset=dataset).order_by("pk").values_list("pk", "label", "split"))
    label = {pk: lab for pk, lab, _ in rows}
    queries = [pk for pk, lab, split in rows if split == "test" and lab]
    per_query = []
    for q in queries:
        candidates = [pk for pk, _, split in rows if pk != q and (against == "all" or split in ("train", "val"))]
        scores = {c: float(vectors[q] @ vectors[c]) for c in candidates}
        ranking = sorted(candidates, key=lambda c: (-scores[c], c))[:depth]
        relevant = [label[c] == label[q] for c in ranking]
        n_rel = sum(1 for c in candidates if label[c] == label[q])
        hits = sum(relevant[:k])
        precisions_at_hits = [sum(relevant[:i + 1]) / (i + 1) for i in range(min(k, len(relevant))) if relevant[i]]
        per_query.append({
            "ranking": ranking, "scores": scores, "p": hits / k, "r": hits / n_rel if n_rel else None,
            "ap": sum(precisions_at_hits) / min(k, n_rel) if n_rel else None,
            "similar": hits, "dissimilar": min(k, len(ranking)) - hits,
            "curve": [sum(relevant[:i]) / i for i in range(1, depth + 1)],
        })
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "queries": queries, "per_query": per_query, "n_searched": len(
            [pk for pk, _, split in rows if against == "all" or split in ("train", "val")]),
        "precision_at_k": mean([p["p"] for p in per_query]),
        "recall_at_k": mean([p["r"] for p in per_query if p["r"] is not None]),
        "map_at_k": mean([p["ap"] for p in per_query if p["ap"] is not None]),
        "mean_similar": mean([p["similar"] for p in per_query]),
        "mean_dissimilar": mean([p["dissimilar"] for p in per_query]),
        "curve": [mean([p["curve"][i] for p in per_query]) for i in range(depth)],
    }


@pytest.mark.parametrize("against,k", [("trainval", 3), ("trainval", 10), ("all", 5)])
def test_evaluation_matches_a_brute_force_computation(labelled, tiny_version, against, k):
    result = evaluate_version(tiny_version, labelled, k=k, against=against)
    expected = _brute_force(tiny_version, labelled, k=k, against=against)
    assert result["n_queries"] == len(expected["queries"]) == 4
    assert result["n_searched"] == expected["n_searched"]
    for key in ("precision_at_k", "recall_at_k", "map_at_k", "mean_similar", "mean_dissimilar"):
        assert result[key] == pytest.approx(expected[key]), key
    assert result["precision_curve"] == pytest.approx(expected["curve"], abs=1e-6)
    assert result["ann_recall_at_k"] == 1.0 and result["n_ann_queries"] == 4
    assert result["n_skipped_no_relevant"] == 0
    # The examples are the first test images by id, with their exact top 10.
    assert [e["image_id"] for e in result["examples"]] == expected["queries"]
    for example, brute in zip(result["examples"], expected["per_query"]):
        # Same ranking up to near-ties (the database compares half-precision vectors in its own order).
        ids = [h["image_id"] for h in example["results"]]
        assert len(ids) == len(brute["ranking"][:10])
        assert [brute["scores"][i] for i in ids] == pytest.approx(
            [brute["scores"][i] for i in brute["ranking"][:10]], abs=2e-3)
        assert [h["correct"] for h in example["results"]] == [
            h["label"] == example["label"] for h in example["results"]]
    assert result["against"] == against and result["k"] == k
    assert result["dataset"] == labelled.name and result["model"] == tiny_version.name
    assert result["median_latency_ms"] > 0 and result["date"]


def test_the_numbers_on_the_red_and_blue_set(labelled, tiny_version):
    """A hand check: two red test queries see 3 red + 1 mislabelled 'blue' red
    image ranked first (the colours separate cleanly), so P@4 = 3/4 for them."""
    result = evaluate_version(tiny_version, labelled, k=4)
    red = [e for e in result["examples"] if e["label"] == "red"]
    assert len(red) == 2
    for example in red:
        assert example["n_relevant_total"] == 3
        assert sum(h["correct"] for h in example["results"][:4]) == 3
    # Blue queries: val + two train images labelled blue (one is unlabelled), plus the mislabelled red one.
    blue = [e for e in result["examples"] if e["label"] == "blue"]
    assert len(blue) == 2 and all(e["n_relevant_total"] == 4 for e in blue)


def test_test_images_never_appear_in_trainval_results(labelled, tiny_version):
    result = evaluate_version(tiny_version, labelled, k=10)
    test_ids = set(Image.objects.filter(split="test").values_list("pk", flat=True))
    for example in result["examples"]:
        assert not {h["image_id"] for h in example["results"]} & test_ids
    everything = evaluate_version(tiny_version, labelled, k=10, against="all")
    for example in everything["examples"]:
        ids = [h["image_id"] for h in example["results"]]
        assert example["image_id"] not in ids and set(ids) & test_ids


def test_no_exact_search_means_no_ann_recall(labelled, tiny_version):
    result = evaluate_version(tiny_version, labelled, exact=False)
    assert result["ann_recall_at_k"] is None and result["n_ann_queries"] == 0 and result["exact"] is False


def test_a_query_whose_label_is_nowhere_else_is_left_out_of_recall_and_map(labelled, tiny_version):
    lonely = Image.objects.filter(split="test", label="red").order_by("pk")[0]
    Image.objects.filter(pk=lonely.pk).update(label="unique")
    result = evaluate_version(tiny_version, labelled, k=5)
    assert result["n_skipped_no_relevant"] == 1 and result["n_queries"] == 4


@pytest.mark.parametrize("change,message", [
    (lambda ds: Image.objects.filter(dataset=ds).update(label=None), "no labels"),
    (lambda ds: Image.objects.filter(dataset=ds).update(split="train"), "no labelled test images"),
    (lambda ds: Image.objects.filter(dataset=ds).update(split="test"), "no train or validation images"),
])
def test_it_refuses_what_it_cannot_evaluate(labelled, tiny_version, change, message):
    change(labelled)
    with pytest.raises(EvaluationError, match=message):
        evaluate_version(tiny_version, labelled)


def test_a_version_that_has_not_indexed_the_dataset_is_sent_to_build_index(labelled, tiny_version):
    other = get_or_create_version("tiny", random_weights=True, config={"dimension": 16, "size": 32})
    with pytest.raises(EvaluationError, match="build_index --dataset test-set --model tiny-random-2"):
        evaluate_version(other, labelled)
    with pytest.raises(EvaluationError, match="build_index"):
        copy_detection(other, labelled)


def test_saving_keeps_the_other_metrics(labelled, tiny_version):
    tiny_version.metrics = {"training": {"seconds": 12.5}, "evaluation": {"elsewhere": {"k": 10}}}
    tiny_version.save(update_fields=["metrics"])
    result = evaluate_version(tiny_version, labelled, k=5)
    save_evaluation(tiny_version, result)
    copies = copy_detection(tiny_version, labelled, per_kind=2, kinds=("flip",))
    save_copy_detection(tiny_version, copies)
    tiny_version.refresh_from_db()
    metrics = tiny_version.metrics
    assert metrics["training"] == {"seconds": 12.5}
    assert set(metrics["evaluation"]) == {"elsewhere", labelled.name}
    assert metrics["evaluation"][labelled.name]["precision_at_k"] == result["precision_at_k"]
    assert metrics["evaluation"][labelled.name]["date"] == result["date"]
    assert metrics["copy_detection"][labelled.name]["summary"]["all"]["n_queries"] == 2


# --- The split-filtered query uses the HNSW index -----------------------------

@pytest.fixture
def large_labelled(dataset, tiny_version):
    """3,000 random 32-d embeddings in 10 labels, split 60/20/20: enough rows
    for the planner to prefer the HNSW index, as in test_search."""
    rng = np.random.default_rng(1)
    splits = ["train", "train", "train", "val", "test"]
    centres = rng.normal(size=(10, 32))
    vectors = (centres[np.arange(3000) % 10] + 1.5 * rng.normal(size=(3000, 32))).astype(np.float32)
    store_embeddings(dataset, tiny_version, vectors, splits=[splits[i % 5] for i in range(3000)],
                     labels=[f"label-{i % 10}" for i in range(3000)])
    return dataset


@pytest.mark.parametrize("splits", [("train", "val"), None])
def test_explain_shows_the_split_filtered_query_uses_the_hnsw_index(large_labelled, tiny_version, splits):
    query = Image.objects.filter(dataset=large_labelled, split="test").first()
    query_args = {"image_id": query.pk, "dataset": large_labelled, "splits": splits, "exclude_image_id": query.pk}
    plan = explain(neighbours_queryset(tiny_version, **query_args), 50)
    assert f"Index Scan using {hnsw.index_name(tiny_version)}" in plan, plan
    exact_plan = explain(neighbours_queryset(tiny_version, **query_args, exact=True), 50, exact=True)
    assert hnsw.index_name(tiny_version) not in exact_plan


def test_on_many_vectors_the_index_finds_nearly_the_exact_top_k(large_labelled, tiny_version):
    Image.objects.filter(dataset=large_labelled, split="test").exclude(
        pk__in=Image.objects.filter(dataset=large_labelled, split="test").order_by("pk")[:60]).update(split="val")
    result = evaluate_version(tiny_version, large_labelled, k=10)
    assert result["n_queries"] == 60 and result["n_searched"] == 2940
    assert result["ann_recall_at_k"] >= 0.9
    assert result["precision_at_k"] > 0.3  # well above chance (0.1): the labels have centres
    for example in result["examples"]:
        splits = set(Image.objects.filter(pk__in=[h["image_id"] for h in example["results"]])
                     .values_list("split", flat=True))
        assert splits <= {"train", "val"}


# --- The evaluate command -----------------------------------------------------

def _documented_fields() -> str:
    return DOCS.read_text()


def test_evaluate_command_prints_the_documented_json_and_saves_it(labelled, tiny_version):
    out = io.StringIO()
    call_command("evaluate", "--dataset", labelled.name, "--json", "--copies", "--per-kind", "2",
                 "--no-progress", stdout=out)
    data = json.loads(out.getvalue())
    assert set(data) == {"evaluation", "copy_detection"}
    docs = _documented_fields()
    for key in data["evaluation"]:
        assert f"`{key}`" in docs, f"evaluation field {key} is not documented"
    for key in data["copy_detection"]:
        assert f"`{key}`" in docs, f"copy_detection field {key} is not documented"
    for key in data["evaluation"]["examples"][0]:
        assert f"`{key}`" in docs, key
    for key in data["copy_detection"]["summary"]["all"]:
        assert f"`{key}`" in docs, key
    assert data["evaluation"]["model"] == tiny_version.name  # the active version by default
    assert len(data["evaluation"]["precision_curve"]) == 50
    tiny_version.refresh_from_db()
    assert tiny_version.metrics["evaluation"][labelled.name]["n_queries"] == 4
    assert labelled.name in tiny_version.metrics["copy_detection"]


def test_evaluate_command_prints_a_table(labelled, tiny_version):
    out = io.StringIO()
    call_command("evaluate", "--dataset", labelled.name, "--model", tiny_version.name, "--k", "5",
                 "--against", "all", "--no-exact", "--no-progress", "--no-save", stdout=out)
    text = out.getvalue()
    assert "precision@5" in text and "mAP@5" in text and "not measured" in text
    tiny_version.refresh_from_db()
    assert "evaluation" not in tiny_version.metrics


@pytest.mark.parametrize("args,message", [
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--dataset", "test-set", "--model", "nope"], "unknown model version 'nope'"),
    (["--dataset", "test-set", "--kinds", "blur"], "unknown kind"),
])
def test_evaluate_command_says_what_is_wrong(labelled, tiny_version, args, message):
    with pytest.raises(CommandError, match=message):
        call_command("evaluate", *args, "--no-progress")


def test_evaluate_command_on_an_unlabelled_or_unindexed_dataset(labelled, tiny_version, make_image_bytes):
    bare = Dataset.objects.create(name="bare")
    add_image(bare, make_image_bytes(pattern=1), "a.png")
    with pytest.raises(CommandError, match="no labels"):
        call_command("evaluate", "--dataset", "bare", "--no-progress")
    add_image(labelled, make_image_bytes(pattern=777), "late.png", "red")  # imported after indexing
    with pytest.raises(CommandError, match="build_index --dataset test-set"):
        call_command("evaluate", "--dataset", "test-set", "--no-progress")


# --- Copy detection -----------------------------------------------------------

def _symmetric_png(seed: int) -> bytes:
    """A left-right symmetric noise image: its mirror image is the same picture."""
    rng = np.random.default_rng(seed)
    half = rng.integers(0, 256, size=(32, 16, 3), dtype=np.uint8)
    half[..., seed % 3] = 255
    out = io.BytesIO()
    PILImage.fromarray(np.concatenate([half, half[:, ::-1]], axis=1), "RGB").save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def symmetric_set(db, tiny_version):
    dataset = Dataset.objects.create(name="symmetric")
    for i in range(12):
        add_image(dataset, _symmetric_png(i), f"s{i}.png", "x")
    build_index(dataset, tiny_version)
    return dataset


def _stable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("date", "median_forward_ms", "median_latency_ms")}


def test_copy_detection_finds_exact_copies_first(symmetric_set, tiny_version):
    """Mirroring a symmetric image changes nothing, so its original must come first."""
    result = copy_detection(tiny_version, symmetric_set, per_kind=8, kinds=("flip",))
    assert result["summary"]["flip"]["recall_at_1"] == 1.0
    assert result["summary"]["all"] == result["summary"]["flip"]
    assert all(q["rank"] == 1 and q["top_id"] == q["original_id"] for q in result["queries"])


def test_copy_detection_is_deterministic_for_a_seed(symmetric_set, tiny_version):
    first = copy_detection(tiny_version, symmetric_set, per_kind=3, seed=7)
    again = copy_detection(tiny_version, symmetric_set, per_kind=3, seed=7)
    assert _stable(first) == _stable(again)
    assert list(first["summary"]) == [*first["kinds"], "all"]
    assert first["summary"]["all"]["n_queries"] == 3 * 8
    other = copy_detection(tiny_version, symmetric_set, per_kind=3, seed=8)
    assert [q["original_id"] for q in other["queries"]] != [q["original_id"] for q in first["queries"]]


def test_copy_detection_uses_at_most_the_images_there_are(symmetric_set, tiny_version):
    result = copy_detection(tiny_version, symmetric_set, per_kind=50, kinds=("jpeg",))
    assert result["per_kind"] == 12 and result["summary"]["jpeg"]["n_queries"] == 12
    with pytest.raises(EvaluationError, match="depth"):
        copy_detection(tiny_version, symmetric_set, depth=5)


# --- The evaluation job -------------------------------------------------------

def test_starting_a_job_refuses_what_cannot_be_evaluated(indexed, tiny_version):
    Image.objects.filter(dataset=indexed).update(label=None)
    with pytest.raises(JobError, match="no labels"):
        start_evaluation_job(tiny_version, indexed, check=False)
    assert not Job.objects.exists()


def test_a_failing_evaluation_job_is_marked_failed_with_the_reason(labelled, tiny_version):
    job = Job.objects.create(kind=Job.Kind.EVALUATE, model_version=tiny_version, dataset=labelled,
                             params={"k": 10, "copies": False})
    Image.objects.filter(dataset=labelled).update(split="train")  # no test images any more
    with pytest.raises(EvaluationError):
        run_evaluation_job(job.pk)
    job.refresh_from_db()
    assert job.status == S.FAILED and "no labelled test images" in job.error
    assert run_evaluation_job(job.pk) == "not claimed"


def test_an_evaluation_job_runs_in_process_and_saves(labelled, tiny_version, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        job = start_evaluation_job(tiny_version, labelled, k=5, per_kind=2, check=False)
    assert len(callbacks) == 1  # sent only after commit
    with pytest.raises(JobError, match="already evaluating"):
        start_evaluation_job(tiny_version, labelled, check=False)
    assert run_evaluation_job(job.pk) == "done"
    job.refresh_from_db()
    assert job.status == S.SUCCEEDED and job.progress_done == job.progress_total == 4 + 2 * 8
    assert job.result["evaluation"]["k"] == 5 and "all" in job.result["copy_detection"]
    tiny_version.refresh_from_db()
    assert tiny_version.metrics["evaluation"][labelled.name]["k"] == 5


@pytest.mark.worker
@pytest.mark.timeout(240)
def test_an_evaluation_job_runs_on_a_worker_and_stores_metrics(live_worker, labelled, tiny_version):
    job = start_evaluation_job(tiny_version, labelled, k=5, copies=True, per_kind=2, check=True)
    job = wait_for(lambda: Job.objects.filter(pk=job.pk, status__in=[S.SUCCEEDED, S.FAILED]).first(),
                   timeout=180, message="the evaluation job to finish")
    assert job.status == S.SUCCEEDED, (job.error, job.log)
    assert job.params["k"] == 5 and job.celery_task_id
    assert any("started on" in line["msg"] for line in job.log)
    tiny_version.refresh_from_db()
    evaluation = tiny_version.metrics["evaluation"][labelled.name]
    assert evaluation["n_queries"] == 4 and evaluation["k"] == 5
    assert evaluation["precision_at_k"] == pytest.approx(
        _brute_force(tiny_version, labelled, k=5, against="trainval")["precision_at_k"])
    assert tiny_version.metrics["copy_detection"][labelled.name]["summary"]["all"]["n_queries"] == 2 * 8


def test_the_exact_search_runs_for_a_spread_sample_of_the_queries(labelled, tiny_version, settings):
    settings.CBIR_EVAL_EXACT_QUERIES = 2
    sampled = evaluate_version(tiny_version, labelled, k=3)
    assert sampled["n_queries"] == 4 and sampled["n_ann_queries"] == 2
    assert sampled["ann_recall_at_k"] == 1.0
    every = evaluate_version(tiny_version, labelled, k=3, exact_queries=0)
    assert every["n_ann_queries"] == 4
    # The metrics come from every query whatever the sample.
    assert every["precision_at_k"] == sampled["precision_at_k"]


def test_the_exact_sample_is_spread_over_the_split():
    from training.evaluation.retrieval import EvaluationError, exact_sample

    assert exact_sample(10, 0) == set(range(10)) == exact_sample(10, 10) == exact_sample(10, 50)
    assert exact_sample(10, 5) == {0, 2, 4, 6, 8}
    assert exact_sample(14_000, 500) == {28 * i for i in range(500)}
    with pytest.raises(EvaluationError, match="exact_queries"):
        exact_sample(10, -1)
