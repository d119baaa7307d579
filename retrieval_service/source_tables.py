"""Tables the candidate sources and filters read, computed at index build and stored in the
index artifact as ``.npy`` arrays (manifest checksums, no pickle).

* item attributes for filters and declared preferences: category and brand codes (names in
  ``category_names.npy`` / ``brand_names.npy``), price, stock, popularity;
* ``item_trending.npy``: interactions decayed with ``trending_half_life_days`` (the trending
  sources);
* neighbour tables, per anchor item (by id, so a shard can hold the neighbours of an item
  another shard holds) its neighbours among this artifact's items as CSR arrays:
  co-visitation (``covisitation_*.npy``) and the EASE item model (``item_model_*.npy``,
  shared/item_model.py);
* users' recent items (``user_history_*.npy``), row-aligned with ``user_ids.npy``, as int32
  codes into ``user_history_vocabulary.npy`` (the item ids any history names: ids, since
  they may live on other shards; codes, since histories repeat items): the anchors
  of a ``user_id`` query.

Artifacts built before these tables load with empty ones: the sources that need them
answer nothing and their quota flows to the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from shared.artifacts import Artifact, ArtifactWriter
from shared.config import CovisitationSettings, IndexBuildSettings, ItemModelSettings
from shared.data import Dataset, Events
from shared.interactions import decayed_counts, recency_weights
from shared.item_model import fit_item_model, tuned_item_model

ATTRIBUTE_FILES = ("item_categories.npy", "item_brands.npy", "item_prices.npy", "item_stock.npy")
COVISITATION, ITEM_MODEL = "covisitation", "item_model"
NEIGHBOUR_TABLES = (COVISITATION, ITEM_MODEL)


@dataclass(frozen=True)
class GlobalTables:
    """Whole-catalogue tables of one build, before they are split into shards."""

    category_codes: npt.NDArray[np.int32]
    category_names: npt.NDArray[np.str_]
    brand_codes: npt.NDArray[np.int32]
    brand_names: npt.NDArray[np.str_]
    trending: npt.NDArray[np.float32]
    covisitation: sp.csr_matrix
    # EASE weights (empty: too many items for an item model) and the (tuned) settings they
    # were fitted with (None: no item model).
    item_model: sp.csr_matrix
    item_model_settings: ItemModelSettings | None
    # Per user: recent item rows and their recency x intent weights (CSR by user).
    history_indptr: npt.NDArray[np.int64]
    history_rows: npt.NDArray[np.int32]
    history_weights: npt.NDArray[np.float32]


@dataclass(frozen=True)
class NeighbourTable:
    """Per anchor item id, its neighbours among the artifact's rows and their scores, best
    first (CSR over anchors)."""

    anchor_ids: npt.NDArray[np.str_]
    indptr: npt.NDArray[np.int64]
    neighbours: npt.NDArray[np.int32]
    scores: npt.NDArray[np.float32]
    # Derived at load.
    anchor_row: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return len(self.anchor_ids) > 0

    def of(self, anchor_id: str) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
        """Local rows next to ``anchor_id`` and their scores (best first)."""
        row = self.anchor_row.get(anchor_id)
        if row is None:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        start, end = int(self.indptr[row]), int(self.indptr[row + 1])
        return self.neighbours[start:end], self.scores[start:end]


EMPTY_NEIGHBOURS = NeighbourTable(
    np.zeros(0, np.str_), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
)


@dataclass(frozen=True)
class SourceTables:
    """One artifact's tables, rows local to the artifact (see the module docstring)."""

    category_codes: npt.NDArray[np.int32]
    category_names: npt.NDArray[np.str_]
    brand_codes: npt.NDArray[np.int32]
    brand_names: npt.NDArray[np.str_]
    prices: npt.NDArray[np.float64]
    stock: npt.NDArray[np.int64]
    popularity: npt.NDArray[np.float32]
    trending: npt.NDArray[np.float32]
    covisitation: NeighbourTable
    item_model: NeighbourTable
    user_history_indptr: npt.NDArray[np.int64]
    user_history_vocabulary: npt.NDArray[np.str_]
    user_history_codes: npt.NDArray[np.int32]
    user_history_weights: npt.NDArray[np.float32]
    # Derived at load.
    category_code: dict[str, int] = field(default_factory=dict)
    brand_code: dict[str, int] = field(default_factory=dict)
    # Rows by trending score, best first; and per category code the slice of that order.
    trending_order: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    category_trending_order: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    category_bounds: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(1, np.int64))

    @property
    def has_attributes(self) -> bool:
        return len(self.category_names) > 0

    def with_items(
        self, categories: Sequence[str], brands: Sequence[str], prices: npt.NDArray[np.float64]
    ) -> SourceTables:
        """These tables with rows appended for items upserted while serving (their attributes,
        no popularity or trending yet); names never seen get the next codes. Filters and
        declared preferences then see the new items like any other."""
        category_code, brand_code = dict(self.category_code), dict(self.brand_code)
        category_rows = np.asarray(
            [category_code.setdefault(name, len(category_code)) for name in categories], np.int32
        )
        brand_rows = np.asarray([brand_code.setdefault(name, len(brand_code)) for name in brands], np.int32)
        added = len(category_code) - len(self.category_names)
        zeros = np.zeros(len(prices), np.float32)
        return replace(
            self,
            category_codes=np.concatenate([self.category_codes, category_rows]),
            category_names=np.asarray(list(category_code), dtype=np.str_),
            brand_codes=np.concatenate([self.brand_codes, brand_rows]),
            brand_names=np.asarray(list(brand_code), dtype=np.str_),
            prices=np.concatenate([self.prices, prices.astype(np.float64)]),
            stock=np.concatenate([self.stock, np.ones(len(prices), np.int64)]),
            popularity=np.concatenate([self.popularity, zeros]),
            trending=np.concatenate([self.trending, zeros]),
            category_code=category_code,
            brand_code=brand_code,
            # New categories have no trending items yet: empty slices.
            category_bounds=np.concatenate([self.category_bounds, np.full(added, self.category_bounds[-1])]),
        )

    def user_history(self, user_row: int) -> tuple[list[str], npt.NDArray[np.float32]]:
        if user_row + 1 >= len(self.user_history_indptr):
            return [], np.zeros(0, np.float32)
        start, end = int(self.user_history_indptr[user_row]), int(self.user_history_indptr[user_row + 1])
        items: list[str] = self.user_history_vocabulary[self.user_history_codes[start:end]].tolist()
        return items, self.user_history_weights[start:end]


