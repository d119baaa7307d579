"""Ranking features: one row per candidate, computed vectorised for a whole request.

The same :class:`FeatureBuilder` serves training (with the world as of a past
request) and serving, so there is no train/serve skew. ``docs/features.md`` lists
what each feature means.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ranking_service.ragged import Ragged
from ranking_service.store import ItemStats, ItemTable, UserHistory
from shared.data import CART, DEVICES, PURCHASE, WISHLIST
from shared.interactions import SECONDS_PER_DAY, event_intent, event_weights

FEATURE_NAMES: tuple[str, ...] = (
    "retrieval_score_relative",
    "retrieval_content_score",
    "retrieval_collaborative_relative",
    "retrieval_rank",
    "retrieval_from_popular",
    "item_log_popularity",
    "item_log_recent_views",
    "item_log_popular_now",
    "item_log_purchases",
    "item_conversion_rate",
    "item_log_price",
    "item_in_stock",
    "item_age_days",
    "item_category",
    "user_log_events",
    "user_log_purchases",
    "user_days_since_last_event",
    "user_category_affinity",
    "user_brand_affinity",
    "user_category_purchase_affinity",
    "price_log_ratio_to_user",
    "price_abs_log_ratio_to_user",
    "user_item_interactions",
    "user_item_max_intent",
    "user_item_days_since",
    "session_length",
    "session_category_share",
    "session_brand_share",
    "content_sim_recent_max",
    "content_sim_last",
    "co_interaction_score",
    "co_interaction_mean",
    "co_interaction_max",
    "item_model_score",
    "item_model_relative",
    "item_model_rank",
    "hour_of_day",
    "day_of_week",
    "device",
    "source_count",
    "from_fused_source",
    "from_content_source",
    "from_collaborative_source",
    "from_covisitation_source",
    "from_item_model_source",
    "from_trending_source",
    "from_trending_category_source",
    "source_covisitation_score",
    "source_trending_score",
    "source_trending_category_score",
)
CATEGORICAL_FEATURES: tuple[str, ...] = ("item_category", "device")
FEATURE_INDEX = {name: column for column, name in enumerate(FEATURE_NAMES)}

# History items compared by content similarity (most recent first).
RECENT_FOR_SIMILARITY = 5
# Features look at the newest events only: bounded work per request for heavy users.
MAX_HISTORY_FOR_FEATURES = 500
# "Never" for day counts: a large finite number keeps trees and logs simple.
NEVER_DAYS = 365.0
# Retrieval source tags (Candidate.sources) -> the indicator feature of each.
SOURCE_FEATURES: dict[str, str] = {
    "ann": "from_fused_source",
    "content": "from_content_source",
    "collaborative": "from_collaborative_source",
    "covisitation": "from_covisitation_source",
    "item_model": "from_item_model_source",
    "trending": "from_trending_source",
    "trending_category": "from_trending_category_source",
}
# Sources whose own score is a feature, relative to the request's best (their scales are
# sums of co-visits or decayed counts, which move with the dataset).
SOURCE_SCORE_FEATURES: dict[str, str] = {
    "covisitation": "source_covisitation_score",
    "trending": "source_trending_score",
    "trending_category": "source_trending_category_score",
}


@dataclass(frozen=True)
class RequestContext:
    timestamp: int
    device: str
    # Items seen in the current session, newest first (catalogue rows).
    session_rows: npt.NDArray[np.int32]


@dataclass(frozen=True)
class CandidateSet:
    rows: npt.NDArray[np.int32]
    retrieval_scores: npt.NDArray[np.float32]
    # The text and collaborative parts of retrieval_scores (zeros for popular items).
    content_scores: npt.NDArray[np.float32]
    collaborative_scores: npt.NDArray[np.float32]
    from_popular: bool
    # Per candidate, the retrieval sources that proposed it ("collaborative", "covisitation"...);
    # empty when the answer did not say (the popular-items fallback). A columnar retrieval
    # answer keeps them flat (ranking_service/ragged.py).
    sources: Sequence[tuple[str, ...]] = ()
    # Per candidate, each source's score, in the order of ``sources``.
    source_scores: Sequence[tuple[float, ...]] = ()
    # Per candidate, catalogue rows of the history or session items that led retrieval to it,
    # strongest first; empty when unknown.
    anchor_rows: Sequence[npt.NDArray[np.int32]] = ()
    # Per candidate, the stock retrieval reports now (UpdateStock applies at once); None: use
    # the snapshot's stock.
    stock: npt.NDArray[np.int64] | None = None


@dataclass(frozen=True)
class FeatureMatrix:
    values: npt.NDArray[np.float32]  # (n_candidates, len(FEATURE_NAMES))
    # For each candidate, the recent history item it is most similar to (-1: none).
    closest_history_row: npt.NDArray[np.int32]
    closest_history_code: npt.NDArray[np.int8]


def _share(codes: npt.NDArray[np.int32], weights: npt.NDArray[np.float32], size: int) -> npt.NDArray[np.float32]:
    totals = np.bincount(codes, weights=weights, minlength=size).astype(np.float32)
    total = float(totals.sum())
    return totals / total if total > 0 else totals


class FeatureBuilder:
    def __init__(self, items: ItemTable, stats: ItemStats) -> None:
        self._items = items
        self._stats = stats

    def _log_prices(self, rows: npt.NDArray[np.int32]) -> npt.NDArray[np.float32]:
        # Per request, not cached: fresh items (ranking_service/fresh_items.py) fill rows later.
        return np.log(self._items.prices[rows]).astype(np.float32)

    def build(self, history: UserHistory, context: RequestContext, candidates: CandidateSet) -> FeatureMatrix:
        items, stats = self._items, self._stats
        rows = candidates.rows
        n = len(rows)
        values = np.zeros((n, len(FEATURE_NAMES)), dtype=np.float32)

        def put(name: str, column: npt.ArrayLike) -> None:
            values[:, FEATURE_INDEX[name]] = column

        now = context.timestamp
        # Relative to the request's best: raw inner products change scale with every index
        # build (ALS settings are re-tuned), and the ranker outlives the index it trained on.
        scores = candidates.retrieval_scores.astype(np.float64)
        top = float(np.abs(scores).max()) if n else 0.0
        put("retrieval_score_relative", scores / top if top > 0 else scores)
        # The text part is a weighted cosine (fixed scale); the collaborative part is an
        # ALS-style score whose scale moves with the ALS settings, so it is relative too.
        put("retrieval_content_score", candidates.content_scores)
        collaborative = candidates.collaborative_scores.astype(np.float64)
        top_collaborative = float(np.abs(collaborative).max()) if n else 0.0
        put(
            "retrieval_collaborative_relative",
            collaborative / top_collaborative if top_collaborative > 0 else collaborative,
        )
        put("retrieval_rank", np.arange(n, dtype=np.float32))
        put("retrieval_from_popular", float(candidates.from_popular))
        put("item_log_popularity", stats.log_popularity[rows])
        put("item_log_recent_views", stats.log_recent_views[rows])
        put("item_log_popular_now", stats.log_popular_now[rows])
        put("item_log_purchases", stats.log_purchases[rows])
        put("item_conversion_rate", stats.conversion_rate[rows])
        put("item_log_price", self._log_prices(rows))
        stock = candidates.stock if candidates.stock is not None and len(candidates.stock) == n else items.stock[rows]
        put("item_in_stock", (stock > 0).astype(np.float32))
        put("item_age_days", np.maximum(now - items.created_at[rows], 0) / SECONDS_PER_DAY)
        put("item_category", items.category_codes[rows])

        history = history.recent(MAX_HISTORY_FOR_FEATURES)
        hist_rows = history.item_rows
        weights = event_weights(history.event_codes)
        purchases = history.event_codes == PURCHASE
        put("user_log_events", np.log1p(len(history)))
        put("user_log_purchases", np.log1p(int(purchases.sum())))
        days_since_last = (now - int(history.timestamps[0])) / SECONDS_PER_DAY if len(history) else NEVER_DAYS
        put("user_days_since_last_event", days_since_last)

        category_share = _share(items.category_codes[hist_rows], weights, items.n_categories)
        brand_share = _share(items.brand_codes[hist_rows], weights, items.n_brands)
        purchase_share = _share(
            items.category_codes[hist_rows[purchases]], np.ones(int(purchases.sum()), np.float32), items.n_categories
        )
        put("user_category_affinity", category_share[items.category_codes[rows]])
        put("user_brand_affinity", brand_share[items.brand_codes[rows]])
        put("user_category_purchase_affinity", purchase_share[items.category_codes[rows]])

        if len(history):
            user_log_price = float(np.average(self._log_prices(hist_rows), weights=weights))
            ratio = self._log_prices(rows) - user_log_price
        else:
            ratio = np.zeros(n, dtype=np.float32)
        put("price_log_ratio_to_user", ratio)
        put("price_abs_log_ratio_to_user", np.abs(ratio))

        same_item = rows[:, None] == hist_rows[None, :]  # (n, len(history))
        put("user_item_interactions", same_item.sum(axis=1))
        put(
            "user_item_max_intent",
            np.where(same_item, event_intent(history.event_codes)[None, :], 0).max(axis=1, initial=0),
        )
        last_seen = np.where(same_item, history.timestamps[None, :], -1).max(axis=1, initial=-1)
        put("user_item_days_since", np.where(last_seen >= 0, (now - last_seen) / SECONDS_PER_DAY, NEVER_DAYS))

        session = context.session_rows
        put("session_length", len(session))
        if len(session):
            session_categories = np.bincount(items.category_codes[session], minlength=items.n_categories) / len(session)
            session_brands = np.bincount(items.brand_codes[session], minlength=items.n_brands) / len(session)
            put("session_category_share", session_categories[items.category_codes[rows]])
            put("session_brand_share", session_brands[items.brand_codes[rows]])

        # Session items are the freshest signal, then the stored history.
        recent = np.concatenate([session, hist_rows])[:RECENT_FOR_SIMILARITY]
        recent_codes = np.concatenate([np.zeros(len(session), np.int8), history.event_codes])[:RECENT_FOR_SIMILARITY]
        closest_row = np.full(n, -1, dtype=np.int32)
        closest_code = np.zeros(n, dtype=np.int8)
        if len(recent):
            similarity = (
                items.content_vectors[rows].astype(np.float32) @ items.content_vectors[recent].astype(np.float32).T
            )
            best = similarity.argmax(axis=1)
            put("content_sim_recent_max", similarity[np.arange(n), best])
            put("content_sim_last", similarity[:, 0])
            closest_row = recent[best].astype(np.int32)
            closest_code = recent_codes[best]

        # Item-to-item: how strongly the users who touched the history items also touched
        # each candidate, summed with intent weights (session items weigh as views).
        anchors = np.concatenate([session, hist_rows])
        if len(anchors):
            anchor_weights = np.concatenate([np.ones(len(session), np.float32), weights]).astype(np.float64)
            similar = stats.co_interactions[anchors][:, rows]  # (anchors, candidates), sparse
            score = np.asarray(similar.T @ anchor_weights).ravel()
            put("co_interaction_score", score)
            put("co_interaction_mean", score / anchor_weights.sum())
            put("co_interaction_max", similar.max(axis=0).toarray().ravel())
            self._item_model_features(anchors, anchor_weights, rows, put)

        self._source_features(candidates, put)

        moment = dt.datetime.fromtimestamp(now, dt.UTC)
        put("hour_of_day", moment.hour)
        put("day_of_week", moment.weekday())
        put("device", DEVICES.index(context.device) if context.device in DEVICES else -1)
        return FeatureMatrix(values=values, closest_history_row=closest_row, closest_history_code=closest_code)

    def _item_model_features(
        self,
        anchors: npt.NDArray[np.int32],
        anchor_weights: npt.NDArray[np.float64],
        rows: npt.NDArray[np.int32],
        put: Callable[[str, npt.ArrayLike], None],
    ) -> None:
        """EASE score of each candidate given the anchors (weighted as for co-interactions),
        relative to the request's best, and the candidate's rank by it (0 = best)."""
        model = self._stats.item_model
        if model is None or not model.nnz or not len(rows):
            return
        score = np.asarray(model[anchors][:, rows].T @ anchor_weights).ravel()
        top = float(np.abs(score).max())
        rank = np.empty(len(rows), dtype=np.float32)
        rank[np.argsort(-score, kind="stable")] = np.arange(len(rows), dtype=np.float32)
        put("item_model_score", score)
        put("item_model_relative", score / top if top > 0 else score)
        put("item_model_rank", rank)

    @staticmethod
    def _source_features(candidates: CandidateSet, put: Callable[[str, npt.ArrayLike], None]) -> None:
        """Which retrieval sources proposed each candidate, and the scores of some of them."""
        n = len(candidates.rows)
        if len(candidates.sources) != n:
            return
        flags = {name: np.zeros(n, np.float32) for name in SOURCE_FEATURES.values()}
        scores = {name: np.zeros(n, np.float64) for name in SOURCE_SCORE_FEATURES.values()}
        sources, source_scores = candidates.sources, candidates.source_scores
        if (
            isinstance(sources, Ragged)
            and isinstance(source_scores, Ragged)
            and np.array_equal(sources.offsets, source_scores.offsets)
        ):
            # Flat (a columnar answer): the same values without a loop over candidates.
            tags = np.asarray(sources.values, dtype=np.str_)
            owners = sources.owners
            flat_scores = np.asarray(source_scores.values, dtype=np.float64)
            for tag, name in SOURCE_FEATURES.items():
                flags[name][owners[tags == tag]] = 1.0
            for tag, name in SOURCE_SCORE_FEATURES.items():
                match = tags == tag
                scores[name][owners[match]] = flat_scores[match]
            put("source_count", sources.counts.astype(np.float32))
        else:
            has_scores = len(source_scores) == n
            for position, tags_of in enumerate(sources):
                values = source_scores[position] if has_scores else ()
                for slot, tag in enumerate(tags_of):
                    if tag in SOURCE_FEATURES:
                        flags[SOURCE_FEATURES[tag]][position] = 1.0
                    if tag in SOURCE_SCORE_FEATURES and slot < len(values):
                        scores[SOURCE_SCORE_FEATURES[tag]][position] = values[slot]
            put("source_count", np.asarray([len(tags_of) for tags_of in sources], np.float32))
        for name, column in flags.items():
            put(name, column)
        for name, score in scores.items():
            top = float(score.max(initial=0.0))
            put(name, score / top if top > 0 else score)


INTENT_VERB = {PURCHASE: "bought", CART: "added to your cart", WISHLIST: "added to your wishlist"}


def intent_verb(code: int) -> str:
    return INTENT_VERB.get(code, "viewed")
