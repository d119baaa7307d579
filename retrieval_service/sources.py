"""Candidate sources and their merge by quota.

Each source is a small component: it gets the query (:class:`SourceQuery`: the fused query
vector, the history/session anchors with their weights, the rows a filter allows) and
proposes rows with its own scores (:class:`SourceAnswer`). :func:`merge` takes from every
source its share of ``n`` (de-duplicated: an item proposed by several sources appears once,
tagged with all of them), lets unused quota flow to the sources that have more, and orders
the result by the fused query's exact inner product when there is a query vector.

Sources (names as in ``retrieval.sources`` and ``RetrieveRequest.mix``):

``fused``          ANN over the fused vector (candidates tagged ``ann``, as before sources)
``content``        ANN with the text half of the query only (the collaborative half zeroed)
``collaborative``  ANN with the collaborative half only
``covisitation``   items co-visited in sessions with the anchors, scores summed with weights
``item_model``     EASE: the item model's weights summed over the anchors (each counts once)
``trending``       time-decayed popularity with a short half-life
``trending_category``  trending items of the anchors' categories, weighted by their share
``popular``        popularity (the answer for a query with no vector and no anchors)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from retrieval_service.artifact import LoadedIndex
from retrieval_service.source_tables import COVISITATION, ITEM_MODEL, NeighbourTable, SourceTables
from retrieval_service.vectors import unit_halves

FUSED, CONTENT, COLLABORATIVE = "fused", "content", "collaborative"
TRENDING, TRENDING_CATEGORY, POPULAR = "trending", "trending_category", "popular"
SOURCE_NAMES: tuple[str, ...] = (
    FUSED,
    CONTENT,
    COLLABORATIVE,
    COVISITATION,
    ITEM_MODEL,
    TRENDING,
    TRENDING_CATEGORY,
    POPULAR,
)
# The tag a candidate carries for a source (the fused ANN keeps its historical name).
TAG = {name: ("ann" if name == FUSED else name) for name in SOURCE_NAMES}
MAX_ANCHORS = 3


@dataclass(frozen=True)
class SourceQuery:
    # The fused query, shape (1, d); None when the query has no vector (cold start).
    vector: npt.NDArray[np.float32] | None
    # History and session items (ids, they may live on another shard) and their weights.
    anchor_ids: Sequence[str]
    anchor_weights: npt.NDArray[np.float64]
    # Rows that may be returned: the filter with the exclusions removed. None: no filter.
    allowed: npt.NDArray[np.bool_] | None
    exclude: npt.NDArray[np.int64]
    exact_filter_below: int

    def blocked(self, size: int) -> npt.NDArray[np.bool_]:
        """Rows 0..size-1 that may not be returned (a source asks about its own rows only;
        upserted rows beyond a table's end are not its rows)."""
        if self.allowed is None:
            blocked = np.zeros(size, dtype=bool)
        else:
            blocked = np.ones(size, dtype=bool)
            blocked[: min(size, len(self.allowed))] = ~self.allowed[:size]
        blocked[self.exclude[self.exclude < size]] = True
        return blocked


@dataclass(frozen=True)
class SourceAnswer:
    rows: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    # Per row, the anchor ids that led to it (strongest first); empty when the source has none.
    anchors: list[list[str]] = field(default_factory=list)
    # Per row, its stored vector, when the source had it at hand (an unfiltered ANN search).
    vectors: npt.NDArray[np.float32] | None = None


EMPTY = SourceAnswer(np.zeros(0, np.int64), np.zeros(0, np.float32))


class CandidateSourceComponent(Protocol):
    name: str

    @property
    def available(self) -> bool:
        """False when this index lacks what the source needs (it would answer nothing)."""
        ...

    def propose(self, query: SourceQuery, n: int) -> SourceAnswer: ...


class AnnSource:
    """ANN over the index with the whole query (fused) or one half of it."""

    available = True

    def __init__(self, name: str, loaded: LoadedIndex) -> None:
        self.name = name
        self._loaded = loaded

    def propose(self, query: SourceQuery, n: int) -> SourceAnswer:
        if query.vector is None:
            return EMPTY
        vector = query.vector.copy()
        split = self._loaded.content_dim
        if self.name == CONTENT:
            vector[:, split:] = 0.0
        elif self.name == COLLABORATIVE:
            vector[:, :split] = 0.0
        if not np.any(vector):
            return EMPTY
        index = self._loaded.index
        if query.allowed is None:
            rows, scores, vectors = index.search_with_vectors(vector, n, query.exclude)
            return SourceAnswer(rows, scores, vectors=vectors)
        rows, scores = index.search_allowed(vector, n, query.allowed, query.exact_filter_below)
        return SourceAnswer(rows, scores)


def _top(rows: npt.NDArray[np.int64], scores: npt.NDArray[np.float64], n: int) -> npt.NDArray[np.int64]:
    """Positions of the ``n`` best scores, best first (ties by row, so answers are stable)."""
    order = np.lexsort((rows, -scores))
    return order[:n]


class NeighbourSource:
    """Items next to the anchors in a neighbour table (co-visitation, the item model), their
    scores summed over the anchors.

    ``weighted``: each anchor's scores count with its weight (co-visitation: recent and
    purchased items lead). Otherwise every anchor with a positive weight counts once: the item
    model's weights were fitted on a binary user x item matrix, and recency weights (14-day
    half-life) cost its NDCG@10 0.482 -> 0.433 on MovieLens 100K (random split).
    """

    def __init__(
        self, name: str, loaded: LoadedIndex, table: Callable[[SourceTables], NeighbourTable], weighted: bool
    ) -> None:
        self.name = name
        self._loaded = loaded
        self._table = table
        self._weighted = weighted

    @property
    def available(self) -> bool:
        return bool(self._table(self._loaded.sources))

    def propose(self, query: SourceQuery, n: int) -> SourceAnswer:
        table = self._table(self._loaded.sources)
        if not table or not len(query.anchor_ids):
            return EMPTY
        rows_parts, score_parts, anchor_parts = [], [], []
        for position, (anchor, weight) in enumerate(zip(query.anchor_ids, query.anchor_weights.tolist(), strict=True)):
            neighbours, scores = table.of(anchor)
            if len(neighbours) and weight > 0:
                rows_parts.append(neighbours.astype(np.int64))
                score_parts.append(scores.astype(np.float64) * (weight if self._weighted else 1.0))
                anchor_parts.append(np.full(len(neighbours), position, np.int64))
        if not rows_parts:
            return EMPTY
        rows, contributions, anchors = (np.concatenate(p) for p in (rows_parts, score_parts, anchor_parts))
        keep = ~query.blocked(self._loaded.index.size)[rows]
        rows, contributions, anchors = rows[keep], contributions[keep], anchors[keep]
        unique, inverse = np.unique(rows, return_inverse=True)
        totals = np.asarray(np.bincount(inverse, weights=contributions, minlength=len(unique)), dtype=np.float64)
        best = _top(unique, totals, n)
        # Per chosen row, the anchors that contributed most.
        order = np.lexsort((-contributions, inverse))
        grouped_rows, grouped_anchors = inverse[order], anchors[order]
        starts = np.searchsorted(grouped_rows, best)
        ends = np.searchsorted(grouped_rows, best, side="right")
        anchor_ids = [
            [query.anchor_ids[int(a)] for a in grouped_anchors[start : min(end, start + MAX_ANCHORS)]]
            for start, end in zip(starts.tolist(), ends.tolist(), strict=True)
        ]
        return SourceAnswer(unique[best], totals[best].astype(np.float32), anchor_ids)


class TrendingSource:
    available = True

    def __init__(self, loaded: LoadedIndex) -> None:
        self.name = TRENDING
        self._loaded = loaded

    def propose(self, query: SourceQuery, n: int) -> SourceAnswer:
        if query.vector is None and not len(query.anchor_ids):
            return EMPTY  # a cold-start query is answered by popular items
        tables = self._loaded.sources
        order = tables.trending_order
        order = order[~query.blocked(len(order))[order]]
        order = order[tables.trending[order] > 0][:n]
        return SourceAnswer(order, tables.trending[order])


class TrendingCategorySource:
    available = True

    def __init__(self, loaded: LoadedIndex) -> None:
        self.name = TRENDING_CATEGORY
        self._loaded = loaded

    def propose(self, query: SourceQuery, n: int) -> SourceAnswer:
        tables = self._loaded.sources
        item_row = self._loaded.item_row
        if not tables.has_attributes or not len(query.anchor_ids):
            return EMPTY
        local = [
            (item_row[item], weight)
            for item, weight in zip(query.anchor_ids, query.anchor_weights.tolist(), strict=True)
            if item in item_row
        ]
        if not local:
            return EMPTY
        codes = tables.category_codes[np.asarray([row for row, _ in local], dtype=np.int64)]
        share = np.bincount(codes, weights=[w for _, w in local], minlength=len(tables.category_names))
        if share.sum() <= 0:
            return EMPTY
        share = share / share.sum()
        blocked = query.blocked(len(tables.trending))
        rows_parts, score_parts = [], []
        for code in np.flatnonzero(share > 0).tolist():
            ordered = tables.category_trending_order[tables.category_bounds[code] : tables.category_bounds[code + 1]]
            ordered = ordered[~blocked[ordered]][:n]
            rows_parts.append(ordered)
            score_parts.append(share[code] * tables.trending[ordered].astype(np.float64))
        rows, scores = np.concatenate(rows_parts), np.concatenate(score_parts)
        positive = scores > 0
        rows, scores = rows[positive], scores[positive]
        best = _top(rows, scores, n)
        return SourceAnswer(rows[best], scores[best].astype(np.float32))


class PopularSource:
    available = True

    def __init__(self, loaded: LoadedIndex) -> None:
        self.name = POPULAR
        self._loaded = loaded

    def propose(self, query: SourceQuery, n: int) -> SourceAnswer:
        loaded = self._loaded
        if query.allowed is None:
            # Without a filter only the exclusions block rows, so the answer lies among the
            # first n + len(exclude) in popularity order: no pass over the whole catalogue
            # (2.5 ms a call at 1M items, paid by every next-event ranking request).
            head = len(query.exclude) + n
            rows = loaded.popular_rows[:head].astype(np.int64)
            keep = ~np.isin(rows, query.exclude)
            ranks = loaded.popular_ranks[:head]
        else:
            rows = loaded.popular_rows.astype(np.int64)
            keep = ~query.blocked(loaded.index.size)[rows]
            ranks = loaded.popular_ranks
        rows, ranks = rows[keep][:n], ranks[keep][:n]
        # Score from the rank in the whole catalogue, in (0, 1]: comparable in scale with a
        # cosine, monotone in popularity, and the same on every shard, so shards' answers merge.
        return SourceAnswer(rows, (1.0 / (1.0 + ranks)).astype(np.float32))


def make_sources(loaded: LoadedIndex) -> dict[str, CandidateSourceComponent]:
    return {
        FUSED: AnnSource(FUSED, loaded),
        CONTENT: AnnSource(CONTENT, loaded),
        COLLABORATIVE: AnnSource(COLLABORATIVE, loaded),
        COVISITATION: NeighbourSource(COVISITATION, loaded, lambda tables: tables.covisitation, weighted=True),
        ITEM_MODEL: NeighbourSource(ITEM_MODEL, loaded, lambda tables: tables.item_model, weighted=False),
        TRENDING: TrendingSource(loaded),
        TRENDING_CATEGORY: TrendingCategorySource(loaded),
        POPULAR: PopularSource(loaded),
    }


def quotas(shares: Sequence[float], n: int) -> list[int]:
    """``n`` split by ``shares`` (largest remainder, so the quotas add up to ``n``)."""
    total = float(sum(shares))
    if total <= 0 or n <= 0:
        return [0] * len(shares)
    exact = [share / total * n for share in shares]
    floors = [int(value) for value in exact]
    left = n - sum(floors)
    for position in sorted(range(len(shares)), key=lambda i: (floors[i] - exact[i], i))[:left]:
        floors[position] += 1
    return floors


@dataclass(frozen=True)
class Merged:
    """The merged candidates, in merge order (see :func:`merge`)."""

    rows: npt.NDArray[np.int64]
    # Per candidate: the source that ranked it best, every source with its score, anchors.
    primary: list[str]
    sources: list[list[str]]
    source_scores: list[list[float]]
    anchors: list[list[str]]


def merge(answers: dict[str, SourceAnswer], shares: dict[str, float], n: int) -> Merged:
    """Take each source's share of ``n`` from its answer, skipping items already taken (they
    are tagged instead); unused quota is redistributed over the sources with items left
    (by their shares) until ``n`` items are taken or every answer is used up."""
    names = [name for name in shares if shares[name] > 0 and name in answers]
    # Every source's view of every row: rank and score (for tags and the primary source).
    seen: dict[int, dict[str, tuple[int, float]]] = {}
    listed = {name: answers[name].rows.tolist() for name in names}
    for name in names:
        for rank, (row, score) in enumerate(zip(listed[name], answers[name].scores.tolist(), strict=True)):
            seen.setdefault(row, {})[name] = (rank, score)
    taken: list[int] = []
    taken_set: set[int] = set()
    cursor = dict.fromkeys(names, 0)
    active = [name for name in names if len(answers[name].rows)]
    while len(taken) < n and active:
        for name, quota in zip(active, quotas([shares[name] for name in active], n - len(taken)), strict=True):
            rows = listed[name]
            while quota > 0 and cursor[name] < len(rows):
                row = rows[cursor[name]]
                cursor[name] += 1
                if row not in taken_set:
                    taken.append(row)
                    taken_set.add(row)
                    quota -= 1
        active = [name for name in active if cursor[name] < len(listed[name])]
    order = {name: position for position, name in enumerate(names)}
    primary, tags, scores, anchors = [], [], [], []
    anchor_of: dict[int, list[str]] = {}
    for name in names:
        answer = answers[name]
        for row, row_anchors in zip(answer.rows.tolist(), answer.anchors, strict=False):
            anchor_of.setdefault(row, row_anchors)
    for row in taken:
        views = seen[row]
        names_of = sorted(views, key=lambda name: (views[name][0], order[name])) if len(views) > 1 else list(views)
        primary.append(TAG[names_of[0]])
        tags.append([TAG[name] for name in names_of])
        scores.append([views[name][1] for name in names_of])
        anchors.append(anchor_of.get(row, []))
    return Merged(np.asarray(taken, dtype=np.int64), primary, tags, scores, anchors)


def inner_product_anchors(
    candidate_vectors: npt.NDArray[np.float32],
    anchor_vectors: npt.NDArray[np.float32],
    anchor_ids: Sequence[str],
    anchor_weights: npt.NDArray[np.float64],
    content_dim: int,
) -> list[list[str]]:
    """Per candidate, the anchors whose weighted inner product with it is largest (up to 3)."""
    if not len(anchor_ids) or not len(candidate_vectors):
        return [[] for _ in range(len(candidate_vectors))]
    units = unit_halves(anchor_vectors, content_dim).astype(np.float32)
    products = (unit_halves(candidate_vectors, content_dim).astype(np.float32) @ units.T) * anchor_weights[None, :]
    best = np.argsort(-products, axis=1, kind="stable")[:, :MAX_ANCHORS]
    named: list[list[str]] = np.asarray(anchor_ids, dtype=object)[best].tolist()
    return named
