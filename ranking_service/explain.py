"""Why an item was recommended: a reason string always, a full explanation on request.

:func:`reasons` gives one short reason per item (RecommendedItem.reason). With
``explain=true``, :func:`explanations` adds per returned item the anchor items (the
history or session items that led to it: retrieval's anchors when it sent them, else the
ranker's own closest history item by content and by co-interaction) and the top
LightGBM feature contributions (``pred_contrib``, computed for the returned rows only)
in words.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ranking_service.features import FEATURE_INDEX, FEATURE_NAMES, CandidateSet, FeatureMatrix, intent_verb
from ranking_service.scoring import RankerModel
from ranking_service.store import ItemStats, ItemTable

# Cosine between MiniLM texts above which two products read as "similar".
SIMILAR_CONTENT = 0.6
STRONG_BRAND_AFFINITY = 0.2
STRONG_CATEGORY_AFFINITY = 0.25
TOP_CONTRIBUTIONS = 3
MAX_ANCHORS = 3

# Per feature: what a positive and what a negative contribution means, for people.
# {brand}, {category} and {anchor} (the first anchor item's title) are filled in.
FEATURE_TEXT: dict[str, tuple[str, str]] = {
    "retrieval_score_relative": ("a close match to your recent items", "a looser match to your recent items"),
    "retrieval_content_score": ("reads like items you looked at", "reads unlike items you looked at"),
    "retrieval_collaborative_relative": ("shoppers with similar taste chose it", "few shoppers like you chose it"),
    "retrieval_rank": ("near the top of the matches for you", "further down the matches for you"),
    "retrieval_from_popular": ("popular with everyone", "picked for you rather than for everyone"),
    "item_log_popularity": ("popular with shoppers", "less popular with shoppers"),
    "item_log_recent_views": ("trending this week", "few views this week"),
    "item_log_popular_now": ("popular right now", "not much in demand lately"),
    "item_log_purchases": ("often bought", "rarely bought"),
    "item_conversion_rate": ("people who view it often buy it", "people who view it seldom buy it"),
    "item_log_price": ("its price", "its price"),
    "item_in_stock": ("in stock", "low on stock"),
    "item_age_days": ("how long it has been in the shop", "how long it has been in the shop"),
    "item_category": ("it is in {category}", "it is in {category}"),
    "user_log_events": ("how much you shop", "how much you shop"),
    "user_log_purchases": ("what you have bought so far", "what you have bought so far"),
    "user_days_since_last_event": ("when you last visited", "when you last visited"),
    "user_category_affinity": ("you often browse {category}", "you rarely browse {category}"),
    "user_brand_affinity": ("you often choose {brand}", "you rarely choose {brand}"),
    "user_category_purchase_affinity": ("you buy in {category}", "you rarely buy in {category}"),
    "price_log_ratio_to_user": ("priced like what you usually pick", "priced unlike what you usually pick"),
    "price_abs_log_ratio_to_user": ("close to your usual price", "far from your usual price"),
    "user_item_interactions": ("you looked at it before", "you have not looked at it yet"),
    "user_item_max_intent": ("you showed interest in it", "you have not shown interest in it"),
    "user_item_days_since": ("you saw it recently", "you saw it a while ago"),
    "session_length": ("what you are doing in this visit", "what you are doing in this visit"),
    "session_category_share": ("this visit is about {category}", "this visit is about other categories"),
    "session_brand_share": ("this visit is about {brand}", "this visit is about other brands"),
    "content_sim_recent_max": ("similar to {anchor}", "unlike what you looked at recently"),
    "content_sim_last": ("similar to the last item you looked at", "unlike the last item you looked at"),
    "co_interaction_score": ("shoppers who chose your items also chose it", "rarely chosen with your items"),
    "co_interaction_mean": ("often chosen along with your items", "rarely chosen along with your items"),
    "co_interaction_max": ("often chosen together with {anchor}", "rarely chosen together with your items"),
    "item_model_score": ("goes with the items you chose", "does not go with the items you chose"),
    "item_model_relative": ("among the best fits to your items", "a weaker fit to your items"),
    "item_model_rank": ("a top fit to your items", "further down the fits to your items"),
    "hour_of_day": ("the time of day", "the time of day"),
    "day_of_week": ("the day of the week", "the day of the week"),
    "device": ("the device you use", "the device you use"),
    "source_count": ("found several ways for you", "found one way for you"),
    "from_fused_source": ("matches your taste overall", "a weaker overall match"),
    "from_content_source": ("reads like items you looked at", "reads unlike items you looked at"),
    "from_collaborative_source": ("shoppers with similar taste chose it", "few shoppers like you chose it"),
    "from_covisitation_source": ("viewed in the same visits as {anchor}", "seldom viewed with your items"),
    "from_item_model_source": ("goes with {anchor}", "a weaker fit to your items"),
    "from_trending_source": ("trending now", "not trending now"),
    "from_trending_category_source": ("trending in a category you browse", "not trending in your categories"),
    "source_covisitation_score": ("often viewed together with {anchor}", "seldom viewed with your items"),
    "source_trending_score": ("trending now", "not trending now"),
    "source_trending_category_score": ("trending in a category you browse", "not trending in your categories"),
}
assert set(FEATURE_TEXT) == set(FEATURE_NAMES), "every feature needs its words"


@dataclass(frozen=True)
class Contribution:
    feature: str
    contribution: float
    text: str


@dataclass(frozen=True)
class Explanation:
    anchor_rows: tuple[int, ...]
    contributions: tuple[Contribution, ...]


def reasons(
    features: FeatureMatrix, positions: npt.NDArray[np.int64], candidate_rows: npt.NDArray[np.int32], items: ItemTable
) -> list[str]:
    """One reason per selected position, most specific evidence first."""
    values = features.values
    explained: list[str] = []
    for position in positions.tolist():
        row = int(candidate_rows[position])
        closest = int(features.closest_history_row[position])
        similarity = values[position, FEATURE_INDEX["content_sim_recent_max"]]
        if closest >= 0 and closest != row and similarity >= SIMILAR_CONTENT:
            verb = intent_verb(int(features.closest_history_code[position]))
            explained.append(f"similar to {items.titles[closest]} you {verb}")
        elif values[position, FEATURE_INDEX["user_item_interactions"]] > 0:
            explained.append("you looked at this recently")
        elif values[position, FEATURE_INDEX["user_brand_affinity"]] >= STRONG_BRAND_AFFINITY:
            explained.append(f"from {items.brands[row]}, a brand you like")
        elif values[position, FEATURE_INDEX["user_category_affinity"]] >= STRONG_CATEGORY_AFFINITY:
            explained.append(f"popular in {items.categories[row]}, which you browse")
        else:
            explained.append(f"popular in {items.categories[row]}")
    return explained


def anchor_rows(
    position: int,
    candidates: CandidateSet,
    features: FeatureMatrix,
    user_rows: npt.NDArray[np.int32],
    together: npt.NDArray[np.float32],
) -> tuple[int, ...]:
    """The history or session items (``user_rows``, newest first) that led to this candidate:
    retrieval's anchors when it sent them, else the closest by content and by co-interaction
    (``together``: the co-interaction of each of ``user_rows`` with this candidate)."""
    row = int(candidates.rows[position])
    mine = set(user_rows.tolist())
    found: list[int] = []
    if len(candidates.anchor_rows) > position:
        found = [int(r) for r in candidates.anchor_rows[position].tolist() if int(r) in mine and int(r) != row]
    if not found:
        closest = int(features.closest_history_row[position])
        if closest >= 0 and closest != row:
            found.append(closest)
        if len(user_rows):
            best = int(np.argmax(together))
            if together[best] > 0 and int(user_rows[best]) != row:
                found.append(int(user_rows[best]))
    return tuple(dict.fromkeys(found))[:MAX_ANCHORS]


def _words(feature: str, contribution: float, row: int, anchors: Sequence[int], items: ItemTable) -> str:
    up, down = FEATURE_TEXT[feature]
    template = up if contribution >= 0 else down
    anchor = str(items.titles[anchors[0]]) if anchors else "items you looked at"
    return template.format(brand=items.brands[row], category=items.categories[row], anchor=anchor)


def explanations(
    model: RankerModel,
    features: FeatureMatrix,
    positions: npt.NDArray[np.int64],
    candidates: CandidateSet,
    user_rows: npt.NDArray[np.int32],
    items: ItemTable,
    stats: ItemStats,
    threads: int = 1,
) -> list[Explanation]:
    """Anchors and the top contributions for the selected positions (only those rows are
    passed to ``pred_contrib``: the cost scales with k, not with the candidates)."""
    if not len(positions):
        return []
    # (k, features + 1): per-feature SHAP values, then the expected value.
    selected = features.values[positions]
    contributions = np.asarray(
        model.booster.predict(selected, pred_contrib=True, num_threads=threads), dtype=np.float64
    )[:, : len(FEATURE_NAMES)]
    if model.prior is not None:  # the prior is part of its feature's contribution
        contributions[:, model.prior.column] += model.prior.of(selected)
    # (user rows, selected): one sparse slice for the whole answer.
    together = np.asarray(stats.co_interactions[user_rows][:, candidates.rows[positions]].toarray(), np.float32)
    result: list[Explanation] = []
    for line, position in enumerate(positions.tolist()):
        row = int(candidates.rows[position])
        anchors = anchor_rows(position, candidates, features, user_rows, together[:, line])
        values = contributions[line]
        top = np.argsort(-np.abs(values), kind="stable")[:TOP_CONTRIBUTIONS]
        result.append(
            Explanation(
                anchor_rows=anchors,
                contributions=tuple(
                    Contribution(
                        feature=FEATURE_NAMES[column],
                        contribution=float(values[column]),
                        text=_words(FEATURE_NAMES[column], float(values[column]), row, anchors, items),
                    )
                    for column in top.tolist()
                    if values[column] != 0
                ),
            )
        )
    return result
