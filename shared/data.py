"""Vitrine's data model and its on-disk format.

A dataset directory holds three Parquet files and a JSON descriptor:

``items.parquet``
    item_id (string, unique), title, description, brand, category (strings),
    price (float64, > 0), stock (int64, >= 0), created_at (int64, unix seconds).
``users.parquet``
    user_id (string, unique), created_at (int64, unix seconds), plus optional
    string profile columns (e.g. ``region``, ``age_band``).
``events.parquet``
    user_id, item_id (strings referring to the two tables above),
    event_type (one of :data:`EVENT_TYPES`), timestamp (int64, unix seconds),
    device (string), session_id (string).
``dataset.json``
    ``{"schema_version": 1, "name": ..., "created_at": ..., "counts": {...},
    "source": {...}}``.

Loaders of public formats (MovieLens, Amazon reviews, CSV) produce the same
:class:`Dataset`, so every offline step works on any of them.

In memory, ids stay strings at the edges (files, gRPC) and become dense int32
indices inside: ``Catalog.item_ids[i]`` is the id of item row ``i`` and
``Events.item_index`` points into that table.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1

EVENT_TYPES: tuple[str, ...] = ("view", "cart", "purchase", "wishlist")
"""Event types; the position is the event code, stored in artifacts (ranker event
snapshots), so new types are appended, never inserted. The order is NOT the order of
intent (view < wishlist < cart < purchase): that is :data:`shared.interactions.EVENT_INTENT`."""

EVENT_CODE: dict[str, int] = {name: code for code, name in enumerate(EVENT_TYPES)}
VIEW, CART, PURCHASE, WISHLIST = (EVENT_CODE[name] for name in EVENT_TYPES)

DEVICES: tuple[str, ...] = ("web", "ios", "android")

IntArray = npt.NDArray[np.int64]
Int32Array = npt.NDArray[np.int32]
FloatArray = npt.NDArray[np.float64]
StrArray = npt.NDArray[np.str_]


class DatasetError(ValueError):
    """A dataset directory is missing a file or holds data that breaks the schema."""


@dataclass(frozen=True)
class Catalog:
    """The item table, one row per item."""

    item_ids: StrArray
    titles: StrArray
    descriptions: StrArray
    brands: StrArray
    categories: StrArray
    prices: FloatArray
    stock: IntArray
    created_at: IntArray

    def __len__(self) -> int:
        return len(self.item_ids)

    def index_of(self) -> dict[str, int]:
        """Map from item id to row index."""
        return {item_id: row for row, item_id in enumerate(self.item_ids.tolist())}

    def select(self, mask: npt.NDArray[np.bool_]) -> Catalog:
        """The rows where ``mask`` is true, order kept."""
        return Catalog(
            item_ids=self.item_ids[mask],
            titles=self.titles[mask],
            descriptions=self.descriptions[mask],
            brands=self.brands[mask],
            categories=self.categories[mask],
            prices=self.prices[mask],
            stock=self.stock[mask],
            created_at=self.created_at[mask],
        )

    def embedding_texts(self) -> list[str]:
        """The text a content embedding is computed from, one per item."""
        return [
            f"{title}. {brand}, {category}. {description}"
            for title, brand, category, description in zip(
                self.titles.tolist(),
                self.brands.tolist(),
                self.categories.tolist(),
                self.descriptions.tolist(),
                strict=True,
            )
        ]


@dataclass(frozen=True)
class Users:
    """The user table. Profile columns are optional and free-form."""

    user_ids: StrArray
    created_at: IntArray
    profile: dict[str, StrArray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.user_ids)

    def index_of(self) -> dict[str, int]:
        return {user_id: row for row, user_id in enumerate(self.user_ids.tolist())}


@dataclass(frozen=True)
class Events:
    """Interaction events sorted by timestamp, ids as row indices."""

    user_index: Int32Array
    item_index: Int32Array
    event_code: npt.NDArray[np.int8]
    timestamp: IntArray
    device: StrArray
    session_id: StrArray

    def __len__(self) -> int:
        return len(self.user_index)

    def digest(self) -> str:
        """A SHA-256 of every column: equal events, equal digests."""
        hashed = hashlib.sha256()
        for column in (self.user_index, self.item_index, self.event_code, self.timestamp):
            hashed.update(f"{column.dtype}:{len(column)}".encode())
            hashed.update(np.ascontiguousarray(column).tobytes())
        for strings in (self.device, self.session_id):
            hashed.update("\x00".join(strings.tolist()).encode())
            hashed.update(b"\x01")
        return hashed.hexdigest()

    def select(self, mask: npt.NDArray[np.bool_]) -> Events:
        """The events where ``mask`` is true, order kept."""
        return Events(
            user_index=self.user_index[mask],
            item_index=self.item_index[mask],
            event_code=self.event_code[mask],
            timestamp=self.timestamp[mask],
            device=self.device[mask],
            session_id=self.session_id[mask],
        )

    def time_at(self, fraction: float) -> int:
        """The time ``fraction`` of the way from the first to the last event."""
        first, last = int(self.timestamp.min()), int(self.timestamp.max())
        return int(first + fraction * (last - first))

    def before(self, cutoff: int) -> Events:
        """Events strictly before ``cutoff`` (unix seconds)."""
        return self.select(self.timestamp < cutoff)


@dataclass(frozen=True)
class Dataset:
    name: str
    catalog: Catalog
    users: Users
    events: Events
    source: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {"items": len(self.catalog), "users": len(self.users), "events": len(self.events)}

    def select_items(self, mask: npt.NDArray[np.bool_]) -> Dataset:
        """The items where ``mask`` (one per catalogue row) is true, order kept; the events of
        the others go, the rest point at their item's new row."""
        new_row = (np.cumsum(mask) - 1).astype(np.int32)
        kept = self.events.select(mask[self.events.item_index])
        events = Events(
            user_index=kept.user_index,
            item_index=new_row[kept.item_index],
            event_code=kept.event_code,
            timestamp=kept.timestamp,
            device=kept.device,
            session_id=kept.session_id,
        )
        return Dataset(self.name, self.catalog.select(mask), self.users, events, self.source)

    def existing_at(self, moment: int) -> Dataset:
        """The dataset as it was at ``moment``: only the items created by then (their
        ``created_at`` is never after their first event, see shared/loaders.py). Events are
        not cut: a caller that wants the past selects them by time as well."""
        return self.select_items(self.catalog.created_at <= moment)


