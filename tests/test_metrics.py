"""Retrieval metrics against values computed by hand on tiny rankings."""

import math

import pytest

from training.evaluation.metrics import (
    QueryResult,
    average_precision_at_k,
    copy_detection_summary,
    precision_at_k,
    precision_curve,
    rank_with_ties,
    recall_at_k,
    summarize,
)

T, F = True, False


def test_precision_recall_and_ap_on_a_short_ranking():
    relevant = [T, F, T, F, F]
    assert precision_at_k(relevant, 3) == pytest.approx(2 / 3)
    assert precision_at_k(relevant, 5) == pytest.approx(2 / 5)
    assert recall_at_k(relevant, 3, n_relevant_total=4) == pytest.approx(2 / 4)
    # AP@3 = (P@1 + P@3) / min(3, 4) = (1 + 2/3) / 3
    assert average_precision_at_k(relevant, 3, 4) == pytest.approx(5 / 9)


def test_perfect_ranking_has_ap_one():
    assert average_precision_at_k([T, T, T, F], 3, 10) == pytest.approx(1.0)


def test_fewer_results_than_k_still_divides_precision_by_k():
    relevant = [T, T]  # only 2 results returned, k = 5
    assert precision_at_k(relevant, 5) == pytest.approx(2 / 5)
    assert recall_at_k(relevant, 5, 2) == pytest.approx(1.0)
    # AP@5 = (1 + 1) / min(5, 2)
    assert average_precision_at_k(relevant, 5, 2) == pytest.approx(1.0)


def test_fewer_relevant_items_than_k_bounds_the_ap_denominator():
    relevant = [F, T, T, F]
    # AP@4 = (P@2 + P@3) / min(4, 2) = (1/2 + 2/3) / 2
    assert average_precision_at_k(relevant, 4, 2) == pytest.approx(7 / 12)
    assert recall_at_k(relevant, 4, 2) == pytest.approx(1.0)
    assert precision_at_k(relevant, 4) == pytest.approx(2 / 4)


def test_no_relevant_item_in_the_collection_gives_none_for_recall_and_ap():
    relevant = [F, F, F]
    assert precision_at_k(relevant, 3) == 0.0
    assert recall_at_k(relevant, 3, 0) is None
    assert average_precision_at_k(relevant, 3, 0) is None


def test_empty_ranking_scores_zero():
    assert precision_at_k([], 10) == 0.0
    assert recall_at_k([], 10, 3) == 0.0
    assert average_precision_at_k([], 10, 3) == 0.0
    assert recall_at_k([], 10, 0) is None


def test_it_rejects_bad_arguments():
    with pytest.raises(ValueError):
        precision_at_k([T], 0)
    with pytest.raises(ValueError):
        recall_at_k([T, T], 2, 1)  # 2 hits cannot exceed 1 relevant item in total
    with pytest.raises(ValueError):
        average_precision_at_k([T], 1, -1)
    with pytest.raises(ValueError):
        QueryResult("q", "cat", [1, 2], [T], 1)


def test_rank_with_ties_orders_by_score_then_id():
    scores = [0.5, 0.9, 0.5, 0.9, 0.1]
    ids = ["c", "d", "a", "b", "e"]
    assert rank_with_ties(scores, ids) == ["b", "d", "a", "c", "e"]
    # The input order of tied items does not matter.
    assert rank_with_ties(scores[::-1], ids[::-1]) == ["b", "d", "a", "c", "e"]
    assert rank_with_ties([1.0, 1.0, 2.0], [7, 3, 9]) == [9, 3, 7]
    assert rank_with_ties([], []) == []


def test_rank_with_ties_refuses_nan_and_mismatched_lengths():
    with pytest.raises(ValueError):
        rank_with_ties([math.nan], [1])
    with pytest.raises(ValueError):
        rank_with_ties([1.0, 2.0], [1])


