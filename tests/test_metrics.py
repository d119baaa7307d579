"""NDCG with graded labels."""

from __future__ import annotations

import math

import numpy as np

from shared.metrics import dcg_at_k, ndcg_at_k


def test_dcg_matches_hand_computation() -> None:
    assert math.isclose(dcg_at_k(np.array([3, 0, 1]), 3), 7 / math.log2(2) + 0 + 1 / math.log2(4))


def test_ndcg_is_one_for_ideal_order_and_less_otherwise() -> None:
    assert ndcg_at_k(np.array([3, 2, 1, 0]), 10) == 1.0
    assert 0 < ndcg_at_k(np.array([0, 1, 2, 3]), 10) < 1.0
    assert ndcg_at_k(np.array([0, 0]), 10) == 0.0


def test_ideal_includes_relevant_items_missing_from_the_list() -> None:
    full = ndcg_at_k(np.array([1, 0]), 10, all_relevant_labels=np.array([1, 3]))
    assert math.isclose(full, 1.0 / (7.0 + 1.0 / math.log2(3)))
