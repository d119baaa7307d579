"""The retrieval query the ranking service sends: the user's recent items, weighted."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ranking_service.store import UserHistory
from shared.data import VIEW
from shared.interactions import recency_weights


def history_query(
    history: UserHistory,
    session_rows: npt.NDArray[np.int32],
    now: int,
    limit: int,
    half_life_days: float,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Rows and weights (session first, then stored history), at most ``limit``."""
    rows = np.concatenate([session_rows.astype(np.int32), history.item_rows])[:limit]
    codes = np.concatenate([np.full(len(session_rows), VIEW, np.int8), history.event_codes])[:limit]
    times = np.concatenate([np.full(len(session_rows), now, np.int64), history.timestamps])[:limit]
    return rows, recency_weights(codes, times, now, half_life_days)
