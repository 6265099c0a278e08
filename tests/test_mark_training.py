"""Heads trained on relevance marks: the core takes (query row, result row,
right) pairs and cached features; the app reads the marks from PostgreSQL
(`train --head-only --marks only|with_labels`, the admin form), and the
evaluation measures P@k against held-out marks (test-split queries)."""

from __future__ import annotations

import io

import pytest
import torch
from django.core.management import CommandError, call_command
from pytorch_metric_learning.losses import ContrastiveLoss

from search.models import Feedback, Image
from tests.test_training_jobs import make_dataset
from training.core.mark_training import (
    MarkTrainingConfig,
    check_marks,
    marks_precision_at_k,
    pair_indices,
    train_head_on_marks,
)
from training.forms import TrainForm
from training.models import ModelVersion


def test_pair_indices_name_rows_of_the_batch():
    rows, (a1, p, a2, n) = pair_indices([(7, 3, True), (7, 9, False), (3, 9, True)])
    assert rows.tolist() == [3, 7, 9]
    assert list(zip(a1.tolist(), p.tolist())) == [(1, 0), (0, 2)] and list(zip(a2.tolist(), n.tolist())) == [(1, 2)]


def test_the_pair_loss_equals_a_naive_loop_over_the_marked_pairs():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(6, 5), dim=1)
    marks = [(0, 1, True), (0, 2, False), (3, 4, True), (5, 2, False), (3, 5, False)]
    rows, pairs = pair_indices(marks)
    got = ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)(x[rows], indices_tuple=pairs)
    pos = [float((x[q] - x[r]).norm()) for q, r, ok in marks if ok]
    neg = [max(0.0, 1.0 - float((x[q] - x[r]).norm())) for q, r, ok in marks if not ok]
    # pytorch-metric-learning's AvgNonZeroReducer: each term averaged over its non-zero losses.
    expected = sum(pos) / len([v for v in pos if v > 0]) + (sum(neg) / len([v for v in neg if v > 0])
                                                           if any(neg) else 0.0)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_marks_precision_counts_right_marks_in_the_first_min_k_r():
    q = torch.tensor([[1.0, 0.0]])
    results = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]])
    marks = [(0, 0, True), (0, 1, False), (0, 2, True), (0, 3, False)]
    # Ranked by similarity: 0 (right), 1 (wrong), 3 (wrong), 2 (right); R = 2, so P@min(10, 2) = 1/2.
    assert marks_precision_at_k(q, results, marks) == (0.5, 1)
    assert marks_precision_at_k(q, results, [(0, 0, True)]) == (pytest.approx(float("nan"), nan_ok=True), 0)
    with pytest.raises(ValueError, match="both right and wrong"):
        check_marks([(0, 1, True)], 2)
    with pytest.raises(ValueError, match="outside"):
        check_marks([(0, 5, True), (0, 1, False)], 2)


def test_a_head_trained_on_marks_alone_ranks_held_out_marks_better_than_the_features():
    """Classes live in 4 of 32 dimensions, swamped by noise in the others: raw
    cosine ranks poorly; a head trained on marks (no labels) finds the 4."""
    generator = torch.Generator().manual_seed(0)
    classes = torch.arange(240) % 4
    centres = torch.eye(4) * 3.0
    x = torch.cat([centres[classes], 3.0 * torch.randn(240, 28, generator=generator)], dim=1)
    x[:, :4] += 0.3 * torch.randn(240, 4, generator=generator)

    def marks_for(queries):
        out = []
        for q in queries:
            for r in torch.randint(0, 240, (12,), generator=generator).tolist():
                if r != q:
                    out.append((q, r, bool(classes[q] == classes[r])))
        return out

    train_marks, held_out = marks_for(range(0, 120)), marks_for(range(120, 240))
    frozen, counted = marks_precision_at_k(x, x, held_out)
    head, history = train_head_on_marks(x, train_marks, MarkTrainingConfig(dimension=8, epochs=40,
                                                                           learning_rate=1e-2, batch_size=128))
    with torch.no_grad():
        projected = head(x)
    trained, _ = marks_precision_at_k(projected, projected, held_out)
    assert counted > 50 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert trained > frozen + 0.15, (frozen, trained)


