"""Ranking quality metrics over graded relevance labels."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt


def dcg_at_k(labels_in_rank_order: npt.NDArray[np.floating] | npt.NDArray[np.integer], k: int) -> float:
    """DCG with gain 2^label - 1 and log2 position discount (LightGBM's lambdarank convention)."""
    top = np.asarray(labels_in_rank_order[:k], dtype=np.float64)
    if not len(top):
        return 0.0
    return float(np.sum((np.power(2.0, top) - 1.0) / np.log2(np.arange(2, len(top) + 2))))


def ndcg_at_k(
    labels_in_rank_order: npt.NDArray[np.floating] | npt.NDArray[np.integer],
    k: int,
    all_relevant_labels: npt.NDArray[np.floating] | npt.NDArray[np.integer] | None = None,
) -> float:
    """NDCG@k of one ranked list.

    The ideal ordering comes from ``all_relevant_labels`` when given (every relevant
    item of the user, also those the list missed), else from the list itself.
    """
    ideal_pool = labels_in_rank_order if all_relevant_labels is None else all_relevant_labels
    ideal = dcg_at_k(np.sort(np.asarray(ideal_pool))[::-1], k)
    return dcg_at_k(labels_in_rank_order, k) / ideal if ideal > 0 else 0.0


def mean(values: Iterable[float]) -> float:
    collected = list(values)
    return float(np.mean(collected)) if collected else float("nan")
