"""How much an interaction says about interest: one definition for both services.

The retrieval service weighs history items with it to build query vectors; the
ranking service uses the same weights for affinities and for the query it sends, so
training and serving agree on what "recent, strong interest" means.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shared.data import CART, PURCHASE, VIEW

SECONDS_PER_DAY = 86_400.0

# Relative strength of one event of each type.
EVENT_CONFIDENCE: dict[int, float] = {VIEW: 1.0, CART: 3.0, PURCHASE: 5.0}
# Graded relevance labels for learning to rank (no interaction = 0).
EVENT_LABEL: dict[int, int] = {VIEW: 1, CART: 2, PURCHASE: 3}


def event_weights(event_code: npt.NDArray[np.int8]) -> npt.NDArray[np.float32]:
    table = np.zeros(max(EVENT_CONFIDENCE) + 1, dtype=np.float32)
    for code, weight in EVENT_CONFIDENCE.items():
        table[code] = weight
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