def _strings(column: pa.ChunkedArray | pa.Array) -> StrArray:
    return np.asarray(column.to_pylist(), dtype=np.str_)


def _require_columns(table: pa.Table, path: Path, required: dict[str, str]) -> None:
    missing = [name for name in required if name not in table.column_names]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(missing)}; "
            f"expected {', '.join(f'{k} ({v})' for k, v in required.items())}"
        )
    for name in required:
        if table.column(name).null_count:
            raise DatasetError(f"{path}: column {name!r} has {table.column(name).null_count} null value(s)")


_ITEM_COLUMNS = {
    "item_id": "string",
    "title": "string",
    "description": "string",
    "brand": "string",
    "category": "string",
    "price": "float64",
    "stock": "int64",
    "created_at": "int64",
}
_USER_COLUMNS = {"user_id": "string", "created_at": "int64"}
_EVENT_COLUMNS = {
    "user_id": "string",
    "item_id": "string",
    "event_type": "string",
    "timestamp": "int64",
    "device": "string",
    "session_id": "string",
}


def _read_table(path: Path, required: dict[str, str]) -> pa.Table:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (a dataset directory holds items, users and events Parquet files)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(f"{path}: not a readable Parquet file: {err}") from err
    _require_columns(table, path, required)
    return table


def _unique_ids(ids: StrArray, path: Path, column: str) -> None:
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        dupes = unique[counts > 1][:5].tolist()
        raise DatasetError(f"{path}: column {column!r} must be unique; duplicated: {dupes}")


def load_dataset(directory: Path) -> Dataset:
    """Read and validate a dataset directory written by :func:`save_dataset`."""
    directory = Path(directory)
    descriptor_path = directory / "dataset.json"
    if not descriptor_path.is_file():
        raise DatasetError(f"{descriptor_path}: file not found; is {directory} a Vitrine dataset directory?")
    descriptor = json.loads(descriptor_path.read_text())
    if descriptor.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(
            f"{descriptor_path}: schema_version {descriptor.get('schema_version')!r} is not supported "
            f"(this build reads {SCHEMA_VERSION})"
        )

    items_path = directory / "items.parquet"
    items = _read_table(items_path, _ITEM_COLUMNS)
    catalog = Catalog(
        item_ids=_strings(items.column("item_id")),
        titles=_strings(items.column("title")),
        descriptions=_strings(items.column("description")),
        brands=_strings(items.column("brand")),
        categories=_strings(items.column("category")),
        prices=items.column("price").to_numpy().astype(np.float64),
        stock=items.column("stock").to_numpy().astype(np.int64),
        created_at=items.column("created_at").to_numpy().astype(np.int64),
    )
    _unique_ids(catalog.item_ids, items_path, "item_id")
    if np.any(catalog.prices <= 0) or not np.all(np.isfinite(catalog.prices)):
        raise DatasetError(f"{items_path}: every price must be a finite number > 0")

    users_path = directory / "users.parquet"
    users_table = _read_table(users_path, _USER_COLUMNS)
    users = Users(
        user_ids=_strings(users_table.column("user_id")),
        created_at=users_table.column("created_at").to_numpy().astype(np.int64),
        profile={
            name: _strings(users_table.column(name)) for name in users_table.column_names if name not in _USER_COLUMNS
        },
    )
    _unique_ids(users.user_ids, users_path, "user_id")

    events_path = directory / "events.parquet"
    events_table = _read_table(events_path, _EVENT_COLUMNS)
    events = _encode_events(events_table, catalog, users, events_path)
    return Dataset(
        name=str(descriptor.get("name", directory.name)),
        catalog=catalog,
        users=users,
        events=events,
        source=dict(descriptor.get("source", {})),
    )