@pytest.fixture
def marked(db, tmp_path, tiny_version):
    """The colour dataset, with marks (under any version) from each labelled
    image as a query on four others: right for the same colour."""
    dataset = make_dataset(tmp_path)
    images = list(Image.objects.filter(dataset=dataset).order_by("pk"))
    marks = []
    for i, query in enumerate(images):
        for result in (images[(i + 1) % len(images)], images[(i + 7) % len(images)], images[(i + 10) % len(images)],
                       images[(i + 20) % len(images)]):
            verdict = "right" if result.label == query.label else "wrong"
            marks.append(Feedback(model_version=tiny_version, query_image=query, result=result, verdict=verdict,
                                  session_key="s"))
    Feedback.objects.bulk_create(marks)
    return dataset


def test_the_train_command_trains_a_head_on_marks_alone_and_evaluates_on_held_out_marks(marked, tmp_path):
    # Marks alone: no labels needed to train (the test split keeps its labels, so the version is evaluated).
    Image.objects.filter(dataset=marked, split__in=("train", "val")).update(label=None)
    out = io.StringIO()
    call_command("train", "--dataset", "colours", "--head-only", "--marks", "only", "--epochs", "3",
                 "--batch-size", "16", "--lr", "0.01", "--image-size", "32", "--embedding-dim", "8",
                 "--no-progress", "--checkpoint-dir", str(tmp_path / "marks"), stdout=out)
    version = ModelVersion.objects.get(name="efficientnet_lite0-head-colours-ft-1")
    training = version.metrics["training"]
    assert training["config"]["marks"] == "only" and len(training["history"]) == 3
    assert version.dimension == 8 and version.embeddings.count() == 30
    train_queries = Feedback.objects.filter(query_image__split__in=("train",)).count()
    assert train_queries > 0 and "contrastive on marks" in training["objective"]
    # The new version was evaluated on the held-out marks (test-split queries).
    evaluation = version.metrics["evaluation"]["colours"]
    held_out = Feedback.objects.filter(query_image__split="test", result__dataset=marked).count()
    assert evaluation["marks_held_out"] == held_out > 0 and evaluation["marks_queries"] > 0
    assert 0 <= evaluation["marks_precision_at_k"] <= 1 and evaluation["marks_set"]
    assert "note: marks by source: 0 from signed-in users, " in out.getvalue()
    assert "from anonymous sessions" in out.getvalue()


def test_marks_from_signed_in_leaves_anonymous_marks_out(marked, tmp_path, django_user_model):
    from training.core.config import TrainConfig
    from training.rows import check_dataset, training_data

    config = TrainConfig(architecture="head", backbone="efficientnet_lite0", head="linear", marks="only",
                         marks_from="signed-in")
    with pytest.raises(ValueError, match="0 relevance mark.* by signed-in users"):
        check_dataset(marked, config)
    with pytest.raises(CommandError, match="by signed-in users"):
        call_command("train", "--dataset", "colours", "--head-only", "--marks", "only", "--marks-from",
                     "signed-in", "--epochs", "1")
    user = django_user_model.objects.create_user("sam", password="pw-123456")
    mine = list(Feedback.objects.filter(query_image__split="train", result__split__in=("train", "val"))
                .order_by("pk")[:12])
    Feedback.objects.filter(pk__in=[m.pk for m in mine]).update(user=user, session_key="")
    check_dataset(marked, config)  # right and wrong ones among the signed-in user's
    data = training_data(marked, marks=True, marks_from="signed-in")
    everyone = training_data(marked, marks=True)
    assert 0 < len(data.marks) < len(everyone.marks)
    assert data.mark_sources["anonymous_left_out"] == everyone.mark_sources["anonymous"] > 0
    assert data.mark_sources["signed_in"] == everyone.mark_sources["signed_in"] == len(data.marks)
    form = TrainForm({"architecture": "efficientnet_lite0", "head_only": "on", "head": "linear",
                      "objective": "auto", "epochs": 5, "batch_size": 64, "learning_rate": 1e-3,
                      "scheduler": "none", "early_stopping_patience": 3, "processes": 1, "marks": "only",
                      "marks_from": "signed-in"}, dataset=marked)
    assert form.is_valid(), form.errors
    assert form.config_fields()["marks_from"] == "signed-in"


