"""Stage 1 of a request: ask the retrieval service for candidates.

The query is the user's recent items (session first) weighted by recency and intent;
a user with neither gets the retrieval service's answer for the bare user id, which
is popular items for an id it does not know (cold start), or, when the caller declared
preferences, the items matching them. A filter and the session items travel with the
query. When retrieval is down or
too slow, the stage answers from this service's own popular items and says so
(``degraded``): a recommendation that is less personal beats an error on a shop page.
With a sharded index, shards that fail leave the others' candidates (``partial``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from ranking_service.features import CandidateSet, RequestContext
from ranking_service.fresh_items import FreshItems
from ranking_service.query import history_query
from ranking_service.ragged import Ragged, rows_of
from ranking_service.retrieval_client import CandidateSource, RetrievalOptions, RetrievedCandidates
from ranking_service.store import ItemTable, UserHistory
from shared.config import RankingSettings
from shared.errors import Unavailable
from shared.logs import event
from shared.proto.vitrine.v1 import catalog_pb2

log = logging.getLogger(__name__)

Item = TypeVar("Item")


@dataclass(frozen=True)
class RetrievedSet:
    candidates: CandidateSet
    index_version: str
    # Why the fallback answered instead of retrieval ("" when retrieval answered).
    degraded_reason: str = ""
    # Sharded index: why some shards are missing from the candidates ("" when none is).
    partial_reason: str = ""


@dataclass(frozen=True)
class CandidateRequest:
    """What the caller asked for besides the user: declared preferences (used when the user
    has no history and no session), a filter applied inside the index search, and the
    candidate mix of the user's experiment variant."""

    preferences: catalog_pb2.DeclaredPreferences | None = None
    item_filter: catalog_pb2.ItemFilter | None = None
    # (source, share): the candidate mix of the user's experiment variant; empty: retrieval's own.
    mix: tuple[tuple[str, float], ...] = ()
    # Retrieval's per-candidate anchors; only explanations (explain = true) read them.
    anchors: bool = True


NO_REQUEST = CandidateRequest()


def _declared(preferences: catalog_pb2.DeclaredPreferences | None) -> bool:
    return preferences is not None and bool(preferences.brands or preferences.categories)


