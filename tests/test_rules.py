"""Business rules after the model."""

from __future__ import annotations

import numpy as np

from ranking_service.rules import RuleInput, apply_rules


def test_filters_then_top_k_by_score() -> None:
    rows = np.array([10, 11, 12, 13, 14, 15], dtype=np.int32)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], dtype=np.float32)
    stock = np.ones(20, dtype=np.int64)
    stock[13] = 0
    outcome = apply_rules(
        RuleInput(
            rows, scores, purchased_rows=np.array([10], np.int32), excluded_rows=np.array([12], np.int32), stock=stock
        ),
        k=2,
    )
    assert rows[outcome.selected].tolist() == [11, 14]
    assert outcome.removed == {"already_purchased": 1, "excluded_by_request": 1, "out_of_stock": 1}


def test_fewer_survivors_than_k() -> None:
    rows = np.array([1, 2], dtype=np.int32)
    outcome = apply_rules(
        RuleInput(
            rows, np.array([0.1, 0.2], np.float32), np.array([1], np.int32), np.zeros(0, np.int32), np.ones(3, np.int64)
        ),
        k=5,
    )
    assert rows[outcome.selected].tolist() == [2]