def test_the_check_counts_only_marks_training_uses(db, tmp_path, tiny_version):
    """Marks whose result is a test image are dropped by training, so the check
    does not count them: with only such wrong marks, it refuses."""
    from training.core.config import TrainConfig
    from training.rows import check_dataset

    dataset = make_dataset(tmp_path)
    train = list(Image.objects.filter(dataset=dataset, split="train").order_by("pk"))
    test = list(Image.objects.filter(dataset=dataset, split="test").order_by("pk"))
    Feedback.objects.bulk_create(
        [Feedback(model_version=tiny_version, query_image=train[0], result=train[1], verdict="right",
                  session_key="s"),
         Feedback(model_version=tiny_version, query_image=train[0], result=test[0], verdict="wrong",
                  session_key="s")])
    config = TrainConfig(architecture="head", backbone="efficientnet_lite0", head="linear", marks="only")
    with pytest.raises(ValueError, match="1 relevance mark.* all of one verdict"):
        check_dataset(dataset, config)


def test_held_out_marks_are_measured_on_the_test_split(marked, tiny_version):
    from search.indexing import build_index
    from training.evaluation.retrieval import held_out_marks

    build_index(marked, tiny_version)
    result = held_out_marks(tiny_version, marked)
    test_marks = Feedback.objects.filter(query_image__split="test", result__dataset=marked).count()
    assert result["marks_held_out"] == test_marks > 0
    assert result["marks_queries"] > 0 and 0 <= result["marks_precision_at_k"] <= 1


def test_training_on_marks_is_refused_clearly(db, tmp_path, tiny_version):
    make_dataset(tmp_path)
    with pytest.raises(CommandError, match="relevance mark"):
        call_command("train", "--dataset", "colours", "--head-only", "--marks", "only", "--epochs", "1")
    with pytest.raises(CommandError, match="marks apply to head-only"):
        call_command("train", "--dataset", "colours", "--arch", "tiny", "--marks", "only")


def test_the_admin_form_offers_marks(marked):
    form = TrainForm({"architecture": "efficientnet_lite0", "head_only": "on", "head": "linear",
                      "objective": "auto", "epochs": 5, "batch_size": 64, "learning_rate": 1e-3,
                      "scheduler": "none", "early_stopping_patience": 3, "processes": 1, "marks": "with_labels"},
                     dataset=marked)
    assert form.is_valid(), form.errors
    assert form.config_fields()["marks"] == "with_labels"
    refused = TrainForm({"architecture": "tiny", "objective": "auto", "epochs": 5, "batch_size": 8,
                         "learning_rate": 1e-3, "scheduler": "none", "early_stopping_patience": 3, "processes": 1,
                         "marks": "only"}, dataset=marked)
    assert not refused.is_valid() and "head-only" in str(refused.errors)


def test_the_models_page_shows_p_at_k_on_held_out_marks(client, db, tiny_version):
    def change(metrics: dict) -> None:
        metrics["evaluation"] = {"colours": {"k": 10, "precision_at_k": 0.5, "marks_precision_at_k": 0.8126,
                                             "marks_queries": 4}}

    tiny_version.update_metrics(change)
    page = client.get("/models/", {"dataset": "colours"}).content.decode()
    assert "P@10 on marks" in page and "0.813" in page