def _lookup(ids: StrArray, known: StrArray, path: Path, column: str) -> Int32Array:
    order = np.argsort(known)
    sorted_known = known[order]
    position = np.searchsorted(sorted_known, ids)
    position = np.clip(position, 0, len(sorted_known) - 1)
    found = sorted_known[position] == ids
    if not np.all(found):
        first_bad = int(np.flatnonzero(~found)[0])
        raise DatasetError(
            f"{path}: row {first_bad}: {column} {str(ids[first_bad])!r} is not in the "
            f"{'items' if column == 'item_id' else 'users'} table ({int((~found).sum())} such row(s))"
        )
    return order[position].astype(np.int32)


def _encode_events(table: pa.Table, catalog: Catalog, users: Users, path: Path) -> Events:
    types = _strings(table.column("event_type"))
    codes = np.full(len(types), -1, dtype=np.int8)
    for name, code in EVENT_CODE.items():
        codes[types == name] = code
    if np.any(codes < 0):
        first_bad = int(np.flatnonzero(codes < 0)[0])
        raise DatasetError(
            f"{path}: row {first_bad}: event_type {str(types[first_bad])!r} is not one of {', '.join(EVENT_TYPES)}"
        )
    timestamps = table.column("timestamp").to_numpy().astype(np.int64)
    order = np.argsort(timestamps, kind="stable")
    return Events(
        user_index=_lookup(_strings(table.column("user_id")), users.user_ids, path, "user_id")[order],
        item_index=_lookup(_strings(table.column("item_id")), catalog.item_ids, path, "item_id")[order],
        event_code=codes[order],
        timestamp=timestamps[order],
        device=_strings(table.column("device"))[order],
        session_id=_strings(table.column("session_id"))[order],
    )


def save_dataset(dataset: Dataset, directory: Path) -> None:
    """Write ``dataset`` in the documented on-disk format."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    catalog = dataset.catalog
    pq.write_table(
        pa.table(
            {
                "item_id": pa.array(catalog.item_ids.tolist(), pa.string()),
                "title": pa.array(catalog.titles.tolist(), pa.string()),
                "description": pa.array(catalog.descriptions.tolist(), pa.string()),
                "brand": pa.array(catalog.brands.tolist(), pa.string()),
                "category": pa.array(catalog.categories.tolist(), pa.string()),
                "price": pa.array(catalog.prices, pa.float64()),
                "stock": pa.array(catalog.stock, pa.int64()),
                "created_at": pa.array(catalog.created_at, pa.int64()),
            }
        ),
        directory / "items.parquet",
    )
    user_columns: dict[str, pa.Array] = {
        "user_id": pa.array(dataset.users.user_ids.tolist(), pa.string()),
        "created_at": pa.array(dataset.users.created_at, pa.int64()),
    }
    for name, values in dataset.users.profile.items():
        user_columns[name] = pa.array(values.tolist(), pa.string())
    pq.write_table(pa.table(user_columns), directory / "users.parquet")
    events = dataset.events
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array(dataset.users.user_ids[events.user_index].tolist(), pa.string()),
                "item_id": pa.array(catalog.item_ids[events.item_index].tolist(), pa.string()),
                "event_type": pa.array([EVENT_TYPES[c] for c in events.event_code.tolist()], pa.string()),
                "timestamp": pa.array(events.timestamp, pa.int64()),
                "device": pa.array(events.device.tolist(), pa.string()),
                "session_id": pa.array(events.session_id.tolist(), pa.string()),
            }
        ),
        directory / "events.parquet",
    )
    descriptor = {
        "schema_version": SCHEMA_VERSION,
        "name": dataset.name,
        "created_at": int(time.time()),
        "counts": dataset.counts(),
        "source": dataset.source,
    }
    (directory / "dataset.json").write_text(json.dumps(descriptor, indent=2, sort_keys=True) + "\n")
