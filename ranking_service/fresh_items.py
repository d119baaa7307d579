"""Items upserted into the retrieval index after this ranker's snapshot ("fresh" items).

The ranker's item table is a snapshot: an item added to the live index later is unknown
to it, and a candidate that cannot be featurised used to be dropped. Retrieval sends the
attributes of such items with the candidate (``Candidate.fresh_item``); this module gives
them rows so the ranker scores them like any other item.

The item table and statistics are extended once, when the ranker loads, by ``capacity``
reserved rows (``ranking.fresh_items``); registering a fresh item fills one reserved row
and then publishes its id, so a request never sees a half-written row. Bounded: once the
reserved rows are used up, further fresh items are dropped (as before) until the next
ranker load. A fresh item gets a new item's statistics: no popularity, no views, no
purchases, the median conversion rate, no co-interactions, and a zero content vector
(the text embedding lives in the retrieval service), so content-similarity features are
0 and the retrieval content score carries the text match.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from ranking_service.store import ItemStats, ItemTable
from shared.logs import event
from shared.proto.vitrine.v1 import catalog_pb2

log = logging.getLogger(__name__)


Scalar = TypeVar("Scalar", bound=np.generic)


def _extended(column: npt.NDArray[Scalar], extra: int, fill: float | str = 0) -> npt.NDArray[Scalar]:
    """``column`` with ``extra`` rows of ``fill`` after it (a copy: a mapped column is read in)."""
    grown: npt.NDArray[Scalar] = np.empty((len(column) + extra, *column.shape[1:]), dtype=column.dtype)
    grown[: len(column)] = column
    grown[len(column) :] = fill
    return grown


def _codes(names: npt.NDArray[np.str_], codes: npt.NDArray[np.int32]) -> dict[str, int]:
    return {str(name): int(code) for name, code in zip(names.tolist(), codes.tolist(), strict=True)}


def _fits(value: str, column: npt.NDArray[np.str_]) -> bool:
    return len(value) <= column.dtype.itemsize // 4


class FreshItems:
    """The ranker's item table, statistics and id -> row map with room for fresh items."""

    def __init__(self, items: ItemTable, item_row: dict[str, int], stats: ItemStats, capacity: int) -> None:
        self._base = len(items)
        self._capacity = capacity
        self._next = self._base
        self._lock = threading.Lock()
        self.dropped = 0
        self._category_code = _codes(items.categories, items.category_codes)
        self._brand_code = _codes(items.brands, items.brand_codes)
        if capacity == 0:
            self.items, self.stats, self.item_row = items, stats, item_row
            return
        empty = ""
        self.items = ItemTable(
            item_ids=_extended(items.item_ids, capacity, empty),
            titles=_extended(items.titles, capacity, empty),
            brands=_extended(items.brands, capacity, empty),
            categories=_extended(items.categories, capacity, empty),
            category_codes=_extended(items.category_codes, capacity),
            brand_codes=_extended(items.brand_codes, capacity),
            prices=_extended(items.prices, capacity, 1.0),
            stock=_extended(items.stock, capacity),
            created_at=_extended(items.created_at, capacity),
            content_vectors=_extended(np.asarray(items.content_vectors), capacity),
        )
        size = self._base + capacity

        def grown(matrix: sp.csr_matrix) -> sp.csr_matrix:
            indptr = np.concatenate([matrix.indptr, np.full(capacity, matrix.indptr[-1], matrix.indptr.dtype)])
            return sp.csr_matrix((matrix.data, matrix.indices, indptr), shape=(size, size))

        self.stats = dataclasses.replace(
            stats,
            log_popularity=_extended(stats.log_popularity, capacity),
            log_recent_views=_extended(stats.log_recent_views, capacity),
            log_purchases=_extended(stats.log_purchases, capacity),
            conversion_rate=_extended(stats.conversion_rate, capacity, float(np.median(stats.conversion_rate))),
            log_popular_now=_extended(stats.log_popular_now, capacity),
            # Popular rows stay the snapshot's; the matrix gains empty rows and columns.
            co_interactions=grown(stats.co_interactions),
            item_model=grown(stats.item_model) if stats.item_model is not None else None,
        )
        # A copy: the snapshot's own map stays as loaded.
        self.item_row = dict(item_row)

    @property
    def registered(self) -> int:
        return self._next - self._base

    def register(self, item_ids: Sequence[str], fresh: Sequence[catalog_pb2.ItemAttributes | None]) -> int:
        """Give a row to every fresh item among ``item_ids`` the table does not know yet
        (``fresh[i]``: the attributes retrieval sent for ``item_ids[i]``, None if none);
        returns how many were added."""
        unknown = [
            attributes
            for item_id, attributes in zip(item_ids, fresh, strict=True)
            if attributes is not None and item_id not in self.item_row
        ]
        if not unknown:
            return 0
        added = 0
        with self._lock:
            for attributes in unknown:
                if attributes.item_id in self.item_row:
                    continue
                if not self._fill(attributes):
                    self.dropped += 1
                    continue
                added += 1
        if added:
            event(log, "fresh items featurised", added=added, registered=self.registered, dropped=self.dropped)
        return added

    def _fill(self, attributes: catalog_pb2.ItemAttributes) -> bool:
        """Write one reserved row, then publish the id; False when there is no room."""
        items = self.items
        if self._next >= self._base + self._capacity:
            return False
        if not (
            _fits(attributes.item_id, items.item_ids)
            and _fits(attributes.brand, items.brands)
            and _fits(attributes.category, items.categories)
        ):
            # Wider than the snapshot's columns: storing it would truncate names rules compare.
            return False
        if not attributes.price > 0:
            return False
        row = self._next
        items.item_ids[row] = attributes.item_id
        items.titles[row] = attributes.title[: items.titles.dtype.itemsize // 4]
        items.brands[row] = attributes.brand
        items.categories[row] = attributes.category
        items.category_codes[row] = self._code(self._category_code, attributes.category)
        items.brand_codes[row] = self._code(self._brand_code, attributes.brand)
        items.prices[row] = attributes.price
        items.stock[row] = attributes.stock
        items.created_at[row] = attributes.created_at
        self._next = row + 1
        self.item_row[attributes.item_id] = row
        return True

    @staticmethod
    def _code(codes: dict[str, int], name: str) -> int:
        """The snapshot's code for ``name``; a new name gets the next free code (a category
        the model never saw, which LightGBM treats as such)."""
        if name not in codes:
            codes[name] = max(codes.values(), default=-1) + 1
        return codes[name]