def three_queries() -> list[QueryResult]:
    return [
        # q1: P@4 = 3/4, R@4 = 3/5, AP@4 = (1 + 2/3 + 3/4) / min(4, 5) = 29/48,
        #     similar 3, dissimilar 1, ANN overlap |{11,12,13,14} ∩ {11,13,14,15}| / 4 = 3/4
        QueryResult(1, "cat", [11, 12, 13, 14], [T, F, T, T], 5, exact_ids=[11, 13, 14, 15]),
        # q2: only 2 results. P@4 = 1/4, R@4 = 1/1, AP@4 = (1/2) / min(4, 1) = 1/2,
        #     similar 1, dissimilar min(4, 2) - 1 = 1, ANN overlap 2/2 = 1
        QueryResult(2, "dog", [21, 22], [F, T], 1, exact_ids=[22, 21]),
        # q3: no relevant item exists. P@4 = 0, R and AP skipped,
        #     similar 0, dissimilar 4, no exact ids
        QueryResult(3, "bird", [31, 32, 33, 34, 35], [F, F, F, F, F], 0),
    ]


def test_summarize_on_three_queries():
    summary = summarize(three_queries(), 4)
    assert summary == {
        "k": 4,
        "n_queries": 3,
        "precision_at_k": pytest.approx((3 / 4 + 1 / 4 + 0) / 3),  # 1/3
        "recall_at_k": pytest.approx((3 / 5 + 1) / 2),  # 0.8, q3 skipped
        "map_at_k": pytest.approx((29 / 48 + 1 / 2) / 2),  # 53/96, q3 skipped
        "n_skipped_no_relevant": 1,
        "mean_similar": pytest.approx((3 + 1 + 0) / 3),
        "mean_dissimilar": pytest.approx((1 + 1 + 4) / 3),
        "ann_recall_at_k": pytest.approx((3 / 4 + 1) / 2),
        "n_ann_queries": 2,
    }


def test_summarize_without_exact_ids_or_relevant_items_reports_none():
    summary = summarize([QueryResult("q", "x", ["a"], [F], 0)], 10)
    assert summary["recall_at_k"] is None
    assert summary["map_at_k"] is None
    assert summary["n_skipped_no_relevant"] == 1
    assert summary["ann_recall_at_k"] is None
    assert summary["n_ann_queries"] == 0
    assert summary["mean_dissimilar"] == 1  # one result returned, not k


def test_summarize_and_curve_refuse_no_queries():
    with pytest.raises(ValueError):
        summarize([], 10)
    with pytest.raises(ValueError):
        precision_curve([])


def test_precision_curve():
    queries = three_queries()
    # k=1: (1 + 0 + 0)/3; k=2: (1/2 + 1/2 + 0)/3; k=5: (3/5 + 1/5 + 0)/3
    assert precision_curve(queries, ks=[1, 2, 5]) == pytest.approx([1 / 3, 1 / 3, 4 / 15])
    curve = precision_curve(queries)
    assert len(curve) == 50
    assert curve[3] == pytest.approx(summarize(queries, 4)["precision_at_k"])
    assert curve[49] == pytest.approx((3 / 50 + 1 / 50) / 3)


def test_copy_detection_summary():
    summary = copy_detection_summary({"crop": [1, 3, None, 12], "flip": [1, 1]})
    assert list(summary) == ["crop", "flip", "all"]
    assert summary["crop"] == {
        "n_queries": 4,
        "recall_at_1": pytest.approx(1 / 4),
        "recall_at_10": pytest.approx(2 / 4),  # 12 is found but not in the top 10
        "mean_rank": pytest.approx((1 + 3 + 12) / 3),  # over the found ones
        "n_found": 3,
        "n_not_found": 1,
    }
    assert summary["flip"] == {
        "n_queries": 2, "recall_at_1": 1.0, "recall_at_10": 1.0, "mean_rank": 1.0, "n_found": 2, "n_not_found": 0,
    }
    assert summary["all"] == {
        "n_queries": 6,
        "recall_at_1": pytest.approx(3 / 6),
        "recall_at_10": pytest.approx(4 / 6),
        "mean_rank": pytest.approx((1 + 3 + 12 + 1 + 1) / 5),
        "n_found": 5,
        "n_not_found": 1,
    }


def test_copy_detection_summary_edge_cases():
    summary = copy_detection_summary({"jpeg": [None, None], "rotate": []})
    assert summary["jpeg"]["mean_rank"] is None
    assert summary["jpeg"]["recall_at_1"] == 0.0
    assert summary["jpeg"]["n_not_found"] == 2
    assert summary["rotate"]["recall_at_10"] is None
    assert summary["rotate"]["n_queries"] == 0
    with pytest.raises(ValueError):
        copy_detection_summary({"all": [1]})
    with pytest.raises(ValueError):
        copy_detection_summary({"crop": [0]})  # ranks are 1-based
