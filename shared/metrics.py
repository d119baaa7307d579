"""Ranking quality metrics: graded NDCG for training, binary top-k metrics for evaluation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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


def top_k_metrics(
    recommended: Sequence[npt.NDArray[np.integer]], relevant: Sequence[npt.NDArray[np.integer]], k: int, n_items: int
) -> dict[str, float]:
    """Binary-relevance top-k metrics averaged over users, plus catalogue coverage.

    ``recommended[u]`` is user u's ranked list (item rows, at most ``k`` used) and
    ``relevant[u]`` the rows of their held-out items; users without held-out items are
    skipped. Conventions (those of the Microsoft Recommenders benchmarks): NDCG's ideal
    list has min(k, |relevant|) hits; precision divides by k, recall by |relevant|;
    AP@k averages precision at each hit over min(k, |relevant|); hit rate is the share
    of users with at least one hit; coverage is the share of the catalogue recommended
    to anyone.
    """
    if len(recommended) != len(relevant):
        raise ValueError(f"{len(recommended)} recommendation lists for {len(relevant)} users")
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ndcg, precision, recall, average_precision, hits = [], [], [], [], []
    shown: set[int] = set()
    for ranked, held_out in zip(recommended, relevant, strict=True):
        top = np.asarray(ranked[:k], dtype=np.int64)
        shown.update(top.tolist())
        if len(held_out) == 0:
            continue
        hit = np.isin(top, held_out).astype(np.float64)
        n_hits = float(hit.sum())
        ideal = min(k, len(held_out))
        ndcg.append(float(hit @ discount[: len(hit)]) / float(discount[:ideal].sum()))
        precision.append(n_hits / k)
        recall.append(n_hits / len(held_out))
        precision_at_hit = np.cumsum(hit) / np.arange(1, len(hit) + 1)
        average_precision.append(float((precision_at_hit * hit).sum()) / ideal)
        hits.append(1.0 if n_hits else 0.0)
    return {
        f"ndcg@{k}": mean(ndcg),
        f"precision@{k}": mean(precision),
        f"recall@{k}": mean(recall),
        f"map@{k}": mean(average_precision),
        f"hit_rate@{k}": mean(hits),
        "coverage": len(shown) / n_items if n_items else float("nan"),
        "users": float(len(ndcg)),
    }


def candidate_recall(
    candidates: Sequence[npt.NDArray[np.integer]], relevant: Sequence[npt.NDArray[np.integer]]
) -> float:
    """Share of all held-out items that appear among their user's candidates (micro-averaged)."""
    found = sum(int(np.isin(held_out, ranked).sum()) for ranked, held_out in zip(candidates, relevant, strict=True))
    total = sum(len(held_out) for held_out in relevant)
    return found / total if total else float("nan")
