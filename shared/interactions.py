"""How much an interaction says about interest: one definition for both services.

The retrieval service weighs history items with it to build query vectors; the
ranking service uses the same weights for affinities and for the query it sends, so
training and serving agree on what "recent, strong interest" means.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shared.data import CART, PURCHASE, VIEW, WISHLIST, Events

SECONDS_PER_DAY = 86_400.0

# Relative strength of one event of each type.
EVENT_CONFIDENCE: dict[int, float] = {VIEW: 1.0, WISHLIST: 2.0, CART: 3.0, PURCHASE: 5.0}
# Graded relevance labels for learning to rank (no interaction = 0).
EVENT_LABEL: dict[int, int] = {VIEW: 1, WISHLIST: 1, CART: 2, PURCHASE: 3}
# Level of intent, for "strongest interaction with this item" features: view < wishlist <
# cart < purchase. View, cart and purchase keep the values (code + 1) that rankers trained
# before wishlist existed learned on.
EVENT_INTENT: dict[int, float] = {VIEW: 1.0, WISHLIST: 1.5, CART: 2.0, PURCHASE: 3.0}


def event_weights(event_code: npt.NDArray[np.int8]) -> npt.NDArray[np.float32]:
    table = np.zeros(max(EVENT_CONFIDENCE) + 1, dtype=np.float32)
    for code, weight in EVENT_CONFIDENCE.items():
        table[code] = weight
    return table[event_code]


def event_intent(event_code: npt.NDArray[np.int8]) -> npt.NDArray[np.float32]:
    table = np.zeros(max(EVENT_INTENT) + 1, dtype=np.float32)
    for code, level in EVENT_INTENT.items():
        table[code] = level
    return table[event_code]


def event_labels(event_code: npt.NDArray[np.int8]) -> npt.NDArray[np.int32]:
    table = np.zeros(max(EVENT_LABEL) + 1, dtype=np.int32)
    for code, label in EVENT_LABEL.items():
        table[code] = label
    return table[event_code]


def recency_weights(
    event_code: npt.NDArray[np.int8], timestamp: npt.NDArray[np.int64], now: int, half_life_days: float
) -> npt.NDArray[np.float32]:
    """Intent weight times exponential time decay: recent purchases count most."""
    age_days = np.maximum(now - timestamp, 0) / SECONDS_PER_DAY
    decay = np.power(0.5, age_days / half_life_days)
    return (event_weights(event_code) * decay).astype(np.float32)


def decayed_counts(
    events: Events, n_items: int, cutoff: int, half_life_days: float | None, prior_weight: float = 0.0
) -> npt.NDArray[np.float32]:
    """Intent-weighted interactions per item as of ``cutoff``, each decayed with
    ``half_life_days`` (None: not decayed), plus ``prior_weight`` spread over the items by
    their all-time shares: with little weight in the recent window, the all-time order
    decides; with much, the recent one."""
    intent = event_weights(events.event_code).astype(np.float64)
    all_time = np.bincount(events.item_index, weights=intent, minlength=n_items)
    if half_life_days is None:
        counts = all_time
    else:
        decayed = recency_weights(events.event_code, events.timestamp, cutoff, half_life_days)
        counts = np.bincount(events.item_index, weights=decayed, minlength=n_items)
    if prior_weight > 0 and all_time.sum() > 0:
        counts = counts + prior_weight * all_time / all_time.sum()
    return counts.astype(np.float32)


def ranker_label_mask(events: Events, split: str, window: float, seed: int = 7, draw: int = 0) -> npt.NDArray[np.bool_]:
    """The events a ranker learns to predict; every other event is its history.

    ``global``: the events in the last ``window`` of the time range (one cutoff for all).
    ``per_user``: each user's newest ``round(window * n)`` events (at least one, and
    at least one left as history); users with a single event give no label.
    ``random``: the same number of each user's events, drawn at random (seed
    ``seed + draw``: draw i of ``ranker_build.label_draws``). Time splits have one draw.
    """
    if draw and split != "random":
        raise ValueError(f"label draw {draw} asked of the {split!r} split; only the random split has several draws")
    if split == "global":
        return np.asarray(events.timestamp >= events.time_at(1.0 - window))
    if split not in ("per_user", "random"):
        raise ValueError(f"unknown label split {split!r}; use 'global', 'per_user' or 'random'")
    if split == "per_user":
        order = np.lexsort((events.timestamp, events.user_index))
    else:
        order = np.lexsort((np.random.default_rng(seed + draw).random(len(events)), events.user_index))
    users = events.user_index[order]
    counts = np.bincount(users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(order)) - starts[users]  # per_user: 0 = the user's oldest event
    n = counts[users]
    labels_per_user = np.clip(np.rint(window * n), 1, np.maximum(n - 1, 0))
    mask = np.zeros(len(events), dtype=bool)
    mask[order] = position >= n - labels_per_user
    return mask
