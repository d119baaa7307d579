"""Candidate generation: turn a query into the best ``n`` items of the loaded index."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from retrieval_service.artifact import LoadedIndex
from retrieval_service.sources import (
    FUSED,
    POPULAR,
    SOURCE_NAMES,
    TAG,
    SourceQuery,
    inner_product_anchors,
    make_sources,
    merge,
)
from retrieval_service.vectors import query_vector, relative_weights, text_query, unit_halves, weighted_sum
from shared.config import SourceShare, default_sources
from shared.errors import FailedPrecondition, InvalidArgument, NotFound

SOURCE_ANN = "ann"
SOURCE_POPULAR = "popular"
MAX_TEXT_CHARS = 2000
# Names listed when a request names an unknown brand or category.
KNOWN_NAMES_SHOWN = 5
# Exact filtered search below this many matching items (RetrievalSettings.exact_filter_below).
EXACT_FILTER_BELOW = 5000
PREFERENCE_ITEMS = 200

TextEncoder = Callable[[str], npt.NDArray[np.float32]]


@dataclass(frozen=True)
class Candidates:
    item_ids: list[str]
    scores: list[float]
    # The text and collaborative parts of each score (zeros for popular items).
    content_scores: list[float]
    collaborative_scores: list[float]
    source: str
    index_version: str
    dimension: int
    shard: int
    shard_count: int
    # Per candidate: the source that ranked it best, every source that proposed it with that
    # source's score, the history/session items that led to it, and the current stock.
    primary_sources: list[str] = field(default_factory=list)
    sources: list[list[str]] = field(default_factory=list)
    source_scores: list[list[float]] = field(default_factory=list)
    anchors: list[list[str]] = field(default_factory=list)
    stock: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ItemFilterSpec:
    """Restrict candidates: category in ``categories`` and brand in ``brands`` (each when
    given), price in [price_min, price_max], stock > 0 with ``in_stock_only``."""

    categories: Sequence[str] = ()
    brands: Sequence[str] = ()
    price_min: float | None = None
    price_max: float | None = None
    in_stock_only: bool = False

    @property
    def empty(self) -> bool:
        return (
            not self.categories
            and not self.brands
            and self.price_min is None
            and self.price_max is None
            and not self.in_stock_only
        )


@dataclass(frozen=True)
class Preferences:
    """Declared tastes of a user with no history: brand OR category, within the price band."""

    brands: Sequence[str] = ()
    categories: Sequence[str] = ()
    price_min: float | None = None
    price_max: float | None = None


@dataclass(frozen=True)
class QueryOptions:
    """What a query may carry besides itself (all optional)."""

    filter: ItemFilterSpec | None = None
    # (source, share) pairs; empty: the configured mix.
    mix: Sequence[tuple[str, float]] = ()
    # Items of the current session, newest first: anchors and part of the query.
    session_item_ids: Sequence[str] = ()
    # False: no per-candidate anchors (RetrieveRequest.without_anchors).
    with_anchors: bool = True


NO_OPTIONS = QueryOptions()


@dataclass(frozen=True)
class QueryPart:
    """This index's part of a query vector (see the QueryVector RPC)."""

    vector: npt.NDArray[np.float32]  # shape (d,); empty when the index holds none of the query
    known: int
    index_version: str
    dimension: int
    shard: int
    shard_count: int


@dataclass(frozen=True)
class TextQueryEncoder:
    """The text model, as the index build used it (``model_id`` must match the index)."""

    encode: TextEncoder
    model_id: str


def anchor_items(
    item_ids: Sequence[str], weights: npt.NDArray[np.float64], session_item_ids: Sequence[str]
) -> tuple[list[str], npt.NDArray[np.float64]]:
    """History items (a repeated item's weights summed, first position kept), then the session
    items the history does not hold, each with weight 1 (the largest relative weight)."""
    summed: dict[str, float] = {}
    for item_id, weight in zip(item_ids, weights.tolist(), strict=True):
        summed[item_id] = summed.get(item_id, 0.0) + weight
    for item_id in session_item_ids:
        summed.setdefault(item_id, 1.0)
    return list(summed), np.asarray(list(summed.values()), dtype=np.float64)


