"""The ranking service's in-process feature store: items, item statistics, user histories.

Everything is computed "as of" a time, so training can see the world exactly as it
was at a past request and serving sees it as of the snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from shared.config import ALL_TIME_POPULARITY, PopularityCounting, RankerBuildSettings
from shared.data import PURCHASE, VIEW, Dataset, Events
from shared.interactions import SECONDS_PER_DAY, decayed_counts, event_weights
from shared.item_model import fit_item_model

RECENT_WINDOW_DAYS = 7


@dataclass(frozen=True)
class ItemTable:
    """Static item attributes, row-aligned with the catalogue."""

    item_ids: npt.NDArray[np.str_]
    titles: npt.NDArray[np.str_]
    brands: npt.NDArray[np.str_]
    categories: npt.NDArray[np.str_]
    category_codes: npt.NDArray[np.int32]
    brand_codes: npt.NDArray[np.int32]
    prices: npt.NDArray[np.float64]
    stock: npt.NDArray[np.int64]
    created_at: npt.NDArray[np.int64]
    # Unit-length text embeddings (float16) for similarity features and reasons.
    content_vectors: npt.NDArray[np.float16]

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def n_categories(self) -> int:
        return int(self.category_codes.max()) + 1 if len(self.category_codes) else 0

    @property
    def n_brands(self) -> int:
        return int(self.brand_codes.max()) + 1 if len(self.brand_codes) else 0

    def row_of(self) -> dict[str, int]:
        return {item_id: row for row, item_id in enumerate(self.item_ids.tolist())}


def item_table(dataset: Dataset, content_vectors: npt.NDArray[np.float32]) -> ItemTable:
    catalog = dataset.catalog
    _, category_codes = np.unique(catalog.categories, return_inverse=True)
    _, brand_codes = np.unique(catalog.brands, return_inverse=True)
    return ItemTable(
        item_ids=catalog.item_ids,
        titles=catalog.titles,
        brands=catalog.brands,
        categories=catalog.categories,
        category_codes=category_codes.astype(np.int32),
        brand_codes=brand_codes.astype(np.int32),
        prices=catalog.prices,
        stock=catalog.stock,
        created_at=catalog.created_at,
        content_vectors=content_vectors.astype(np.float16),
    )


@dataclass(frozen=True)
class ItemStats:
    """Per-item interaction statistics as of ``as_of``."""

    as_of: int
    log_popularity: npt.NDArray[np.float32]
    log_recent_views: npt.NDArray[np.float32]
    log_purchases: npt.NDArray[np.float32]
    conversion_rate: npt.NDArray[np.float32]
    # Popularity as the served index counts it (decayed for next-event tasks: what is in
    # demand now), and the items in that order.
    log_popular_now: npt.NDArray[np.float32]
    popular_rows: npt.NDArray[np.int32]
    # (n_items, n_items) sparse: row i holds the items most often touched by the users
    # who touched i, as shrunk cosine similarities (see :func:`co_interactions`).
    co_interactions: sp.csr_matrix
    # (n_items, n_items) sparse EASE weights (shared/item_model.py); None or empty: no item
    # model (too many items), the item_model_* features are 0.
    item_model: sp.csr_matrix | None = None


def co_interactions(events: Events, n_items: int, settings: RankerBuildSettings) -> sp.csr_matrix:
    """Item-to-item similarity from users who touched both: the item-kNN signal.

    Each user counts with their newest ``co_interaction_history`` distinct items (heavy
    users would otherwise dominate and make the product quadratic); similarity is the
    co-occurrence count over ``sqrt(n_i * n_j) + shrink``, and each item keeps its
    ``co_interaction_neighbours`` best.
    """
    if not len(events):
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    order = np.lexsort((-events.timestamp, events.user_index))
    users, items = events.user_index[order], events.item_index[order]
    # Distinct (user, item) pairs, newest first within a user.
    pairs = users.astype(np.int64) * n_items + items
    _, first = np.unique(pairs, return_index=True)
    newest = np.sort(first)
    users, items = users[newest], items[newest]
    position = np.arange(len(users)) - np.searchsorted(users, users)
    keep = position < settings.co_interaction_history
    n_users = int(users.max()) + 1
    touched = sp.csr_matrix(
        (np.ones(int(keep.sum()), np.float32), (users[keep], items[keep])), shape=(n_users, n_items)
    )
    counts = np.asarray(touched.sum(axis=0), dtype=np.float64).ravel()
    together = (touched.T @ touched).tocoo()
    off_diagonal = together.row != together.col
    rows, cols = together.row[off_diagonal], together.col[off_diagonal]
    similarity = together.data[off_diagonal] / (np.sqrt(counts[rows] * counts[cols]) + settings.co_interaction_shrink)
    # Best neighbours first within each row, then the first ``neighbours`` of each row.
    best = np.lexsort((-similarity, rows))
    rows, cols, similarity = rows[best], cols[best], similarity[best]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)
    kept = rank < settings.co_interaction_neighbours
    return sp.csr_matrix(
        (similarity[kept].astype(np.float32), (rows[kept], cols[kept])), shape=(n_items, n_items), dtype=np.float32
    )


def item_stats(
    events: Events,
    n_items: int,
    as_of: int,
    settings: RankerBuildSettings,
    neighbours: sp.csr_matrix | None = None,
    stored_item_model: sp.csr_matrix | None = None,
    popularity: PopularityCounting = ALL_TIME_POPULARITY,
) -> ItemStats:
    """Statistics of the events before ``as_of``; ``neighbours`` and ``stored_item_model``: the
    co-interaction matrix and the item model when they were computed already (the ranker
    artifact stores them), else they are computed. ``popularity``: how ``popular_rows``
    are counted (as the retrieval index the ranker serves with counts them); the
    ``item_log_popularity`` feature counts all time either way, ``item_log_popular_now``
    as ``popular_rows`` do."""
    past = events.before(as_of)
    weights = event_weights(past.event_code).astype(np.float64)
    all_time = np.bincount(past.item_index, weights=weights, minlength=n_items)
    recent = past.select((past.timestamp >= as_of - RECENT_WINDOW_DAYS * SECONDS_PER_DAY) & (past.event_code == VIEW))
    recent_views = np.bincount(recent.item_index, minlength=n_items)
    views = np.bincount(past.item_index[past.event_code == VIEW], minlength=n_items)
    purchases = np.bincount(past.item_index[past.event_code == PURCHASE], minlength=n_items)
    # Smoothed towards the catalogue-wide rate so rarely seen items are not extreme.
    prior = (purchases.sum() + 1.0) / (views.sum() + 1.0)
    conversion = (purchases + 10.0 * prior) / (views + 10.0)
    popular_now = decayed_counts(past, n_items, as_of, popularity.half_life_days, popularity.prior_weight)
    return ItemStats(
        as_of=as_of,
        log_popularity=np.log1p(all_time).astype(np.float32),
        log_recent_views=np.log1p(recent_views).astype(np.float32),
        log_purchases=np.log1p(purchases).astype(np.float32),
        conversion_rate=conversion.astype(np.float32),
        log_popular_now=np.log1p(popular_now).astype(np.float32),
        popular_rows=np.argsort(-popular_now, kind="stable").astype(np.int32),
        co_interactions=neighbours if neighbours is not None else co_interactions(past, n_items, settings),
        item_model=(
            stored_item_model if stored_item_model is not None else fit_item_model(past, n_items, settings.item_model)
        ),
    )


@dataclass(frozen=True)
class UserHistory:
    """One user's events, newest first."""

    item_rows: npt.NDArray[np.int32]
    event_codes: npt.NDArray[np.int8]
    timestamps: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.item_rows)

    @staticmethod
    def empty() -> UserHistory:
        return UserHistory(np.zeros(0, np.int32), np.zeros(0, np.int8), np.zeros(0, np.int64))

    def purchased_rows(self) -> npt.NDArray[np.int32]:
        return np.unique(self.item_rows[self.event_codes == PURCHASE])

    def recent(self, limit: int) -> UserHistory:
        """The newest ``limit`` events."""
        return UserHistory(self.item_rows[:limit], self.event_codes[:limit], self.timestamps[:limit])