def filter_mask(items: ItemTable, item_filter: catalog_pb2.ItemFilter) -> npt.NDArray[np.bool_]:
    """The rows the filter allows, from this service's snapshot (the popular-items fallback)."""
    mask = np.ones(len(items), dtype=bool)
    if item_filter.categories:
        mask &= np.isin(items.categories, list(item_filter.categories))
    if item_filter.brands:
        mask &= np.isin(items.brands, list(item_filter.brands))
    if item_filter.HasField("price_min"):
        mask &= items.prices >= item_filter.price_min
    if item_filter.HasField("price_max"):
        mask &= items.prices <= item_filter.price_max
    if item_filter.in_stock_only:
        mask &= items.stock > 0
    return mask


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
        request: CandidateRequest = NO_REQUEST,
    ) -> RetrievedSet:
        exclude = np.union1d(history.purchased_rows(), extra_exclusions).astype(np.int32)
        try:
            if timeout_s <= 0:
                raise Unavailable("no time left in the caller's deadline for the retrieval call")
            return self._from_retrieval(user_id, history, context, exclude, timeout_s, request)
        except Unavailable as error:
            if not self._settings.fallback_to_popular:
                raise
            event(log, "retrieval failed; answering from popular items", level=logging.WARNING, error=str(error))
            return self._fallback(exclude, reason="retrieval_unavailable", request=request)

    def _fallback(
        self, exclude: npt.NDArray[np.int32], reason: str, request: CandidateRequest = NO_REQUEST
    ) -> RetrievedSet:
        n = self._settings.candidates
        rows = self._popular_rows
        if request.item_filter is not None:
            rows = rows[filter_mask(self._items, request.item_filter)[rows]]
        rows = rows[: n + len(exclude)]
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
        request: CandidateRequest = NO_REQUEST,
    ) -> RetrievedSet:
        item_ids = self._items.item_ids
        exclude_ids = item_ids[exclude].tolist()
        n = self._settings.candidates
        options = RetrievalOptions(
            item_filter=request.item_filter,
            mix=request.mix,
            session_item_ids=item_ids[context.session_rows].tolist(),
            anchors=request.anchors,
        )
        retrieved: RetrievedCandidates
        if len(history) or len(context.session_rows):
            rows, weights = history_query(
                history,
                context.session_rows,
                context.timestamp,
                self._settings.history_length,
                self._settings.query_half_life_days,
            )
            retrieved = self._retrieval.by_history(
                item_ids[rows].tolist(), weights.tolist(), n, exclude_ids, timeout_s, options
            )
        elif request.preferences is not None and _declared(request.preferences):
            retrieved = self._retrieval.by_preferences(request.preferences, n, exclude_ids, timeout_s, options)
        else:
            retrieved = self._retrieval.by_user(user_id, n, exclude_ids, timeout_s, options)
        # Items upserted after the snapshot get rows from their attributes; other ids this
        # snapshot does not know (from a newer index) cannot be featurised.
        if self._fresh is not None and retrieved.fresh_items:
            self._fresh.register(retrieved.item_ids, retrieved.fresh_items)
        item_row = self._item_row
        all_rows = np.fromiter(
            (item_row.get(item_id, -1) for item_id in retrieved.item_ids), np.int64, len(retrieved.item_ids)
        )
        known = all_rows >= 0
        return RetrievedSet(
            candidates=CandidateSet(
                rows=all_rows[known].astype(np.int32),
                retrieval_scores=retrieved.scores[known],
                content_scores=retrieved.content_scores[known],
                collaborative_scores=retrieved.collaborative_scores[known],
                from_popular=retrieved.from_popular,
                sources=_kept(retrieved.sources, known),
                source_scores=_kept(retrieved.source_scores, known),
                anchor_rows=_anchor_rows(retrieved.anchor_ids, item_row, known),
                stock=retrieved.stock[known] if retrieved.stock is not None else None,
            ),
            index_version=retrieved.index_version,
            partial_reason=retrieved.partial_reason,
        )


def kept_candidates(candidates: CandidateSet, keep: npt.NDArray[np.bool_]) -> CandidateSet:
    """The candidates ``keep`` allows, every per-candidate field cut alike, order kept."""
    if bool(np.all(keep)):
        return candidates
    anchors = candidates.anchor_rows
    return CandidateSet(
        rows=candidates.rows[keep],
        retrieval_scores=candidates.retrieval_scores[keep],
        content_scores=candidates.content_scores[keep],
        collaborative_scores=candidates.collaborative_scores[keep],
        from_popular=candidates.from_popular,
        sources=_kept(candidates.sources, keep),
        source_scores=_kept(candidates.source_scores, keep),
        anchor_rows=tuple(rows for rows, kept in zip(anchors, keep.tolist(), strict=True) if kept)
        if len(anchors) == len(keep)
        else (),
        stock=candidates.stock[keep] if candidates.stock is not None else None,
    )


def _kept(values: Sequence[tuple[Item, ...]], known: npt.NDArray[np.bool_]) -> Sequence[tuple[Item, ...]]:
    """The entries of the known candidates (empty when the answer carried none)."""
    if len(values) != len(known):
        return ()
    if isinstance(values, Ragged):
        return values if bool(np.all(known)) else values.kept(known)
    return tuple(value for value, keep in zip(values, known.tolist(), strict=True) if keep)


def _anchor_rows(
    anchor_ids: Sequence[tuple[str, ...]], item_row: dict[str, int], known: npt.NDArray[np.bool_]
) -> Sequence[npt.NDArray[np.int32]]:
    """Per known candidate, the rows of its anchors this snapshot knows (empty when the
    answer carried no anchors)."""
    if len(anchor_ids) != len(known):
        return ()
    if isinstance(anchor_ids, Ragged):
        return rows_of(anchor_ids, item_row, known)
    return tuple(
        np.asarray([item_row[a] for a in anchors if a in item_row], dtype=np.int32)
        for anchors, keep in zip(anchor_ids, known.tolist(), strict=True)
        if keep
    )
