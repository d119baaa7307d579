"""Candidate generation: turn a query into the best ``n`` items of the loaded index."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from retrieval_service.artifact import LoadedIndex
from retrieval_service.vectors import query_vector, relative_weights, text_query, unit_halves, weighted_sum
from shared.errors import FailedPrecondition, InvalidArgument, NotFound

SOURCE_ANN = "ann"
SOURCE_POPULAR = "popular"
MAX_TEXT_CHARS = 2000

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


class Retriever:
    def __init__(
        self,
        loaded: LoadedIndex,
        max_candidates: int,
        max_exclusions: int,
        text_encoder: TextQueryEncoder | None = None,
    ) -> None:
        self._loaded = loaded
        self._max_candidates = max_candidates
        self._max_exclusions = max_exclusions
        self._text_encoder = text_encoder

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

    def _candidates(
        self,
        rows: npt.NDArray[np.int64],
        scores: list[float],
        source: str,
        query: npt.NDArray[np.float32] | None = None,
    ) -> Candidates:
        """Candidates for ``rows``; with the ``query`` that found them, the score's two parts."""
        loaded = self._loaded
        if query is None:
            content = collaborative = [0.0] * len(rows)
        else:
            items = loaded.index.vectors[rows].astype(np.float32)
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
        )

    def _search(self, query: npt.NDArray[np.float32], n: int, exclude: npt.NDArray[np.int64]) -> Candidates:
        rows, scores = self._loaded.index.search(query, n, exclude)
        return self._candidates(rows, scores.tolist(), SOURCE_ANN, query)

    def popular(self, n: int, exclude_item_ids: Sequence[str]) -> Candidates:
        self._check_n(n)
        # Deleted and replaced items (retired rows) are never popular answers either.
        excluded = set(self._exclusions(exclude_item_ids).tolist()) | set(self._loaded.index.retired_rows.tolist())
        head = slice(0, n + len(excluded))
        kept = [
            (row, rank)
            for row, rank in zip(
                self._loaded.popular_rows[head].tolist(), self._loaded.popular_ranks[head].tolist(), strict=True
            )
            if row not in excluded
        ][:n]
        # Score from the rank in the whole catalogue, in (0, 1]: comparable in scale with a
        # cosine, monotone in popularity, and the same on every shard, so shards' answers merge.
        rows = np.asarray([row for row, _ in kept], dtype=np.int64)
        return self._candidates(rows, [1.0 / (1.0 + rank) for _, rank in kept], SOURCE_POPULAR)

    def by_user(self, user_id: str, n: int, exclude_item_ids: Sequence[str]) -> Candidates:
        self._check_n(n)
        if not user_id:
            raise InvalidArgument("user_id is empty", field="user_id")
        row = self._loaded.user_row.get(user_id)
        if row is None:
            return self.popular(n, exclude_item_ids)
        query = self._loaded.user_vectors[row : row + 1].astype(np.float32)
        return self._search(query, n, self._exclusions(exclude_item_ids))

    def _history(
        self, item_ids: Sequence[str], weights: Sequence[float]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Rows of the history items this index holds, and their weights relative to the
        largest weight in the request (the same scale on every shard)."""
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
        relative = relative_weights(weight_array)
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

    def by_history(
        self, item_ids: Sequence[str], weights: Sequence[float], n: int, exclude_item_ids: Sequence[str]
    ) -> Candidates:
        self._check_n(n)
        rows, relative = self._history(item_ids, weights)
        if not len(rows):
            return self.popular(n, exclude_item_ids)
        query = self._query(weighted_sum(self._loaded.index.vectors, rows, relative, self._content_dim))
        if not np.any(query):
            return self.popular(n, exclude_item_ids)
        return self._search(query, n, self._exclusions(exclude_item_ids))

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

    def by_vector(self, values: Sequence[float], n: int, exclude_item_ids: Sequence[str]) -> Candidates:
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
        return self._search(query, n, self._exclusions(exclude_item_ids))

    def by_text(self, text: str, n: int, exclude_item_ids: Sequence[str]) -> Candidates:
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
        return self._search(query, n, self._exclusions(exclude_item_ids))

    def similar_items(self, item_id: str, n: int, exclude_item_ids: Sequence[str]) -> Candidates:
        self._check_n(n)
        if not item_id:
            raise InvalidArgument("item_id is empty", field="item_id")
        row = self._loaded.item_row.get(item_id)
        if row is None:
            raise NotFound(f"item {item_id!r} is not in index version {self._loaded.version}", field="item_id")
        exclude = np.append(self._exclusions(exclude_item_ids), row)
        item = self._loaded.index.vector(row)[None, :]
        return self._search(self._query(unit_halves(item, self._content_dim)), n, exclude)