def _codes(values: npt.NDArray[np.str_]) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.str_]]:
    names, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int32), names.astype(np.str_)


def covisitation_matrix(events: Events, n_items: int, cutoff: int, settings: CovisitationSettings) -> sp.csr_matrix:
    """Items at most ``window`` events apart in one session, each pair weighted by the two
    events' decayed intent weights (geometric mean), summed, normalised like a cosine
    (so very popular items do not neighbour everything), top ``neighbours`` per item."""
    if not len(events):
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    _, session = np.unique(events.session_id, return_inverse=True)
    order = np.lexsort((events.timestamp, session))
    session, items = session[order], events.item_index[order]
    weights = recency_weights(events.event_code[order], events.timestamp[order], cutoff, settings.half_life_days)
    sources, targets, values = [], [], []
    for distance in range(1, min(settings.window, len(items) - 1) + 1):
        pair = (session[distance:] == session[:-distance]) & (items[distance:] != items[:-distance])
        first, second = items[:-distance][pair], items[distance:][pair]
        weight = np.sqrt(weights[:-distance][pair] * weights[distance:][pair])
        sources += [first, second]
        targets += [second, first]
        values += [weight, weight]
    if not sources:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    counts = sp.coo_matrix(
        (np.concatenate(values), (np.concatenate(sources), np.concatenate(targets))), shape=(n_items, n_items)
    ).tocsr()
    counts.sum_duplicates()
    totals = np.asarray(counts.sum(axis=1)).ravel()
    norm = np.sqrt(np.maximum(totals, 1e-12))
    scaled = sp.diags(1.0 / norm) @ counts @ sp.diags(1.0 / norm)
    return top_per_row(sp.csr_matrix(scaled, dtype=np.float32), settings.neighbours)


def top_per_row(matrix: sp.csr_matrix, keep: int) -> sp.csr_matrix:
    """The ``keep`` largest entries of every row, each row sorted best first."""
    matrix.sort_indices()
    row_of = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    order = np.lexsort((-matrix.data, row_of))
    rank = np.arange(len(order)) - matrix.indptr[row_of[order]]
    kept = order[rank < keep]
    rows, cols, data = row_of[kept], matrix.indices[kept], matrix.data[kept]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=matrix.shape[0]))]).astype(np.int64)
    return sp.csr_matrix((data.astype(np.float32), cols, indptr), shape=matrix.shape)


def recent_items(
    events: Events, n_users: int, cutoff: int, settings: IndexBuildSettings
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Each user's last ``stored_history_length`` events, newest first."""
    order = np.lexsort((-events.timestamp, events.user_index))
    users = events.user_index[order]
    starts = np.searchsorted(users, np.arange(n_users))
    rank_in_user = np.arange(len(users)) - starts[users]
    keep = order[rank_in_user < settings.stored_history_length]
    weights = recency_weights(events.event_code[keep], events.timestamp[keep], cutoff, settings.history_half_life_days)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(events.user_index[keep], minlength=n_users))])
    return indptr.astype(np.int64), events.item_index[keep].astype(np.int32), weights.astype(np.float32)


