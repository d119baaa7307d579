"""Stage 1 of a request: ask the retrieval service for candidates.

The query is the user's recent items (session first) weighted by recency and intent;
a user with neither gets the retrieval service's answer for the bare user id, which
is popular items for an id it does not know (cold start). When retrieval is down or
too slow, the stage answers from this service's own popular items and says so
(``degraded``): a recommendation that is less personal beats an error on a shop page.
With a sharded index, shards that fail leave the others' candidates (``partial``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ranking_service.features import CandidateSet, RequestContext
from ranking_service.fresh_items import FreshItems
from ranking_service.query import history_query
from ranking_service.retrieval_client import CandidateSource
from ranking_service.store import ItemTable, UserHistory
from shared.config import RankingSettings
from shared.errors import Unavailable
from shared.logs import event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievedSet:
    candidates: CandidateSet
    index_version: str
    # Why the fallback answered instead of retrieval ("" when retrieval answered).
    degraded_reason: str = ""
    # Sharded index: why some shards are missing from the candidates ("" when none is).
    partial_reason: str = ""


class CandidateStage:
    def __init__(
        self,
        items: ItemTable,
        item_row: dict[str, int],
        popular_rows: npt.NDArray[np.int32],
        retrieval: CandidateSource,
        settings: RankingSettings,
        fresh: FreshItems | None = None,
    ) -> None:
        self._items = items
        self._item_row = item_row
        self._popular_rows = popular_rows
        self._retrieval = retrieval
        self._settings = settings
        self._fresh = fresh

    def retrieve(
        self,
        user_id: str,
        history: UserHistory,
        context: RequestContext,
        extra_exclusions: npt.NDArray[np.int32],
        timeout_s: float,
    ) -> RetrievedSet:
        exclude = np.union1d(history.purchased_rows(), extra_exclusions).astype(np.int32)
        try:
            if timeout_s <= 0:
                raise Unavailable("no time left in the caller's deadline for the retrieval call")
            return self._from_retrieval(user_id, history, context, exclude, timeout_s)
        except Unavailable as error:
            if not self._settings.fallback_to_popular:
                raise
            event(log, "retrieval failed; answering from popular items", level=logging.WARNING, error=str(error))
            return self._fallback(exclude, reason="retrieval_unavailable")

    def _fallback(self, exclude: npt.NDArray[np.int32], reason: str) -> RetrievedSet:
        n = self._settings.candidates
        rows = self._popular_rows[: n + len(exclude)]
        rows = rows[~np.isin(rows, exclude)][:n]
        return RetrievedSet(
            candidates=CandidateSet(
                rows=rows.astype(np.int32),
                retrieval_scores=(1.0 / (1.0 + np.arange(len(rows)))).astype(np.float32),
                content_scores=np.zeros(len(rows), np.float32),
                collaborative_scores=np.zeros(len(rows), np.float32),
                from_popular=True,
            ),
            index_version="",
            degraded_reason=reason,
        )

    def _from_retrieval(
        self,
        user_id: str,
        history: UserHistory,
        context: RequestContext,
        exclude: npt.NDArray[np.int32],
        timeout_s: float,
    ) -> RetrievedSet:
        item_ids = self._items.item_ids
        exclude_ids = item_ids[exclude].tolist()
        n = self._settings.candidates
        if len(history) or len(context.session_rows):
            rows, weights = history_query(
                history,
                context.session_rows,
                context.timestamp,
                self._settings.history_length,
                self._settings.query_half_life_days,
            )
            retrieved = self._retrieval.by_history(item_ids[rows].tolist(), weights.tolist(), n, exclude_ids, timeout_s)
        else:
            retrieved = self._retrieval.by_user(user_id, n, exclude_ids, timeout_s)
        # Items upserted after the snapshot get rows from their attributes; other ids this
        # snapshot does not know (from a newer index) cannot be featurised.
        if self._fresh is not None and retrieved.fresh_items:
            self._fresh.register(retrieved.item_ids, retrieved.fresh_items)
        item_row = self._item_row
        known = np.asarray([item_id in item_row for item_id in retrieved.item_ids], dtype=bool)
        return RetrievedSet(
            candidates=CandidateSet(
                rows=np.asarray(
                    [item_row[item_id] for item_id in retrieved.item_ids if item_id in item_row], dtype=np.int32
                ),
                retrieval_scores=retrieved.scores[known],
                content_scores=retrieved.content_scores[known],
                collaborative_scores=retrieved.collaborative_scores[known],
                from_popular=retrieved.from_popular,
            ),
            index_version=retrieved.index_version,
            partial_reason=retrieved.partial_reason,
        )