class UserHistoryStore:
    """Per-user event histories held in memory, sliced by time on demand.

    Histories are complete: rules such as "never recommend what was bought" need
    every purchase, however old; consumers that want a bounded amount of work take
    :meth:`UserHistory.recent`.
    """

    def __init__(self, events: Events, user_ids: npt.NDArray[np.str_]) -> None:
        order = np.lexsort((-events.timestamp, events.user_index))
        users = events.user_index[order]
        self._items = events.item_index[order]
        self._codes = events.event_code[order]
        self._times = events.timestamp[order]
        starts = np.searchsorted(users, np.arange(len(user_ids)))
        ends = np.searchsorted(users, np.arange(len(user_ids)), side="right")
        self._span = {
            user_id: (int(start), int(end))
            for user_id, start, end in zip(user_ids.tolist(), starts, ends, strict=True)
            if end > start
        }

    def __len__(self) -> int:
        return len(self._span)

    def history(self, user_id: str, before: int | None = None, limit: int | None = None) -> UserHistory:
        span = self._span.get(user_id)
        if span is None:
            return UserHistory.empty()
        start, end = span
        times = self._times[start:end]
        if before is not None:
            # Newest first: skip the events at or after ``before``.
            start += int(np.searchsorted(-times, -before, side="right"))
        if limit is not None:
            end = min(end, start + limit)
        return UserHistory(self._items[start:end], self._codes[start:end], self._times[start:end])