def global_tables(dataset: Dataset, events: Events, cutoff: int, settings: IndexBuildSettings) -> GlobalTables:
    catalog = dataset.catalog
    category_codes, category_names = _codes(catalog.categories)
    brand_codes, brand_names = _codes(catalog.brands)
    indptr, rows, weights = recent_items(events, len(dataset.users), cutoff, settings)
    item_model_settings = tuned_item_model(replace(dataset, events=events), settings.item_model, settings.seed)
    item_model = fit_item_model(events, len(catalog), item_model_settings)
    return GlobalTables(
        category_codes=category_codes,
        category_names=category_names,
        brand_codes=brand_codes,
        brand_names=brand_names,
        trending=decayed_counts(events, len(catalog), cutoff, settings.trending_half_life_days),
        covisitation=covisitation_matrix(events, len(catalog), cutoff, settings.covisitation),
        item_model=item_model if item_model is not None else sp.csr_matrix((len(catalog), len(catalog)), np.float32),
        item_model_settings=item_model_settings if item_model is not None else None,
        history_indptr=indptr,
        history_rows=rows,
        history_weights=weights,
    )


def _ranges(starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The positions start..start+length-1 of every (start, length), concatenated."""
    if not len(starts):
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(s, s + n) for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)]).astype(
        np.int64
    )


def write_shard_tables(
    writer: ArtifactWriter,
    tables: GlobalTables,
    dataset: Dataset,
    popularity: npt.NDArray[np.float32],
    item_rows: npt.NDArray[np.int64],
    user_rows: npt.NDArray[np.int64],
) -> None:
    """Save the tables of the shard holding catalogue rows ``item_rows`` and users ``user_rows``."""
    catalog = dataset.catalog
    n_items = len(catalog)
    local_row = np.full(n_items, -1, dtype=np.int64)
    local_row[item_rows] = np.arange(len(item_rows))
    writer.save_array("item_categories.npy", tables.category_codes[item_rows])
    writer.save_array("category_names.npy", tables.category_names)
    writer.save_array("item_brands.npy", tables.brand_codes[item_rows])
    writer.save_array("brand_names.npy", tables.brand_names)
    writer.save_array("item_prices.npy", catalog.prices[item_rows].astype(np.float64))
    writer.save_array("item_stock.npy", catalog.stock[item_rows].astype(np.int64))
    writer.save_array("item_popularity.npy", popularity[item_rows].astype(np.float32))
    writer.save_array("item_trending.npy", tables.trending[item_rows])

    for name in NEIGHBOUR_TABLES:
        _write_neighbour_table(writer, name, getattr(tables, name), local_row, catalog.item_ids)

    # Recent items of this shard's users, as ids (they may live on other shards).
    lengths = np.diff(tables.history_indptr)[user_rows]
    starts = tables.history_indptr[user_rows]
    take = _ranges(starts, lengths)
    writer.save_array("user_history_indptr.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    history_rows, codes = np.unique(tables.history_rows[take], return_inverse=True)
    writer.save_array("user_history_vocabulary.npy", catalog.item_ids[history_rows])
    writer.save_array("user_history_codes.npy", codes.astype(np.int32))
    writer.save_array("user_history_weights.npy", tables.history_weights[take])


def _write_neighbour_table(
    writer: ArtifactWriter,
    name: str,
    matrix: sp.csr_matrix,
    local_row: npt.NDArray[np.int64],
    item_ids: npt.NDArray[np.str_],
) -> None:
    """Keep the neighbours this shard holds (``local_row`` >= 0), for every anchor that has
    some, each anchor's best first."""
    whole = matrix.tocoo()
    in_shard = local_row[whole.col] >= 0
    kept = sp.csr_matrix(
        (whole.data[in_shard], (whole.row[in_shard], local_row[whole.col[in_shard]])),
        shape=(matrix.shape[0], int((local_row >= 0).sum())),
    )
    kept = top_per_row(kept, max(int(np.diff(matrix.indptr).max(initial=0)), 1))
    anchors = np.flatnonzero(np.diff(kept.indptr) > 0)
    lengths = np.diff(kept.indptr)[anchors]
    take = _ranges(kept.indptr[anchors], lengths)
    writer.save_array(f"{name}_anchor_ids.npy", item_ids[anchors])
    writer.save_array(f"{name}_indptr.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    writer.save_array(f"{name}_neighbours.npy", kept.indices[take].astype(np.int32))
    writer.save_array(f"{name}_scores.npy", kept.data[take].astype(np.float32))


def _load_neighbour_table(artifact: Artifact, name: str, n_items: int) -> NeighbourTable:
    """A stored neighbour table, after a structural check; empty when the artifact has none."""
    if f"{name}_anchor_ids.npy" not in artifact.manifest["files"]:
        return EMPTY_NEIGHBOURS
    anchor_ids, indptr, neighbours, scores = (
        artifact.load_array(f"{name}_{part}.npy") for part in ("anchor_ids", "indptr", "neighbours", "scores")
    )
    if (
        len(indptr) != len(anchor_ids) + 1
        or int(indptr[0]) != 0
        or int(indptr[-1]) != len(neighbours)
        or len(scores) != len(neighbours)
        or np.any(np.diff(indptr) < 0)
        or (len(neighbours) and (int(neighbours.min()) < 0 or int(neighbours.max()) >= n_items))
    ):
        raise ValueError(f"{name} table does not fit the {n_items} items of the index")
    return NeighbourTable(
        anchor_ids,
        indptr,
        neighbours,
        scores,
        anchor_row={item: row for row, item in enumerate(anchor_ids.tolist())},
    )


def _optional(artifact: Artifact, name: str, empty: npt.NDArray[Any], expected: int | None = None) -> npt.NDArray[Any]:
    if name not in artifact.manifest["files"]:
        return empty
    array = artifact.load_array(name)
    if expected is not None and len(array) != expected:
        raise ValueError(f"{name} has {len(array)} rows, the index {expected}")
    return array


def _history_items(artifact: Artifact) -> tuple[npt.NDArray[np.str_], npt.NDArray[np.int32]]:
    """The users' history items as (vocabulary, codes); artifacts built before the codes
    stored every id in full (``user_history_items.npy``)."""
    files = artifact.manifest["files"]
    if "user_history_codes.npy" in files:
        vocabulary = artifact.load_array("user_history_vocabulary.npy")
        codes = artifact.load_array("user_history_codes.npy")
        if len(codes) and (int(codes.min()) < 0 or int(codes.max()) >= len(vocabulary)):
            raise ValueError("user_history_codes.npy names items beyond user_history_vocabulary.npy")
        return vocabulary, codes
    items = _optional(artifact, "user_history_items.npy", np.zeros(0, dtype=np.str_))
    return items, np.arange(len(items), dtype=np.int32)


def load_source_tables(artifact: Artifact, n_items: int, n_users: int) -> SourceTables:
    """The tables of an artifact; empty ones for an artifact built before them."""
    has_attributes = all(name in artifact.manifest["files"] for name in ATTRIBUTE_FILES)
    strings = np.zeros(0, dtype=np.str_)

    def per_item(name: str, dtype: type[Any], fill: float) -> npt.NDArray[Any]:
        return _optional(artifact, name, np.full(n_items, fill, dtype=dtype), n_items)

    category_codes = per_item("item_categories.npy", np.int32, 0) if has_attributes else np.zeros(n_items, np.int32)
    trending = per_item("item_trending.npy", np.float32, 0.0)
    user_indptr = _optional(artifact, "user_history_indptr.npy", np.zeros(1, np.int64))
    vocabulary, codes = _history_items(artifact)
    if int(user_indptr[-1]) != len(codes):
        raise ValueError(
            f"user_history_indptr.npy ends at {int(user_indptr[-1])}, the histories hold {len(codes)} items"
        )
    if len(user_indptr) not in (1, n_users + 1):
        raise ValueError(f"user_history_indptr.npy does not match the {n_users} users of the index")
    tables = SourceTables(
        category_codes=category_codes,
        category_names=_optional(artifact, "category_names.npy", strings) if has_attributes else strings,
        brand_codes=per_item("item_brands.npy", np.int32, 0),
        brand_names=_optional(artifact, "brand_names.npy", strings) if has_attributes else strings,
        prices=per_item("item_prices.npy", np.float64, 0.0),
        stock=per_item("item_stock.npy", np.int64, 1),
        popularity=per_item("item_popularity.npy", np.float32, 0.0),
        trending=trending,
        covisitation=_load_neighbour_table(artifact, COVISITATION, n_items),
        item_model=_load_neighbour_table(artifact, ITEM_MODEL, n_items),
        user_history_indptr=user_indptr,
        user_history_vocabulary=vocabulary,
        user_history_codes=codes,
        user_history_weights=_optional(artifact, "user_history_weights.npy", np.zeros(0, np.float32)),
    )
    trending_order = np.argsort(-tables.trending, kind="stable").astype(np.int64)
    by_category = np.lexsort((-tables.trending, tables.category_codes)).astype(np.int64)
    bounds = np.searchsorted(tables.category_codes[by_category], np.arange(len(tables.category_names) + 1))
    return replace(
        tables,
        category_code={name: code for code, name in enumerate(tables.category_names.tolist())},
        brand_code={name: code for code, name in enumerate(tables.brand_names.tolist())},
        trending_order=trending_order,
        category_trending_order=by_category,
        category_bounds=bounds.astype(np.int64),
    )
