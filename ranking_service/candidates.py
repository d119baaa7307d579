"""Stage 1 of a request: ask the retrieval service for candidates.

The query is the user's recent items (session first) weighted by recency and intent;
a user with neither gets the retrieval service's answer for the bare user id, which
is popular items for an id it does not know (cold start), or, when the caller declared
preferences, the items matching them. A filter and the session items travel with the
query. When retrieval is down or
too slow, the stage answers from this service's own popular items and says so
(``degraded``): a recommendation that is less personal beats an error on a shop page.
With a sharded index, shards that fail leave the others' candidates (``partial``).
A ranker trained for next events (``ranker_build.popular_candidates``, recorded in its
artifact) also gets the most popular items for users with a history, after retrieval's
answer, as its training replay did.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from ranking_service.features import CandidateSet, RequestContext
from ranking_service.fresh_items import FreshItems
from ranking_service.query import history_query
from ranking_service.ragged import Ragged, rows_of
from ranking_service.retrieval_client import SOURCE_POPULAR, CandidateSource, RetrievalOptions, RetrievedCandidates
from ranking_service.store import ItemTable, UserHistory
from shared.config import RankingSettings
from shared.errors import Unavailable
from shared.logs import event
from shared.proto.vitrine.v1 import catalog_pb2

log = logging.getLogger(__name__)

Item = TypeVar("Item")

# RetrievedSet.partial_reason when the popular candidates' call failed: the answer holds
# retrieval's main candidates only.
PARTIAL_POPULAR_UNAVAILABLE = "popular_unavailable"


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
        popular_candidates: int = 0,
    ) -> None:
        self._items = items
        self._item_row = item_row
        self._popular_rows = popular_rows
        self._retrieval = retrieval
        self._settings = settings
        self._fresh = fresh
        self._popular_candidates = popular_candidates

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
        started = time.perf_counter()
        try:
            if timeout_s <= 0:
                raise Unavailable("no time left in the caller's deadline for the retrieval call")
            retrieved = self._from_retrieval(user_id, history, context, exclude, timeout_s, request)
        except Unavailable as error:
            if not self._settings.fallback_to_popular:
                raise
            event(log, "retrieval failed; answering from popular items", level=logging.WARNING, error=str(error))
            return self._fallback(exclude, reason="retrieval_unavailable", request=request)
        # Not after a partial answer: a shard that failed the search would fail this call too,
        # at the cost of its whole timeout again.
        wanted = self._popular_candidates and not retrieved.partial_reason
        if wanted and (len(history) or len(context.session_rows)):
            left_s = timeout_s - (time.perf_counter() - started)
            popular = self._popular(user_id, history, context, exclude, left_s, request)
            if popular is None:
                return dataclasses.replace(retrieved, partial_reason=PARTIAL_POPULAR_UNAVAILABLE)
            retrieved = dataclasses.replace(retrieved, candidates=joined_candidates(retrieved.candidates, popular))
        return retrieved

    def _popular(
        self,
        user_id: str,
        history: UserHistory,
        context: RequestContext,
        exclude: npt.NDArray[np.int32],
        timeout_s: float,
        request: CandidateRequest,
    ) -> CandidateSet | None:
        """The ``popular_candidates`` most popular items (as the index counts them), to join
        retrieval's answer: a next-event task's labels are largely what everyone turns to
        next (new releases, a season's items), which a user's own history rarely leads
        retrieval to (docs/evaluation.md). Asked of retrieval with the user's own query and
        a popular-only mix, so deleted items, live stock and shards hold for them as for
        every candidate, and they are scored by the query like the rest. Users without
        history or session get popular items (or their declared preferences) anyway. None
        when the call fails: retrieval's main answer is enough to rank (flagged partial),
        unless gaps are not allowed (training: ``fallback_to_popular`` off)."""
        popular_only = dataclasses.replace(request, mix=((SOURCE_POPULAR, 1.0),), anchors=False)
        try:
            if timeout_s <= 0:
                raise Unavailable("no time left in the caller's deadline for the popular candidates")
            answer = self._from_retrieval(
                user_id, history, context, exclude, timeout_s, popular_only, self._popular_candidates
            )
        except Unavailable as error:
            if not self._settings.fallback_to_popular:
                raise
            event(
                log,
                "popular candidates unavailable; ranking retrieval's answer",
                level=logging.WARNING,
                error=str(error),
            )
            return None
        return answer.candidates

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
        n: int | None = None,
    ) -> RetrievedSet:
        item_ids = self._items.item_ids
        exclude_ids = item_ids[exclude].tolist()
        n = n or self._settings.candidates
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


def joined_candidates(first: CandidateSet, second: CandidateSet) -> CandidateSet:
    """``first`` followed by the candidates of ``second`` it does not hold, every
    per-candidate field joined alike. Sources, their scores and anchors that only ``first``
    carries get empty entries for the rest; live stock only when both carry it."""
    new = ~np.isin(second.rows, first.rows)
    if not new.any():
        return first
    added = kept_candidates(second, new)
    return dataclasses.replace(
        first,
        rows=np.concatenate([first.rows, added.rows]).astype(np.int32),
        retrieval_scores=np.concatenate([first.retrieval_scores, added.retrieval_scores]),
        content_scores=np.concatenate([first.content_scores, added.content_scores]),
        collaborative_scores=np.concatenate([first.collaborative_scores, added.collaborative_scores]),
        sources=_joined(first.sources, added.sources, len(first.rows), len(added.rows)),
        # Scores stay aligned with sources, or the source-score features of every candidate
        # would be lost (features.py reads them only when both have one entry per candidate).
        source_scores=_joined(first.source_scores, added.source_scores, len(first.rows), len(added.rows)),
        anchor_rows=_joined_rows(first.anchor_rows, added.anchor_rows, len(first.rows), len(added.rows)),
        stock=None if first.stock is None or added.stock is None else np.concatenate([first.stock, added.stock]),
    )


def _joined(
    first: Sequence[tuple[Item, ...]], second: Sequence[tuple[Item, ...]], first_n: int, second_n: int
) -> Sequence[tuple[Item, ...]]:
    """Per-candidate entries of both (flat when ``first`` is: a columnar answer); empty when
    ``first`` carries none, empty entries for a ``second`` that carries none."""
    if len(first) != first_n or not first_n:
        return ()
    entries: Sequence[tuple[Item, ...]] = second if len(second) == second_n else ((),) * second_n
    if isinstance(first, Ragged):
        return first.extended(entries)
    return tuple(first) + tuple(entries)


def _joined_rows(
    first: Sequence[npt.NDArray[np.int32]], second: Sequence[npt.NDArray[np.int32]], first_n: int, second_n: int
) -> Sequence[npt.NDArray[np.int32]]:
    """Per-candidate anchor rows of both, as :func:`_joined` joins entries."""
    if len(first) != first_n or not first_n:
        return ()
    return tuple(first) + (tuple(second) if len(second) == second_n else (np.zeros(0, np.int32),) * second_n)


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
