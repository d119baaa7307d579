"""Business rules applied after the model: filters, then the top k."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class RuleInput:
    candidate_rows: npt.NDArray[np.int32]
    scores: npt.NDArray[np.float32]
    purchased_rows: npt.NDArray[np.int32]
    excluded_rows: npt.NDArray[np.int32]
    stock: npt.NDArray[np.int64]  # the whole catalogue's stock, by row


@dataclass(frozen=True)
class RuleOutcome:
    # Positions into the candidate arrays, best first, at most k.
    selected: npt.NDArray[np.int64]
    removed: dict[str, int] = field(default_factory=dict)


def apply_rules(rule_input: RuleInput, k: int) -> RuleOutcome:
    """Drop purchased, explicitly excluded and out-of-stock items; keep the best k."""
    rows = rule_input.candidate_rows
    keep = np.ones(len(rows), dtype=bool)
    removed: dict[str, int] = {}
    for rule, hit in (
        ("already_purchased", np.isin(rows, rule_input.purchased_rows)),
        ("excluded_by_request", np.isin(rows, rule_input.excluded_rows)),
        ("out_of_stock", rule_input.stock[rows] <= 0),
    ):
        removed[rule] = int((keep & hit).sum())
        keep &= ~hit
    positions = np.flatnonzero(keep)
    order = np.argsort(-rule_input.scores[positions], kind="stable")[:k]
    return RuleOutcome(selected=positions[order], removed=removed)
