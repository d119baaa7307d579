"""Item vectors: collaborative factors from interactions, fused with text embeddings.

The fused vector of an item is ``[w_c * content, w_cf * collaborative]`` renormalised
to unit length, so an inner product is a cosine that blends "reads alike" with "is
bought by the same people". Items nobody interacted with keep a zero collaborative
half and are found by their text alone (cold start for new items).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from shared.config import IndexBuildSettings
from shared.data import Events
from shared.interactions import event_weights, recency_weights
from shared.logs import event

log = logging.getLogger(__name__)

Matrix = npt.NDArray[np.float32]


def interaction_matrix(events: Events, n_users: int, n_items: int) -> sp.csr_matrix:
    """Users x items confidence matrix: log-scaled sum of event weights."""
    matrix = sp.csr_matrix(
        (event_weights(events.event_code), (events.user_index, events.item_index)),
        shape=(n_users, n_items),
        dtype=np.float32,
    )
    matrix.sum_duplicates()
    matrix.data = np.log1p(matrix.data).astype(np.float32)
    return matrix


@dataclass(frozen=True)
class CollaborativeFactors:
    item_factors: Matrix  # (n_items, factors), zero rows for items without interactions
    user_factors: Matrix  # (n_users, factors)


def fit_collaborative(events: Events, n_users: int, n_items: int, settings: IndexBuildSettings) -> CollaborativeFactors:
    """Implicit-feedback ALS (the `implicit` library) on the confidence matrix."""
    from implicit.cpu.als import AlternatingLeastSquares

    matrix = interaction_matrix(events, n_users, n_items)
    # implicit asks for single-threaded BLAS (checked when the model is created):
    # its own threads do the parallel work.
    with threadpool_limits(limits=1, user_api="blas"):
        model = AlternatingLeastSquares(
            factors=settings.als_factors,
            regularization=settings.als_regularization,
            iterations=settings.als_iterations,
            random_state=settings.seed,
            calculate_training_loss=False,
        )
        model.fit(matrix, show_progress=False)
    item_factors = np.asarray(model.item_factors, dtype=np.float32)
    user_factors = np.asarray(model.user_factors, dtype=np.float32)
    seen_items = np.zeros(n_items, dtype=bool)
    seen_items[matrix.indices] = True
    item_factors[~seen_items] = 0.0
    event(
        log,
        "collaborative factors fitted",
        users=n_users,
        items=n_items,
        items_with_interactions=int(seen_items.sum()),
        factors=settings.als_factors,
    )
    return CollaborativeFactors(item_factors=item_factors, user_factors=user_factors)


def normalise_rows(matrix: npt.NDArray[np.floating]) -> Matrix:
    """Unit-length rows (zero rows stay zero); float64 inside, so huge or tiny values neither overflow nor vanish."""
    wide = matrix.astype(np.float64)
    norms = np.linalg.norm(wide, axis=1, keepdims=True)
    unit: Matrix = np.divide(wide, norms, out=np.zeros_like(wide), where=norms > 0).astype(np.float32)
    return unit


def fuse(content: Matrix, collaborative: Matrix, settings: IndexBuildSettings) -> Matrix:
    """Unit-length fused item vectors ``[w_c * content, w_cf * collaborative]``."""
    if len(content) != len(collaborative):
        raise ValueError(f"content has {len(content)} rows, collaborative {len(collaborative)}")
    fused = np.hstack(
        [
            settings.content_weight * normalise_rows(content),
            settings.collaborative_weight * normalise_rows(collaborative),
        ]
    ).astype(np.float32)
    return normalise_rows(fused)


def text_query(text_vector: Matrix, collaborative_dim: int, settings: IndexBuildSettings) -> Matrix:
    """Place a text embedding in the fused space (no collaborative half)."""
    padded = np.hstack(
        [
            settings.content_weight * normalise_rows(text_vector),
            np.zeros((len(text_vector), collaborative_dim), np.float32),
        ]
    )
    return normalise_rows(padded.astype(np.float32))


def relative_weights(weights: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """Weights scaled to a maximum of 1 (float64): only relative weights matter, so a
    client's decayed recency weights (1e-30) or huge counts (1e38) give the same direction."""
    relative = weights.astype(np.float64)
    largest = relative.max(initial=0.0)
    if largest > 0:
        relative /= largest
    return relative


def weighted_sum(
    item_vectors: npt.NDArray[np.floating], rows: npt.NDArray[np.int64], relative: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Sum of the given items' fused vectors times their relative weights; shape (1, d).

    Unnormalised, so the sums over disjoint sets of items (index shards) add up to the sum
    over all of them.
    """
    total: npt.NDArray[np.float64] = (relative[:, None] * item_vectors[rows].astype(np.float64)).sum(
        axis=0, keepdims=True
    )
    return total


def history_query(
    item_vectors: npt.NDArray[np.floating], rows: npt.NDArray[np.int64], weights: npt.NDArray[np.float32]
) -> Matrix:
    """Weighted mean of the given items' fused vectors, unit length; shape (1, d)."""
    return normalise_rows(weighted_sum(item_vectors, rows, relative_weights(weights)))


def user_queries(events: Events, item_vectors: Matrix, n_users: int, now: int, settings: IndexBuildSettings) -> Matrix:
    """One query vector per user from their last ``history_length`` events."""
    order = np.lexsort((-events.timestamp, events.user_index))
    users = events.user_index[order]
    starts = np.searchsorted(users, np.arange(n_users))
    rank_in_user = np.arange(len(users)) - starts[users]
    keep = order[rank_in_user < settings.history_length]
    weights = recency_weights(events.event_code[keep], events.timestamp[keep], now, settings.history_half_life_days)
    weight_matrix = sp.csr_matrix(
        (weights, (events.user_index[keep], events.item_index[keep])),
        shape=(n_users, len(item_vectors)),
        dtype=np.float32,
    )
    return normalise_rows(np.asarray(weight_matrix @ item_vectors, dtype=np.float32))
