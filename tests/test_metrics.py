"""Graded NDCG for training; binary top-k metrics and candidate recall for evaluation."""

from __future__ import annotations

import math

import numpy as np

from shared.metrics import candidate_recall, dcg_at_k, ndcg_at_k, top_k_metrics


def test_dcg_matches_hand_computation() -> None:
    assert math.isclose(dcg_at_k(np.array([3, 0, 1]), 3), 7 / math.log2(2) + 0 + 1 / math.log2(4))


def test_ndcg_is_one_for_ideal_order_and_less_otherwise() -> None:
    assert ndcg_at_k(np.array([3, 2, 1, 0]), 10) == 1.0
    assert 0 < ndcg_at_k(np.array([0, 1, 2, 3]), 10) < 1.0
    assert ndcg_at_k(np.array([0, 0]), 10) == 0.0


def test_ideal_includes_relevant_items_missing_from_the_list() -> None:
    full = ndcg_at_k(np.array([1, 0]), 10, all_relevant_labels=np.array([1, 3]))
    assert math.isclose(full, 1.0 / (7.0 + 1.0 / math.log2(3)))


def test_top_k_metrics_match_hand_computation() -> None:
    recommended = [np.array([1, 2, 3]), np.array([4, 5, 6]), np.array([7, 8, 9])]
    relevant = [np.array([2, 5]), np.array([], dtype=np.int64), np.array([7, 8, 9, 0])]
    metrics = top_k_metrics(recommended, relevant, k=3, n_items=20)
    # user 0: one hit at rank 2 of 2 relevant; user 1: nothing held out, skipped; user 2: 3 hits of 4.
    ndcg_0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert math.isclose(metrics["ndcg@3"], (ndcg_0 + 1.0) / 2)
    assert math.isclose(metrics["precision@3"], (1 / 3 + 1) / 2)
    assert math.isclose(metrics["recall@3"], (1 / 2 + 3 / 4) / 2)
    # AP@3: precision at each hit, over min(k, |relevant|): user 0 (1/2)/2, user 2 (1+1+1)/3.
    assert math.isclose(metrics["map@3"], (0.25 + 1.0) / 2)
    assert metrics["hit_rate@3"] == 1.0
    assert math.isclose(metrics["coverage"], 9 / 20)
    assert metrics["users"] == 2


def test_top_k_metrics_only_count_the_first_k() -> None:
    metrics = top_k_metrics([np.array([9, 9 + 1, 1])], [np.array([1])], k=2, n_items=11)
    assert metrics["ndcg@2"] == 0.0
    assert metrics["hit_rate@2"] == 0.0
    assert math.isclose(metrics["coverage"], 2 / 11)


def test_candidate_recall_is_micro_averaged() -> None:
    candidates = [np.array([1, 2, 3]), np.array([4])]
    relevant = [np.array([1, 9]), np.array([4, 5, 6])]
    assert math.isclose(candidate_recall(candidates, relevant), 2 / 5)