class Retriever:
    def __init__(
        self,
        loaded: LoadedIndex,
        max_candidates: int,
        max_exclusions: int,
        text_encoder: TextQueryEncoder | None = None,
        mix: Sequence[SourceShare] | None = None,
        exact_filter_below: int = EXACT_FILTER_BELOW,
        preference_items: int = PREFERENCE_ITEMS,
    ) -> None:
        self._loaded = loaded
        self._max_candidates = max_candidates
        self._max_exclusions = max_exclusions
        self._text_encoder = text_encoder
        self._mix: dict[str, float] = {
            entry.source: entry.share for entry in (mix if mix is not None else default_sources())
        }
        self._exact_filter_below = exact_filter_below
        self._preference_items = preference_items
        self._sources = make_sources(loaded)

    @property
    def loaded(self) -> LoadedIndex:
        return self._loaded

    @property
    def _content_dim(self) -> int:
        return self._loaded.content_dim

    def _query(self, summed: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
        return query_vector(summed, self._content_dim, self._loaded.build)

    def _check_n(self, n: int) -> None:
        if not 1 <= n <= self._max_candidates:
            raise InvalidArgument(f"n must be between 1 and {self._max_candidates}, got {n}", field="n")

    def _exclusions(self, item_ids: Sequence[str]) -> npt.NDArray[np.int64]:
        if len(item_ids) > self._max_exclusions:
            raise InvalidArgument(
                f"exclude_item_ids has {len(item_ids)} ids; at most {self._max_exclusions} are accepted",
                field="exclude_item_ids",
            )
        rows = [self._loaded.item_row[item_id] for item_id in item_ids if item_id in self._loaded.item_row]
        return np.asarray(rows, dtype=np.int64)

    # -- mix and filters ------------------------------------------------------------------
    def _shares(self, mix: Sequence[tuple[str, float]]) -> dict[str, float]:
        if not mix:
            return dict(self._mix)
        shares: dict[str, float] = {}
        for source, share in mix:
            if source not in SOURCE_NAMES:
                raise InvalidArgument(
                    f"mix names unknown source {source!r}; known sources: {', '.join(SOURCE_NAMES)}", field="mix"
                )
            if not math.isfinite(share) or share < 0:
                raise InvalidArgument(f"mix share of {source!r} must be a finite number >= 0, got {share}", field="mix")
            if source in shares:
                raise InvalidArgument(f"mix names source {source!r} twice", field="mix")
            shares[source] = share
        if sum(shares.values()) <= 0:
            raise InvalidArgument("mix shares must have a positive sum", field="mix")
        return shares

    def _codes(self, names: Sequence[str], known: dict[str, int], field_name: str) -> npt.NDArray[np.int64]:
        unknown = [name for name in names if name not in known]
        if unknown:
            shown = ", ".join(repr(name) for name in list(known)[:KNOWN_NAMES_SHOWN])
            raise InvalidArgument(
                f"{field_name}: unknown {', '.join(repr(name) for name in unknown[:KNOWN_NAMES_SHOWN])}; "
                f"known ones include {shown} ({len(known)} in all)",
                field=field_name,
            )
        return np.asarray([known[name] for name in names], dtype=np.int64)

    def _price_band(
        self, prices: npt.NDArray[np.float64], low: float | None, high: float | None, field_name: str
    ) -> npt.NDArray[np.bool_]:
        for name, value in (("price_min", low), ("price_max", high)):
            if value is not None and (not math.isfinite(value) or value < 0):
                raise InvalidArgument(
                    f"{field_name}.{name} must be a finite price >= 0, got {value}", field=f"{field_name}.{name}"
                )
        if low is not None and high is not None and low > high:
            raise InvalidArgument(
                f"{field_name}.price_min ({low}) is above price_max ({high})", field=f"{field_name}.price_min"
            )
        band = np.ones(len(prices), dtype=bool)
        if low is not None:
            band &= prices >= low
        if high is not None:
            band &= prices <= high
        return band

    def _require_attributes(self) -> None:
        if not self._loaded.sources.has_attributes:
            raise FailedPrecondition(
                f"index version {self._loaded.version} was built without item attributes; rebuild it to filter"
            )

    def _filter_mask(self, spec: ItemFilterSpec | None) -> npt.NDArray[np.bool_] | None:
        if spec is None or spec.empty:
            return None
        self._require_attributes()
        tables = self._loaded.sources
        mask = self._price_band(tables.prices, spec.price_min, spec.price_max, "filter")
        if spec.categories:
            mask &= np.isin(
                tables.category_codes, self._codes(spec.categories, tables.category_code, "filter.categories")
            )
        if spec.brands:
            mask &= np.isin(tables.brand_codes, self._codes(spec.brands, tables.brand_code, "filter.brands"))
        if spec.in_stock_only:
            # Stock grows before the attributes when items are upserted: the rows of the mask.
            mask &= self._loaded.stock[: len(mask)] > 0
        return mask

    def _preference_mask(self, preferences: Preferences) -> npt.NDArray[np.bool_]:
        if not preferences.brands and not preferences.categories:
            raise InvalidArgument(
                "preferences name no brand and no category; declare at least one", field="preferences"
            )
        self._require_attributes()
        tables = self._loaded.sources
        taste = np.zeros(len(tables.prices), dtype=bool)
        if preferences.brands:
            taste |= np.isin(
                tables.brand_codes, self._codes(preferences.brands, tables.brand_code, "preferences.brands")
            )
        if preferences.categories:
            codes = self._codes(preferences.categories, tables.category_code, "preferences.categories")
            taste |= np.isin(tables.category_codes, codes)
        return taste & self._price_band(tables.prices, preferences.price_min, preferences.price_max, "preferences")

    # -- answers ---------------------------------------------------------------------------
    def _candidates(
        self,
        rows: npt.NDArray[np.int64],
        scores: list[float],
        source: str,
        query: npt.NDArray[np.float32] | None = None,
    ) -> Candidates:
        """Candidates for ``rows`` from one source; with the ``query`` that found them, the score's two parts."""
        return self._build(
            rows, scores, source, query, [source] * len(rows), [[source] for _ in rows], [[s] for s in scores], []
        )

    def _build(
        self,
        rows: npt.NDArray[np.int64],
        scores: list[float],
        source: str,
        query: npt.NDArray[np.float32] | None,
        primary: list[str],
        sources: list[list[str]],
        source_scores: list[list[float]],
        anchors: list[list[str]],
        items: npt.NDArray[np.float32] | None = None,
    ) -> Candidates:
        """``items``: the decoded vectors of ``rows`` when the caller has them already."""
        loaded = self._loaded
        if query is None:
            content = collaborative = [0.0] * len(rows)
        else:
            items = loaded.index.decoded(rows) if items is None else items
            split = self._content_dim
            content = (items[:, :split] @ query[0, :split]).tolist()
            collaborative = (items[:, split:] @ query[0, split:]).tolist()
        return Candidates(
            item_ids=loaded.item_ids[rows].tolist(),
            scores=scores,
            content_scores=content,
            collaborative_scores=collaborative,
            source=source,
            index_version=loaded.version,
            dimension=loaded.index.dimension,
            shard=loaded.shard,
            shard_count=loaded.shard_count,
            primary_sources=primary,
            sources=sources,
            source_scores=source_scores,
            anchors=anchors or [[] for _ in range(len(rows))],
            stock=loaded.stock[rows].tolist(),
        )

    def _allowed(
        self, mask: npt.NDArray[np.bool_] | None, exclude: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.bool_] | None:
        if mask is None:
            return None
        # Attributes grow before the index when items are upserted: fit the mask to the rows
        # the index holds now (rows it does not hold yet are not allowed).
        size = self._loaded.index.size
        allowed = np.zeros(size, dtype=bool)
        allowed[: min(size, len(mask))] = mask[:size]
        allowed[exclude[exclude < size]] = False
        return allowed

    def _answer(
        self,
        vector: npt.NDArray[np.float32] | None,
        anchor_ids: Sequence[str],
        anchor_weights: npt.NDArray[np.float64],
        n: int,
        exclude: npt.NDArray[np.int64],
        mask: npt.NDArray[np.bool_] | None,
        shares: dict[str, float],
        with_anchors: bool = True,
    ) -> Candidates:
        """Ask every source of ``shares``, merge by quota; order by the query's inner product."""
        # Deleted and replaced items (retired rows) are never an answer, from any source.
        retired = self._loaded.index.retired_rows
        if len(retired):
            exclude = np.union1d(exclude, retired)
        query = SourceQuery(
            vector=vector,
            anchor_ids=anchor_ids,
            anchor_weights=anchor_weights,
            allowed=self._allowed(mask, exclude),
            exclude=exclude,
            exact_filter_below=self._exact_filter_below,
        )
        if vector is None and not len(anchor_ids):
            shares = {POPULAR: 1.0}  # cold start: popular items, whatever the mix
        # Sources this index cannot feed (no item model, no co-visitation table) would pass
        # their quota on anyway; dropping them first keeps a fused-only answer on its fast
        # path (the default mix on a catalogue too large for an item model).
        available = {name: share for name, share in shares.items() if share > 0 and self._sources[name].available}
        shares = available or shares
        if vector is not None and [name for name, share in shares.items() if share > 0] == [FUSED]:
            fused = self._fused_only(query, vector, n, with_anchors)
            if fused is not None:
                return fused
        answers = {name: self._sources[name].propose(query, n) for name, share in shares.items() if share > 0}
        merged = merge(answers, shares, n)
        rows = merged.rows
        if vector is not None and len(rows):
            scores = self._loaded.index.decoded(rows) @ vector[0]
            order = np.argsort(-scores, kind="stable")
            score_list = scores[order].astype(np.float32).tolist()
        else:
            order = np.arange(len(rows))
            score_list = [values[0] for values in merged.source_scores]
        rows = rows[order]
        pick = order.tolist()
        primary = [merged.primary[i] for i in pick]
        anchors = [merged.anchors[i] for i in pick] if with_anchors else []
        missing = [position for position, found in enumerate(anchors) if not found]
        if missing:
            found_anchors = self._vector_anchors(self._loaded.index.decoded(rows[missing]), anchor_ids, anchor_weights)
            for position, found in zip(missing, found_anchors, strict=True):
                anchors[position] = found
        source = primary[0] if primary else (POPULAR if POPULAR in shares and len(shares) == 1 else TAG[FUSED])
        return self._build(
            rows,
            score_list,
            source,
            vector,
            primary,
            [merged.sources[i] for i in pick],
            [merged.source_scores[i] for i in pick],
            anchors,
        )

    def _fused_only(
        self, query: SourceQuery, vector: npt.NDArray[np.float32], n: int, with_anchors: bool
    ) -> Candidates | None:
        """The default mix, one source: the search's own order and exact scores, and one
        decode of the answer for the score parts and the anchors (no quota merge: at 1M
        items the merge and repeated decoding cost more than the search)."""
        answer = self._sources[FUSED].propose(query, n)
        if not len(answer.rows):
            return None
        items = answer.vectors if answer.vectors is not None else self._loaded.index.decoded(answer.rows)
        tag = TAG[FUSED]
        scores = answer.scores.tolist()
        anchors = self._vector_anchors(items, query.anchor_ids, query.anchor_weights) if with_anchors else []
        return self._build(
            answer.rows,
            scores,
            tag,
            vector,
            [tag] * len(scores),
            [[tag] for _ in scores],
            [[score] for score in scores],
            anchors or [[] for _ in scores],
            items,
        )

    def _vector_anchors(
        self, candidates: npt.NDArray[np.float32], anchor_ids: Sequence[str], anchor_weights: npt.NDArray[np.float64]
    ) -> list[list[str]]:
        """Per candidate, the history/session items this index holds that weigh most in its
        score (empty when it holds none of them)."""
        local = [(i, self._loaded.item_row[a]) for i, a in enumerate(anchor_ids) if a in self._loaded.item_row]
        if not local or not len(candidates):
            return [[] for _ in range(len(candidates))]
        return inner_product_anchors(
            candidates,
            self._loaded.index.decoded(np.asarray([row for _, row in local], dtype=np.int64)),
            [anchor_ids[i] for i, _ in local],
            anchor_weights[[i for i, _ in local]],
            self._content_dim,
        )

    def _search(
        self,
        query: npt.NDArray[np.float32],
        n: int,
        exclude: npt.NDArray[np.int64],
        options: QueryOptions = NO_OPTIONS,
        anchors: tuple[Sequence[str], npt.NDArray[np.float64]] = ((), np.zeros(0)),
        fused_only: bool = False,
    ) -> Candidates:
        shares = {FUSED: 1.0} if fused_only else self._shares(options.mix)
        mask = self._filter_mask(options.filter)
        return self._answer(query, anchors[0], anchors[1], n, exclude, mask, shares, options.with_anchors)

    def popular(self, n: int, exclude_item_ids: Sequence[str], options: QueryOptions = NO_OPTIONS) -> Candidates:
        self._check_n(n)
        mask = self._filter_mask(options.filter)
        return self._answer(
            None, (), np.zeros(0), n, self._exclusions(exclude_item_ids), mask, {POPULAR: 1.0}, options.with_anchors
        )

    def _anchored(
        self,
        item_ids: Sequence[str],
        relative: npt.NDArray[np.float64],
        n: int,
        exclude_item_ids: Sequence[str],
        options: QueryOptions,
    ) -> Candidates:
        """A query from weighted items (history, session): the vector of the items this index
        holds, the items themselves as anchors of every source."""
        ids, weight_array = anchor_items(item_ids, relative, options.session_item_ids)
        weights = weight_array.tolist()
        item_row = self._loaded.item_row
        known = [
            (item_row[item_id], weight) for item_id, weight in zip(ids, weights, strict=True) if item_id in item_row
        ]
        vector: npt.NDArray[np.float32] | None = None
        if known:
            rows = np.asarray([row for row, _ in known], dtype=np.int64)
            summed = weighted_sum(
                self._loaded.index.vectors, rows, np.asarray([w for _, w in known]), self._content_dim
            )
            vector = self._query(summed)
            if not np.any(vector):
                vector = None
        if vector is None and not any(weight > 0 for _, weight in known):
            # No item this index holds carries weight (none known, or every weight 0, as
            # when a client's decayed weights underflow): there is no query, as for an
            # empty history; every source would answer nothing.
            return self.popular(n, exclude_item_ids, options)
        mask = self._filter_mask(options.filter)
        shares = self._shares(options.mix)
        return self._answer(
            vector, ids, weight_array, n, self._exclusions(exclude_item_ids), mask, shares, options.with_anchors
        )

    def by_user(
        self, user_id: str, n: int, exclude_item_ids: Sequence[str], options: QueryOptions = NO_OPTIONS
    ) -> Candidates:
        self._check_n(n)
        if not user_id:
            raise InvalidArgument("user_id is empty", field="user_id")
        row = self._loaded.user_row.get(user_id)
        if row is None:
            if options.session_item_ids:
                return self._anchored([], np.zeros(0), n, exclude_item_ids, options)
            return self.popular(n, exclude_item_ids, options)
        query = self._loaded.user_vectors[row : row + 1].astype(np.float32)
        history, weights = self._loaded.sources.user_history(row) if self._loaded.tables else ([], np.zeros(0))
        relative = relative_weights(np.asarray(weights, dtype=np.float64))
        anchors = anchor_items(history, relative, options.session_item_ids)
        return self._search(query, n, self._exclusions(exclude_item_ids), options, anchors)

    def _history(
        self, item_ids: Sequence[str], weights: Sequence[float]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Rows of the history items this index holds, and their weights relative to the
        largest weight in the request (the same scale on every shard)."""
        relative = self._relative_history(item_ids, weights)
        item_row = self._loaded.item_row
        known = [
            (item_row[item_id], weight)
            for item_id, weight in zip(item_ids, relative, strict=True)
            if item_id in item_row
        ]
        return (
            np.asarray([row for row, _ in known], dtype=np.int64),
            np.asarray([weight for _, weight in known], dtype=np.float64),
        )

    def _relative_history(self, item_ids: Sequence[str], weights: Sequence[float]) -> npt.NDArray[np.float64]:
        if not item_ids:
            raise InvalidArgument("history.item_ids is empty; send at least one item id", field="history.item_ids")
        if weights and len(weights) != len(item_ids):
            raise InvalidArgument(
                f"history.weights has {len(weights)} values for {len(item_ids)} item ids; send one per item or none",
                field="history.weights",
            )
        weight_array = np.asarray(weights if weights else [1.0] * len(item_ids), dtype=np.float32)
        if not np.all(np.isfinite(weight_array)) or np.any(weight_array < 0):
            raise InvalidArgument("history.weights must be finite and >= 0", field="history.weights")
        return relative_weights(weight_array)

    def by_history(
        self,
        item_ids: Sequence[str],
        weights: Sequence[float],
        n: int,
        exclude_item_ids: Sequence[str],
        options: QueryOptions = NO_OPTIONS,
    ) -> Candidates:
        self._check_n(n)
        relative = self._relative_history(item_ids, weights)
        return self._anchored(item_ids, relative, n, exclude_item_ids, options)

    def by_preferences(
        self, preferences: Preferences, n: int, exclude_item_ids: Sequence[str], options: QueryOptions = NO_OPTIONS
    ) -> Candidates:
        """A user with no history: the query is the popularity-weighted mean of the most popular
        items matching the preferences, and the search is restricted to them."""
        self._check_n(n)
        taste = self._preference_mask(preferences)
        extra = self._filter_mask(options.filter)
        mask = taste if extra is None else taste & extra
        exclude = self._exclusions(exclude_item_ids)
        popularity = self._loaded.sources.popularity
        matching = np.flatnonzero(mask)
        vector: npt.NDArray[np.float32] | None = None
        if len(matching):
            top = matching[np.argsort(-popularity[matching], kind="stable")[: self._preference_items]]
            weights = popularity[top].astype(np.float64) + 1e-6
            vector = self._query(
                weighted_sum(
                    self._loaded.index.vectors, top.astype(np.int64), weights / weights.max(), self._content_dim
                )
            )
        if vector is None or not np.any(vector):
            return self._answer(None, (), np.zeros(0), n, exclude, mask, {POPULAR: 1.0})
        return self._answer(vector, (), np.zeros(0), n, exclude, mask, self._shares(options.mix))

    def _part(self, vector: npt.NDArray[np.float32], known: int) -> QueryPart:
        loaded = self._loaded
        return QueryPart(
            vector=vector,
            known=known,
            index_version=loaded.version,
            dimension=loaded.index.dimension,
            shard=loaded.shard,
            shard_count=loaded.shard_count,
        )

    def user_part(self, user_id: str) -> QueryPart:
        """The user's query vector if this index holds the user, else an empty part."""
        if not user_id:
            raise InvalidArgument("user_id is empty", field="user_id")
        row = self._loaded.user_row.get(user_id)
        if row is None:
            return self._part(np.zeros(0, np.float32), 0)
        return self._part(self._loaded.user_vectors[row].astype(np.float32), 1)

    def history_part(self, item_ids: Sequence[str], weights: Sequence[float]) -> QueryPart:
        """The weighted sum of the vectors of the history items this index holds (unnormalised)."""
        rows, relative = self._history(item_ids, weights)
        if not len(rows):
            return self._part(np.zeros(0, np.float32), 0)
        summed = weighted_sum(self._loaded.index.vectors, rows, relative, self._content_dim)
        return self._part(summed[0].astype(np.float32), len(rows))

    def by_vector(
        self, values: Sequence[float], n: int, exclude_item_ids: Sequence[str], options: QueryOptions = NO_OPTIONS
    ) -> Candidates:
        self._check_n(n)
        dimension = self._loaded.index.dimension
        if len(values) != dimension:
            raise InvalidArgument(
                f"vector has {len(values)} values; this index expects {dimension}", field="vector.values"
            )
        query = np.asarray(values, dtype=np.float32)[None, :]
        if not np.all(np.isfinite(query)):
            raise InvalidArgument("vector values must be finite numbers", field="vector.values")
        # Each half is normalised like an index query: any scale works, and a float32-max
        # vector cannot overflow the scores.
        query = self._query(query)
        if not np.any(query):
            raise InvalidArgument("vector is all zeros; it matches nothing", field="vector.values")
        anchors = anchor_items([], np.zeros(0), options.session_item_ids)
        return self._search(query, n, self._exclusions(exclude_item_ids), options, anchors)

    def by_text(
        self, text: str, n: int, exclude_item_ids: Sequence[str], options: QueryOptions = NO_OPTIONS
    ) -> Candidates:
        self._check_n(n)
        text = text.strip()
        if not text:
            raise InvalidArgument("text is empty", field="text")
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidArgument(
                f"text has {len(text)} characters; at most {MAX_TEXT_CHARS} are accepted", field="text"
            )
        encoder = self._text_encoder
        if encoder is None:
            raise FailedPrecondition("text queries are disabled on this server (setting retrieval.text_queries)")
        if encoder.model_id != self._loaded.embedding_model:
            raise FailedPrecondition(
                f"the index was built with text model {self._loaded.embedding_model}, "
                f"the server has {encoder.model_id}; rebuild the index or configure embedding.model_path"
            )
        query = text_query(encoder.encode(text)[None, :], self._loaded.collaborative_dim, self._loaded.build)
        # A text query has no collaborative half: the fused search is the content search.
        return self._search(query, n, self._exclusions(exclude_item_ids), options, fused_only=True)

    def similar_items(
        self, item_id: str, n: int, exclude_item_ids: Sequence[str], item_filter: ItemFilterSpec | None = None
    ) -> Candidates:
        self._check_n(n)
        if not item_id:
            raise InvalidArgument("item_id is empty", field="item_id")
        row = self._loaded.item_row.get(item_id)
        if row is None:
            raise NotFound(f"item {item_id!r} is not in index version {self._loaded.version}", field="item_id")
        exclude = np.append(self._exclusions(exclude_item_ids), row)
        item = self._loaded.index.vector(row)[None, :]
        query = self._query(unit_halves(item, self._content_dim))
        return self._search(query, n, exclude, QueryOptions(filter=item_filter), fused_only=True)
