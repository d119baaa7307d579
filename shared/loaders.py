"""Loaders that map public dataset formats onto Vitrine's data model (:mod:`shared.data`).

Three formats, chosen on the command line as ``--dataset FORMAT:PATH``:

``movielens-100k``
    PATH is the ``ml-100k`` directory (u.data, u.item, u.user, u.genre, u.occupation;
    latin-1 text, no header rows).
``amazon-reviews``
    The Amazon Review Data (2018) JSON Lines files: PATH is a directory holding one
    ``*_5.json`` reviews file and one ``meta_*.json`` metadata file (``.json.gz`` works too),
    or the reviews file itself with the metadata file found next to it or given explicitly.
``csv``
    A generic pair: PATH is the interactions file, ``--csv-items`` the items file, each
    ``.csv``, ``.tsv`` or ``.parquet``; column names are options, so an unseen dataset loads
    without code changes.

Mapping conventions (they shape what an offline evaluation measures):

* Ratings become events: rating >= ``purchase_rating`` (4) -> ``purchase``, rating >=
  ``cart_rating`` (3) -> ``cart``, lower -> ``view``. Without a rating (csv with no rating
  column) every interaction is a ``purchase`` unless an event-type column is named (its values
  must be view/cart/purchase or a common alias, see :data:`EVENT_ALIASES`).
* timestamp = the rating/review/interaction time; device = ``"web"`` (no source records one);
  session_id = ``f"{user_id}-{YYYY-MM-DD}"``: one session per user per UTC day.
* Duplicate (user, item) ratings, reviews or interactions: the latest is kept, the rest are
  dropped and counted. An event log (csv with an event-type column) legitimately repeats a
  (user, item) pair (a view, then a purchase; a revisit), so there only exact repeats of
  (user, item, event type, timestamp) are dropped.
* Users are the users with at least one kept event; created_at = their first event time.
  Items keep created_at from the source when it has one, else their first event time; a
  source date after the item's first event is moved back to that event (counted): an item
  exists by the time anyone interacts with it, which is what time splits rely on.
* Prices the source does not give are set to 1.0 (the data model needs a price > 0); the
  report counts them, so price features on such a dataset are known to be meaningless.
* stock = 1 for every item (no source records availability).

MovieLens 100K: item_id = movie id; title = the title (it already holds the year);
description = ``"Genres: Action, Comedy, War. Released 1995."``; brand = ``""``; category =
the genres joined with ``"|"`` in u.genre order (``"unknown"`` when none); price = 1.0 for
all; created_at = the release date (else the first rating time). User profile columns:
``age_band`` (``"under-18"``, then the generator's bands ``"18-24"`` ... ``"65+"``),
``gender``, ``occupation``, ``zip_prefix`` (the first character of the zip code).

Amazon reviews 2018: user = reviewerID, item = asin, rating = overall, timestamp =
unixReviewTime. Items come from the metadata: title, description (list joined), brand,
category (list, duplicates removed, joined with ``" > "``; ``"unknown"`` when empty), price
parsed from ``"$25.00"`` or ``"$10.00 - $20.00"`` (lower bound; missing or unparseable ->
1.0). HTML in the metadata is stripped with a regex and entities unescaped: cheap, good enough
for embedding text, not a faithful HTML parser. Metadata rows of items without reviews and
reviews of items without metadata are dropped; duplicate metadata rows keep the first.

Generic csv: the first text column is the title, the others are joined into the
description. Timestamps are unix seconds or ISO 8601 dates/times (naive ones read as UTC);
without a timestamp column the row order gives synthetic timestamps 0, 1, 2, ... (and the
report says so). Interactions with items missing from the items file are dropped; items
without interactions are kept (cold-start candidates).

A malformed file (wrong number of fields, invalid JSON, a missing column or file) raises
:class:`shared.data.DatasetError` naming the file and the 1-based line or row. Rows with bad
values (an unparseable rating or timestamp, an unknown id) are dropped and counted in the
:class:`LoadReport` by reason, with where each reason was first seen.
"""

from __future__ import annotations

import argparse
import bisect
import calendar
import csv
import datetime as dt
import gzip
import html
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from shared.data import (
    EVENT_CODE,
    EVENT_TYPES,
    PURCHASE,
    Catalog,
    Dataset,
    DatasetError,
    Events,
    Int32Array,
    IntArray,
    StrArray,
    Users,
)
from shared.datagen import AGE_BANDS
from shared.logs import event

log = logging.getLogger(__name__)

DATASET_FORMATS: tuple[str, ...] = ("movielens-100k", "amazon-reviews", "csv")

PURCHASE_RATING = 4.0
CART_RATING = 3.0
UNKNOWN_PRICE = 1.0
DEVICE = "web"
STOCK = 1
UNKNOWN_CATEGORY = "unknown"
MISSING_PRICE = f"missing price (set to {UNKNOWN_PRICE})"
BAD_PRICE = f"unparseable price (set to {UNKNOWN_PRICE})"
EARLY_EVENT_REASON = "creation date after the item's first event (moved back to it)"

EVENT_ALIASES: dict[str, str] = {
    "click": "view",
    "detail": "view",
    "pageview": "view",
    "add_to_cart": "cart",
    "addtocart": "cart",
    "add-to-cart": "cart",
    "buy": "purchase",
    "order": "purchase",
    "transaction": "purchase",
    "add_to_wishlist": "wishlist",
    "addtowishlist": "wishlist",
    "add-to-wishlist": "wishlist",
}
"""Event-type spellings of common logs, mapped onto :data:`shared.data.EVENT_TYPES`."""

# The lower bounds of shared.datagen.AGE_BANDS ("18-24", ..., "65+").
_AGE_BAND_STARTS: tuple[int, ...] = (18, 25, 35, 45, 55, 65)
_UNDER_18 = "under-18"
# Spelled out: calendar.month_abbr follows the process locale.
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")
_PRICE = re.compile(r"^\s*[$£€]?\s*(\d[\d,]*(?:\.\d+)?)")
Int8Array = npt.NDArray[np.int8]


@dataclass(frozen=True)
class LoadReport:
    """What a loader read, what it dropped or repaired and why."""

    format: str
    paths: tuple[str, ...]
    rows_read: dict[str, int]
    dropped: dict[str, int]
    """Rows dropped (or values repaired: the reason says so), by reason."""
    first_seen: dict[str, str]
    """Where each reason of :attr:`dropped` first occurred, e.g. ``"u.data line 17"``."""
    notes: tuple[str, ...]
    counts: dict[str, int]

    def summary(self) -> str:
        counts = self.counts
        lines = [f"{self.format}: {counts['items']} items, {counts['users']} users, {counts['events']} events"]
        lines += [f"  read {rows} rows from {path}" for path, rows in self.rows_read.items()]
        if self.dropped:
            lines.append("  dropped or repaired:")
            lines += [
                f"    {count:>8}  {reason} (first: {self.first_seen[reason]})" for reason, count in self.dropped.items()
            ]
        else:
            lines.append("  nothing dropped or repaired")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class LoadResult:
    dataset: Dataset
    report: LoadReport


class _Tally:
    """Collects rows read, drop reasons and notes while a loader runs."""

    def __init__(self) -> None:
        self.rows_read: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.first_seen: dict[str, str] = {}
        self.notes: list[str] = []

    def drop(self, reason: str, where: str, count: int = 1) -> None:
        if count <= 0:
            return
        self.dropped[reason] = self.dropped.get(reason, 0) + count
        self.first_seen.setdefault(reason, where)


@dataclass
class _Interactions:
    """Parsed interactions, one entry per kept source row."""

    source: str
    row_label: str
    kind: str
    """What one row is ("rating", "review", "interaction", "event"), for drop reasons."""
    exact_duplicates_only: bool = False
    users: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    def add(self, user: str, item: str, code: int, timestamp: int, row: int) -> None:
        self.users.append(user)
        self.items.append(item)
        self.codes.append(code)
        self.timestamps.append(timestamp)
        self.rows.append(row)

    def where(self, position: int) -> str:
        return f"{self.source} {self.row_label} {self.rows[position]}"


@dataclass
class _Items:
    """Parsed items; created_at is None where the source has no creation time."""

    source: str
    row_label: str
    ids: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    descriptions: list[str] = field(default_factory=list)
    brands: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    prices: list[float] = field(default_factory=list)
    created_at: list[int | None] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    repairs: list[tuple[str, ...]] = field(default_factory=list)
    """Per item, the reasons its values were repaired; counted only for items that are kept."""

    def add(
        self,
        item_id: str,
        row: int,
        *,
        title: str,
        description: str,
        brand: str,
        category: str,
        price: float,
        created_at: int | None,
        repairs: tuple[str, ...] = (),
    ) -> None:
        self.ids.append(item_id)
        self.titles.append(title)
        self.descriptions.append(description)
        self.brands.append(brand)
        self.categories.append(category)
        self.prices.append(price)
        self.created_at.append(created_at)
        self.rows.append(row)
        self.repairs.append(repairs)

    def where(self, position: int) -> str:
        return f"{self.source} {self.row_label} {self.rows[position]}"


# --- value parsing -----------------------------------------------------------------------------


def rating_to_event(
    rating: float, *, purchase_rating: float = PURCHASE_RATING, cart_rating: float = CART_RATING
) -> str:
    """The event type a rating stands for (see the module docstring)."""
    if rating >= purchase_rating:
        return "purchase"
    if rating >= cart_rating:
        return "cart"
    return "view"


def _check_thresholds(purchase_rating: float, cart_rating: float) -> None:
    if not cart_rating <= purchase_rating:
        raise DatasetError(f"cart rating {cart_rating} must not exceed purchase rating {purchase_rating}")


def age_band(age: int) -> str:
    """MovieLens age -> the age bands of the generated dataset, plus ``"under-18"``."""
    if age < _AGE_BAND_STARTS[0]:
        return _UNDER_18
    return AGE_BANDS[bisect.bisect_right(_AGE_BAND_STARTS, age) - 1]


def parse_price(text: str) -> float | None:
    """``"$25.00"`` -> 25.0, ``"$10.00 - $20.00"`` -> 10.0 (lower bound); None if unparseable or <= 0."""
    match = _PRICE.match(text)
    if match is None:
        return None
    value = float(match.group(1).replace(",", ""))
    return value if math.isfinite(value) and value > 0 else None


def clean_html(text: str) -> str:
    """Strip tags and unescape entities with a regex: enough for embedding text, not a parser."""
    return _SPACE.sub(" ", html.unescape(_TAG.sub(" ", text))).strip()


def _as_id(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else str(value)
    text = str(value).strip()
    return text or None


def _as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _as_timestamp(value: Any) -> int | None:
    """Unix seconds from an int, a float, a numeric string, an ISO 8601 string or a datetime/date."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else None
    if isinstance(value, dt.datetime):
        return _datetime_seconds(value)
    if isinstance(value, dt.date):
        return calendar.timegm(value.timetuple())
    text = str(value).strip()
    number = _as_float(text)
    if number is not None:
        return int(number)
    try:
        return _datetime_seconds(dt.datetime.fromisoformat(text))
    except ValueError:
        return None


def _datetime_seconds(moment: dt.datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp())


def _movielens_date(text: str) -> int | None:
    """``"01-Jan-1995"`` -> unix seconds (UTC midnight); None if not in that form."""
    parts = text.split("-")
    if len(parts) != 3 or parts[1] not in _MONTHS or not parts[0].isdigit() or not parts[2].isdigit():
        return None
    try:
        return calendar.timegm(dt.date(int(parts[2]), _MONTHS[parts[1]], int(parts[0])).timetuple())
    except ValueError:
        return None


# --- reading files -----------------------------------------------------------------------------


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (expected {what})")


def _text_lines(path: Path, what: str, encoding: str) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers, line endings removed."""
    _require_file(path, what)
    number = 0
    try:
        with path.open(encoding=encoding) as handle:
            for number, line in enumerate(handle, start=1):
                text = line.rstrip("\r\n")
                if text.strip():
                    yield number, text
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path} line {number + 1}: not valid {encoding} text ({error.reason})") from error


def _split(path: Path, number: int, line: str, separator: str, expected: int) -> list[str]:
    fields = line.split(separator)
    if len(fields) != expected:
        name = "tab" if separator == "\t" else repr(separator)
        raise DatasetError(f"{path} line {number}: expected {expected} {name}-separated fields, got {len(fields)}")
    return fields


def _open_utf8(path: Path) -> TextIO:
    """A text file, gunzipped on the fly when it ends in .gz (as the Amazon downloads do)."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _json_lines(path: Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """JSON objects of a JSON Lines file (optionally gzipped) with their 1-based line numbers."""
    _require_file(path, what)
    number = 0
    try:
        with _open_utf8(path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DatasetError(
                        f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno})"
                    ) from error
                if not isinstance(record, dict):
                    raise DatasetError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
                yield number, record
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path} line {number + 1}: not valid UTF-8 ({error.reason})") from error
    except (gzip.BadGzipFile, EOFError) as error:
        raise DatasetError(f"{path}: not a readable gzip file ({error})") from error


@dataclass(frozen=True)
class _Columns:
    """Selected columns of a csv or Parquet table, by role, with 1-based source rows."""

    values: dict[str, list[Any]]
    rows: list[int]
    row_label: str


def _table_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise DatasetError(f"{path}: unknown file type {suffix!r}; expected .csv, .tsv or .parquet")


def _missing_columns(path: Path, present: list[str], wanted: dict[str, str]) -> None:
    missing = [f"{column!r} ({role})" for role, column in wanted.items() if column not in present]
    if missing:
        raise DatasetError(f"{path}: no column {', '.join(missing)}; the file has columns {', '.join(present)}")


def _read_columns(path: Path, wanted: dict[str, str], what: str, delimiter: str | None) -> _Columns:
    """The ``wanted`` columns (role -> column name) of a csv or Parquet file."""
    _require_file(path, what)
    if _table_kind(path) == "parquet":
        return _read_parquet_columns(path, wanted)
    return _read_csv_columns(path, wanted, delimiter or ("\t" if path.suffix.lower() == ".tsv" else ","))


def _read_parquet_columns(path: Path, wanted: dict[str, str]) -> _Columns:
    try:
        schema = pq.read_schema(path)
        _missing_columns(path, list(schema.names), wanted)
        table = pq.read_table(path, columns=sorted(set(wanted.values())))
    except (pa.ArrowInvalid, OSError) as error:
        raise DatasetError(f"{path}: not a readable Parquet file ({error})") from error
    values = {role: table.column(column).to_pylist() for role, column in wanted.items()}
    return _Columns(values=values, rows=list(range(1, table.num_rows + 1)), row_label="row")


def _read_csv_columns(path: Path, wanted: dict[str, str], delimiter: str) -> _Columns:
    values: dict[str, list[Any]] = {role: [] for role in wanted}
    rows: list[int] = []
    line = 0
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise DatasetError(f"{path}: empty file; expected a header row naming the columns")
            header = [name.strip() for name in header]
            _missing_columns(path, header, wanted)
            positions = {role: header.index(column) for role, column in wanted.items()}
            for record in reader:
                line = reader.line_num
                if not record:
                    continue
                if len(record) != len(header):
                    raise DatasetError(
                        f"{path} line {line}: expected {len(header)} {delimiter!r}-separated fields "
                        f"(as in the header), got {len(record)}"
                    )
                for role, position in positions.items():
                    values[role].append(record[position].strip() or None)
                rows.append(line)
    except csv.Error as error:
        raise DatasetError(f"{path} line {line + 1}: {error}") from error
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path} line {line + 1}: not valid UTF-8 ({error.reason})") from error
    return _Columns(values=values, rows=rows, row_label="line")


# --- assembling a Dataset ----------------------------------------------------------------------


def _dedupe(interactions: _Interactions, keep: list[int], tally: _Tally) -> list[int]:
    """Positions left after dropping duplicates: the latest of each (user, item) pair is kept."""
    latest: dict[tuple[str, ...], int] = {}
    for position in keep:
        key: tuple[str, ...] = (interactions.users[position], interactions.items[position])
        if interactions.exact_duplicates_only:
            key += (str(interactions.codes[position]), str(interactions.timestamps[position]))
        previous = latest.get(key)
        # Positions come in source order, so a tie on time goes to the later row.
        if previous is None or interactions.timestamps[position] >= interactions.timestamps[previous]:
            latest[key] = position
    kept = sorted(latest.values())
    dropped = sorted(set(keep) - set(kept))
    if dropped:
        reason = (
            f"duplicate {interactions.kind} (exact repeat)"
            if interactions.exact_duplicates_only
            else f"duplicate {interactions.kind} (latest kept)"
        )
        tally.drop(reason, interactions.where(dropped[0]), len(dropped))
    return kept


def _known_ids(
    interactions: _Interactions, items: _Items, known_users: list[str] | None, unknown_item_reason: str, tally: _Tally
) -> list[int]:
    """Positions of the interactions whose item (and user, when the source lists users) exists."""
    item_ids = set(items.ids)
    user_ids = set(known_users) if known_users is not None else None
    keep: list[int] = []
    for position, (user, item) in enumerate(zip(interactions.users, interactions.items, strict=True)):
        if item not in item_ids:
            tally.drop(unknown_item_reason, interactions.where(position))
        elif user_ids is not None and user not in user_ids:
            tally.drop("unknown user", interactions.where(position))
        else:
            keep.append(position)
    return keep


def _active_users(
    interactions: _Interactions, kept: list[int], known_users: list[str] | None, tally: _Tally
) -> list[str]:
    """Users with kept events: in the source's user-table order if it has one, else first seen first."""
    active = dict.fromkeys(interactions.users[position] for position in kept)
    if known_users is None:
        return list(active)
    inactive = [user for user in known_users if user not in active]
    if inactive:
        tally.drop(f"user without {interactions.kind}s", f"user {inactive[0]}", len(inactive))
    return [user for user in known_users if user in active]


def _item_rows(items: _Items, used: set[str], unused_item_reason: str | None, tally: _Tally) -> list[int]:
    """Rows of the items to keep (all, or only used ones when ``unused_item_reason`` is given)."""
    rows = list(range(len(items.ids)))
    if unused_item_reason is None:
        return rows
    unused = [row for row in rows if items.ids[row] not in used]
    if unused:
        tally.drop(unused_item_reason, items.where(unused[0]), len(unused))
    return [row for row in rows if items.ids[row] in used]


def _first_times(index: Int32Array, timestamps: IntArray, size: int) -> IntArray:
    """Per row of a table, the earliest timestamp of its events (int64 max when none)."""
    first = np.full(size, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, index, timestamps)
    return first


def _catalog(
    items: _Items, rows: list[int], first_event: IntArray, created_fallback_reason: str | None, tally: _Tally
) -> Catalog:
    """The kept item rows as a :class:`Catalog`; their repairs are counted here, once kept."""
    for row in rows:
        for reason in items.repairs[row]:
            tally.drop(reason, items.where(row))
    created = [items.created_at[row] for row in rows]
    fallback = [new for new, value in enumerate(created) if value is None]
    if created_fallback_reason is not None and fallback:
        tally.drop(created_fallback_reason, items.where(rows[fallback[0]]), len(fallback))
    # An item exists from its first event at the latest: time splits and training replays
    # treat an item created after a request as not yet there (Dataset.existing_at).
    early = [new for new, value in enumerate(created) if value is not None and first_event[new] < value]
    if early:
        tally.drop(EARLY_EVENT_REASON, items.where(rows[early[0]]), len(early))

    def pick(values: list[str]) -> StrArray:
        return np.asarray([values[row] for row in rows], dtype=np.str_)

    return Catalog(
        item_ids=pick(items.ids),
        titles=pick(items.titles),
        descriptions=pick(items.descriptions),
        brands=pick(items.brands),
        categories=pick(items.categories),
        prices=np.asarray([items.prices[row] for row in rows], dtype=np.float64),
        stock=np.full(len(rows), STOCK, dtype=np.int64),
        created_at=np.asarray(
            [
                int(first_event[new]) if value is None else min(value, int(first_event[new]))
                for new, value in enumerate(created)
            ],
            dtype=np.int64,
        ),
    )


def _events(
    user_ids: StrArray, user_index: Int32Array, item_index: Int32Array, codes: Int8Array, timestamps: IntArray
) -> Events:
    """Events in time order, one session per user per UTC day, all on the web."""
    order = np.argsort(timestamps, kind="stable")
    days = timestamps[order].astype("datetime64[s]").astype("datetime64[D]").astype(np.str_)
    return Events(
        user_index=user_index[order],
        item_index=item_index[order],
        event_code=codes[order],
        timestamp=timestamps[order],
        device=np.asarray([DEVICE] * len(order), dtype=np.str_),
        session_id=np.char.add(np.char.add(user_ids[user_index[order]], "-"), days),
    )


def _assemble(
    name: str,
    interactions: _Interactions,
    items: _Items,
    tally: _Tally,
    *,
    unknown_item_reason: str,
    known_users: list[str] | None = None,
    profile: dict[str, dict[str, str]] | None = None,
    unused_item_reason: str | None = None,
    created_fallback_reason: str | None = None,
) -> Dataset:
    """Validate ids, drop duplicates and build the :class:`Dataset`.

    ``known_users`` (with ``profile``: column -> user id -> value) is the user table of a
    source that has one; otherwise users are those with events. With ``unused_item_reason``,
    items without kept events are dropped under that reason.
    """
    kept = _dedupe(interactions, _known_ids(interactions, items, known_users, unknown_item_reason, tally), tally)
    if not kept:
        raise DatasetError(
            f"{interactions.source}: no {interactions.kind}s left "
            f"(dropped: {', '.join(f'{n} {r}' for r, n in tally.dropped.items()) or 'none read'})"
        )
    item_rows = _item_rows(items, {interactions.items[p] for p in kept}, unused_item_reason, tally)
    user_ids = _active_users(interactions, kept, known_users, tally)
    user_row = {user: row for row, user in enumerate(user_ids)}
    item_row = {items.ids[row]: new for new, row in enumerate(item_rows)}
    user_index = np.asarray([user_row[interactions.users[p]] for p in kept], dtype=np.int32)
    item_index = np.asarray([item_row[interactions.items[p]] for p in kept], dtype=np.int32)
    timestamps = np.asarray([interactions.timestamps[p] for p in kept], dtype=np.int64)
    codes = np.asarray([interactions.codes[p] for p in kept], dtype=np.int8)

    first_event = _first_times(item_index, timestamps, len(item_rows))
    # An item nobody touched gets the first event time of all: as old as the data can tell.
    first_event[first_event == np.iinfo(np.int64).max] = int(timestamps.min())
    users = Users(
        user_ids=np.asarray(user_ids, dtype=np.str_),
        created_at=_first_times(user_index, timestamps, len(user_ids)),
        profile={
            column: np.asarray([by_user[user] for user in user_ids], dtype=np.str_)
            for column, by_user in (profile or {}).items()
        },
    )
    return Dataset(
        name=name,
        catalog=_catalog(items, item_rows, first_event, created_fallback_reason, tally),
        users=users,
        events=_events(users.user_ids, user_index, item_index, codes, timestamps),
    )


def _finish(format_name: str, paths: list[Path], tally: _Tally, dataset: Dataset) -> LoadResult:
    report = LoadReport(
        format=format_name,
        paths=tuple(str(path) for path in paths),
        rows_read={str(path): tally.rows_read[str(path)] for path in paths if str(path) in tally.rows_read},
        dropped=dict(tally.dropped),
        first_seen=dict(tally.first_seen),
        notes=tuple(tally.notes),
        counts=dataset.counts(),
    )
    # dataset.json keeps the provenance, so a saved dataset says what was dropped on the way.
    source = {
        "format": format_name,
        "paths": list(report.paths),
        "rows_read": report.rows_read,
        "dropped": report.dropped,
        "notes": list(report.notes),
    }
    event(log, "dataset loaded", format=format_name, dataset=dataset.name, counts=report.counts, dropped=report.dropped)
    return LoadResult(dataset=replace(dataset, source=source), report=report)


# --- MovieLens 100K ----------------------------------------------------------------------------

_ML_ENCODING = "latin-1"


def _ml_file(directory: Path, name: str, what: str) -> Path:
    path = directory / name
    _require_file(path, f"the MovieLens 100K {what} file {name} in {directory}")
    return path


def read_movielens_genres(path: Path) -> list[str]:
    """u.genre: ``name|index`` lines, indices 0, 1, 2, ... in order."""
    genres: list[str] = []
    for number, line in _text_lines(path, "the MovieLens genre list u.genre", _ML_ENCODING):
        name, index = _split(path, number, line, "|", 2)
        if index.strip() != str(len(genres)):
            raise DatasetError(f"{path} line {number}: genre index {index!r}, expected {len(genres)}")
        genres.append(name.strip())
    if not genres:
        raise DatasetError(f"{path}: no genres")
    return genres


def read_movielens_occupations(path: Path) -> list[str]:
    """u.occupation: one occupation name per line."""
    return [line.strip() for _, line in _text_lines(path, "the MovieLens occupation list u.occupation", _ML_ENCODING)]


def _movielens_description(genres: list[str], released: int | None) -> str:
    text = f"Genres: {', '.join(genres) or UNKNOWN_CATEGORY}."
    if released is not None:
        text += f" Released {dt.datetime.fromtimestamp(released, dt.UTC).year}."
    return text


def read_movielens_items(path: Path, genres: list[str], tally: _Tally) -> _Items:
    """u.item: id|title|release date|video release date|IMDb URL|one 0/1 flag per genre."""
    items = _Items(source=path.name, row_label="line")
    seen: set[str] = set()
    rows = 0
    for number, line in _text_lines(path, "the MovieLens item file u.item", _ML_ENCODING):
        rows += 1
        fields = _split(path, number, line, "|", 5 + len(genres))
        flags = fields[5:]
        for genre, flag in zip(genres, flags, strict=True):
            if flag not in ("0", "1"):
                raise DatasetError(f"{path} line {number}: flag of genre {genre!r} is {flag!r}, expected 0 or 1")
        item_id = fields[0].strip()
        if not item_id or item_id in seen:
            tally.drop("duplicate or empty movie id (first kept)", f"{path.name} line {number}")
            continue
        seen.add(item_id)
        released = _movielens_date(fields[2].strip())
        repairs = [MISSING_PRICE]
        if released is None and fields[2].strip():
            repairs.append("unparseable release date (ignored)")
        item_genres = [genre for genre, flag in zip(genres, flags, strict=True) if flag == "1"]
        items.add(
            item_id,
            number,
            title=fields[1].strip(),
            description=_movielens_description(item_genres, released),
            brand="",
            category="|".join(item_genres) or UNKNOWN_CATEGORY,
            price=UNKNOWN_PRICE,
            created_at=released,
            repairs=tuple(repairs),
        )
    tally.rows_read[str(path)] = rows
    return items


def read_movielens_users(
    path: Path, occupations: list[str], tally: _Tally
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """u.user: id|age|gender|occupation|zip code -> user ids and profile columns."""
    user_ids: list[str] = []
    profile: dict[str, dict[str, str]] = {"age_band": {}, "gender": {}, "occupation": {}, "zip_prefix": {}}
    known_occupations = set(occupations)
    rows = 0
    for number, line in _text_lines(path, "the MovieLens user file u.user", _ML_ENCODING):
        rows += 1
        user_id, age, gender, occupation, zip_code = (part.strip() for part in _split(path, number, line, "|", 5))
        where = f"{path.name} line {number}"
        if not user_id or user_id in profile["gender"]:
            tally.drop("duplicate or empty user id (first kept)", where)
            continue
        if occupation not in known_occupations:
            tally.drop("occupation not in u.occupation (kept)", where)
        if not age.isdigit():
            tally.drop("unparseable age (age_band unknown)", where)
        user_ids.append(user_id)
        profile["age_band"][user_id] = age_band(int(age)) if age.isdigit() else "unknown"
        profile["gender"][user_id] = gender or "unknown"
        profile["occupation"][user_id] = occupation or "unknown"
        profile["zip_prefix"][user_id] = zip_code[:1] or "unknown"
    tally.rows_read[str(path)] = rows
    return user_ids, profile


def read_movielens_ratings(
    path: Path, tally: _Tally, *, purchase_rating: float = PURCHASE_RATING, cart_rating: float = CART_RATING
) -> _Interactions:
    """u.data: user id, item id, rating, unix time, tab-separated."""
    ratings = _Interactions(source=path.name, row_label="line", kind="rating")
    rows = 0
    for number, line in _text_lines(path, "the MovieLens ratings file u.data", _ML_ENCODING):
        rows += 1
        user, item, rating_text, time_text = (part.strip() for part in _split(path, number, line, "\t", 4))
        rating, timestamp = _as_float(rating_text), _as_timestamp(time_text)
        if rating is None:
            tally.drop("unparseable rating", f"{path.name} line {number}")
        elif timestamp is None:
            tally.drop("unparseable timestamp", f"{path.name} line {number}")
        else:
            event_type = rating_to_event(rating, purchase_rating=purchase_rating, cart_rating=cart_rating)
            ratings.add(user, item, EVENT_CODE[event_type], timestamp, number)
    tally.rows_read[str(path)] = rows
    return ratings


def load_movielens_100k(
    directory: Path, *, purchase_rating: float = PURCHASE_RATING, cart_rating: float = CART_RATING
) -> LoadResult:
    """Load the ``ml-100k`` directory (see the module docstring for the mapping)."""
    _check_thresholds(purchase_rating, cart_rating)
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{directory}: not a directory (expected the MovieLens 100K folder holding u.data)")
    tally = _Tally()
    paths = [
        _ml_file(directory, "u.data", "ratings"),
        _ml_file(directory, "u.item", "item"),
        _ml_file(directory, "u.user", "user"),
        _ml_file(directory, "u.genre", "genre"),
        _ml_file(directory, "u.occupation", "occupation"),
    ]
    ratings_path, items_path, users_path, genres_path, occupations_path = paths
    genres, occupations = read_movielens_genres(genres_path), read_movielens_occupations(occupations_path)
    tally.rows_read.update({str(genres_path): len(genres), str(occupations_path): len(occupations)})
    items = read_movielens_items(items_path, genres, tally)
    user_ids, profile = read_movielens_users(users_path, occupations, tally)
    ratings = read_movielens_ratings(ratings_path, tally, purchase_rating=purchase_rating, cart_rating=cart_rating)
    dataset = _assemble(
        "movielens-100k",
        ratings,
        items,
        tally,
        unknown_item_reason="unknown item",
        known_users=user_ids,
        profile=profile,
        created_fallback_reason="missing release date (first rating time used)",
    )
    tally.notes.append("MovieLens has no prices: price features are constant on this dataset")
    tally.notes.append(f"ratings -> events: >= {purchase_rating} purchase, >= {cart_rating} cart, else view")
    return _finish("movielens-100k", paths, tally, dataset)


# --- Amazon reviews 2018 -----------------------------------------------------------------------


def _one_match(directory: Path, patterns: tuple[str, ...], what: str) -> Path:
    found = sorted({path for pattern in patterns for path in directory.glob(pattern)})
    if len(found) != 1:
        listed = ", ".join(path.name for path in found) or "none"
        raise DatasetError(
            f"{directory}: expected exactly one {what} file matching {' or '.join(patterns)}, found {listed}"
        )
    return found[0]


def find_amazon_files(path: Path, meta: Path | None = None) -> tuple[Path, Path]:
    """(reviews, meta) from a directory or from the reviews file (meta next to it unless given)."""
    path = Path(path)
    if path.is_dir():
        reviews = _one_match(path, ("*_5.json", "*_5.json.gz"), "5-core reviews")
        directory = path
    else:
        _require_file(path, "an Amazon reviews JSON Lines file or the directory holding one")
        reviews, directory = path, path.parent
    return reviews, meta if meta is not None else _one_match(directory, ("meta_*.json", "meta_*.json.gz"), "metadata")


def _raw_text(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(_raw_text(part) for part in value)
    return value if isinstance(value, str) else ""


def _text(value: Any) -> str:
    return clean_html(_raw_text(value))


def read_amazon_meta(path: Path, tally: _Tally) -> _Items:
    """The metadata JSON Lines file: one product per line, keyed by asin."""
    items = _Items(source=path.name, row_label="line")
    seen: set[str] = set()
    rows = 0
    for number, record in _json_lines(path, "an Amazon metadata JSON Lines file (meta_*.json)"):
        rows += 1
        where = f"{path.name} line {number}"
        asin = _as_id(record.get("asin"))
        if asin is None:
            tally.drop("metadata row without asin", where)
            continue
        if asin in seen:
            tally.drop("duplicate metadata row (first kept)", where)
            continue
        seen.add(asin)
        repairs: list[str] = []
        raw_price = record.get("price")
        price = parse_price(raw_price) if isinstance(raw_price, str) else None
        if price is None:
            repairs.append(BAD_PRICE if isinstance(raw_price, str) and raw_price.strip() else MISSING_PRICE)
        if any(_TAG.search(_raw_text(record.get(key))) for key in ("title", "brand", "description")):
            repairs.append("HTML tags stripped from title/brand/description")
        title = _text(record.get("title"))
        if not title:
            repairs.append("metadata without title (title left empty)")
        categories = record.get("category")
        category_list = [_text(c) for c in categories] if isinstance(categories, list) else []
        items.add(
            asin,
            number,
            title=title,
            description=_text(record.get("description")),
            brand=_text(record.get("brand")),
            category=" > ".join(dict.fromkeys(c for c in category_list if c)) or UNKNOWN_CATEGORY,
            price=price if price is not None else UNKNOWN_PRICE,
            created_at=None,
            repairs=tuple(repairs),
        )
    tally.rows_read[str(path)] = rows
    return items


def read_amazon_reviews(
    path: Path, tally: _Tally, *, purchase_rating: float = PURCHASE_RATING, cart_rating: float = CART_RATING
) -> _Interactions:
    """The reviews JSON Lines file: reviewerID, asin, overall (rating), unixReviewTime."""
    reviews = _Interactions(source=path.name, row_label="line", kind="review")
    rows = 0
    for number, record in _json_lines(path, "an Amazon reviews JSON Lines file (*_5.json)"):
        rows += 1
        where = f"{path.name} line {number}"
        user, item = _as_id(record.get("reviewerID")), _as_id(record.get("asin"))
        rating, timestamp = _as_float(record.get("overall")), _as_timestamp(record.get("unixReviewTime"))
        if user is None or item is None:
            tally.drop("review without reviewerID or asin", where)
        elif rating is None:
            tally.drop("unparseable rating", where)
        elif timestamp is None:
            tally.drop("unparseable timestamp", where)
        else:
            event_type = rating_to_event(rating, purchase_rating=purchase_rating, cart_rating=cart_rating)
            reviews.add(user, item, EVENT_CODE[event_type], timestamp, number)
    tally.rows_read[str(path)] = rows
    return reviews


def load_amazon_reviews(
    path: Path,
    *,
    meta: Path | None = None,
    purchase_rating: float = PURCHASE_RATING,
    cart_rating: float = CART_RATING,
) -> LoadResult:
    """Load Amazon Review Data (2018) reviews + metadata (see the module docstring)."""
    _check_thresholds(purchase_rating, cart_rating)
    reviews_path, meta_path = find_amazon_files(path, meta)
    tally = _Tally()
    items = read_amazon_meta(meta_path, tally)
    reviews = read_amazon_reviews(reviews_path, tally, purchase_rating=purchase_rating, cart_rating=cart_rating)
    name = reviews_path.name.split(".")[0].removesuffix("_5")
    dataset = _assemble(
        f"amazon-reviews:{name}",
        reviews,
        items,
        tally,
        unknown_item_reason="review of an item without metadata",
        unused_item_reason="metadata row of an item without reviews",
    )
    tally.notes.append("item created_at = the item's first review time (the metadata has no reliable date)")
    tally.notes.append(f"ratings -> events: >= {purchase_rating} purchase, >= {cart_rating} cart, else view")
    return _finish("amazon-reviews", [reviews_path, meta_path], tally, dataset)


# --- generic csv / Parquet pair ----------------------------------------------------------------


@dataclass(frozen=True)
class CsvColumns:
    """Column names of a generic interactions + items pair; None: the file has no such column."""

    user: str = "user_id"
    item: str = "item_id"
    rating: str | None = None
    timestamp: str | None = None
    event: str | None = None
    item_id: str | None = None
    """The id column of the items file; None: the same name as :attr:`item`."""
    text: tuple[str, ...] = ("title",)
    """Text columns of the items file: the first is the title, the rest make the description."""
    brand: str | None = None
    category: str | None = None
    price: str | None = None


def _event_code(value: Any) -> int | None:
    name = _as_id(value)
    if name is None:
        return None
    name = name.lower()
    return EVENT_CODE.get(EVENT_ALIASES.get(name, name))


def read_csv_interactions(
    path: Path,
    columns: CsvColumns,
    tally: _Tally,
    *,
    purchase_rating: float = PURCHASE_RATING,
    cart_rating: float = CART_RATING,
    delimiter: str | None = None,
) -> _Interactions:
    """The interactions file: one row per (user, item) interaction."""
    if columns.rating is not None and columns.event is not None:
        raise DatasetError("name a rating column or an event-type column, not both")
    wanted = {"user": columns.user, "item": columns.item}
    optional = {"rating": columns.rating, "timestamp": columns.timestamp, "event type": columns.event}
    wanted.update({role: column for role, column in optional.items() if column is not None})
    table = _read_columns(path, wanted, "the interactions file (csv, tsv or Parquet)", delimiter)
    kind = "rating" if columns.rating else "event" if columns.event else "interaction"
    interactions = _Interactions(
        source=path.name, row_label=table.row_label, kind=kind, exact_duplicates_only=columns.event is not None
    )
    values = table.values
    for position, row in enumerate(table.rows):
        where = f"{path.name} {table.row_label} {row}"
        user, item = _as_id(values["user"][position]), _as_id(values["item"][position])
        code: int | None = PURCHASE
        if columns.rating is not None:
            rating = _as_float(values["rating"][position])
            code = (
                None
                if rating is None
                else EVENT_CODE[rating_to_event(rating, purchase_rating=purchase_rating, cart_rating=cart_rating)]
            )
        elif columns.event is not None:
            code = _event_code(values["event type"][position])
        # Without a timestamp column, the row order is the time order.
        timestamp = _as_timestamp(values["timestamp"][position]) if columns.timestamp is not None else position
        if user is None or item is None:
            tally.drop("missing user or item id", where)
        elif code is None and columns.rating is not None:
            tally.drop("unparseable rating", where)
        elif code is None:
            tally.drop(f"unknown event type (not {', '.join(EVENT_TYPES)} or an alias)", where)
        elif timestamp is None:
            tally.drop("unparseable timestamp", where)
        else:
            interactions.add(user, item, code, timestamp, row)
    tally.rows_read[str(path)] = len(table.rows)
    if columns.timestamp is None:
        tally.notes.append("no timestamp column: synthetic timestamps 0, 1, 2, ... follow the row order")
    if columns.rating is None and columns.event is None:
        tally.notes.append("no rating or event-type column: every interaction is a purchase")
    return interactions


def _price(value: Any) -> tuple[float | None, str | None]:
    """(price, repair reason): numbers as they are, strings through :func:`parse_price`."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, MISSING_PRICE
    number = parse_price(value) if isinstance(value, str) else _as_float(value)
    if number is None or number <= 0:
        return None, BAD_PRICE
    return number, None


def read_csv_items(path: Path, columns: CsvColumns, tally: _Tally, *, delimiter: str | None = None) -> _Items:
    """The items file: an id column, text columns and optional brand, category and price columns."""
    if not columns.text:
        raise DatasetError(f"{path}: name at least one text column of the items file (it becomes the title)")
    wanted = {"item id": columns.item_id or columns.item}
    wanted.update({f"text {n}": column for n, column in enumerate(columns.text, start=1)})
    optional = {"brand": columns.brand, "category": columns.category, "price": columns.price}
    wanted.update({role: column for role, column in optional.items() if column is not None})
    table = _read_columns(path, wanted, "the items file (csv, tsv or Parquet)", delimiter)
    values = table.values
    items = _Items(source=path.name, row_label=table.row_label)
    seen: set[str] = set()
    for position, row in enumerate(table.rows):
        where = f"{path.name} {table.row_label} {row}"
        item_id = _as_id(values["item id"][position])
        if item_id is None:
            tally.drop("item row without id", where)
            continue
        if item_id in seen:
            tally.drop("duplicate item row (first kept)", where)
            continue
        seen.add(item_id)
        texts = [_as_id(values[f"text {n}"][position]) or "" for n in range(1, len(columns.text) + 1)]
        price, price_repair = _price(values["price"][position]) if columns.price is not None else (None, MISSING_PRICE)
        brand = _as_id(values["brand"][position]) if columns.brand is not None else None
        category = _as_id(values["category"][position]) if columns.category is not None else None
        items.add(
            item_id,
            row,
            title=texts[0],
            description=" ".join(text for text in texts[1:] if text),
            brand=brand or "",
            category=category or UNKNOWN_CATEGORY,
            price=price if price is not None else UNKNOWN_PRICE,
            created_at=None,
            repairs=(price_repair,) if price_repair is not None else (),
        )
    tally.rows_read[str(path)] = len(table.rows)
    return items


def load_csv_pair(
    interactions: Path,
    items: Path,
    columns: CsvColumns | None = None,
    *,
    purchase_rating: float = PURCHASE_RATING,
    cart_rating: float = CART_RATING,
    delimiter: str | None = None,
) -> LoadResult:
    """Load an interactions file and an items file (csv, tsv or Parquet) with the given column names."""
    _check_thresholds(purchase_rating, cart_rating)
    columns = columns or CsvColumns()
    interactions, items = Path(interactions), Path(items)
    tally = _Tally()
    item_table = read_csv_items(items, columns, tally, delimiter=delimiter)
    interaction_table = read_csv_interactions(
        interactions, columns, tally, purchase_rating=purchase_rating, cart_rating=cart_rating, delimiter=delimiter
    )
    dataset = _assemble(
        interactions.stem,
        interaction_table,
        item_table,
        tally,
        unknown_item_reason="interaction with an item not in the items file",
    )
    cold = len(dataset.catalog) - len(np.unique(dataset.events.item_index))
    if cold:
        tally.notes.append(f"{cold} items have no interactions (kept: cold-start candidates)")
    tally.notes.append("item created_at = the item's first interaction time (the earliest event time for cold items)")
    return _finish("csv", [interactions, items], tally, dataset)


# --- command line ------------------------------------------------------------------------------


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dataset FORMAT:PATH`` and the options of each format."""
    parser.add_argument(
        "--dataset",
        required=True,
        metavar="FORMAT:PATH",
        help=(
            f"source dataset; FORMAT is one of {', '.join(DATASET_FORMATS)}. movielens-100k: PATH is the ml-100k "
            "directory. amazon-reviews: PATH is a directory holding *_5.json and meta_*.json (Amazon Review Data "
            "2018), or the reviews file. csv: PATH is the interactions file (.csv, .tsv or .parquet); see the csv "
            "options"
        ),
    )
    parser.add_argument(
        "--purchase-rating",
        type=float,
        default=PURCHASE_RATING,
        metavar="RATING",
        help=f"ratings >= this become purchase events (default {PURCHASE_RATING:g})",
    )
    parser.add_argument(
        "--cart-rating",
        type=float,
        default=CART_RATING,
        metavar="RATING",
        help=f"ratings >= this (and below --purchase-rating) become cart events; lower ones views "
        f"(default {CART_RATING:g})",
    )
    amazon = parser.add_argument_group("amazon-reviews options")
    amazon.add_argument(
        "--amazon-meta",
        type=Path,
        default=None,
        metavar="PATH",
        help="metadata file (default: the one meta_*.json beside the reviews)",
    )
    defaults = CsvColumns()
    group = parser.add_argument_group(
        "csv options",
        "For --dataset csv:INTERACTIONS. Both files are .csv, .tsv or .parquet with a header; unset optional "
        "columns are absent. Timestamps are unix seconds or ISO 8601 (naive = UTC); without a timestamp column "
        "the row order is the time order. Without a rating or event column every interaction is a purchase.",
    )
    group.add_argument("--csv-items", type=Path, default=None, metavar="PATH", help="the items file (required for csv)")
    group.add_argument(
        "--csv-user-col", metavar="COLUMN", default=defaults.user, help=f"user id column (default {defaults.user})"
    )
    group.add_argument(
        "--csv-item-col", metavar="COLUMN", default=defaults.item, help=f"item id column (default {defaults.item})"
    )
    group.add_argument(
        "--csv-rating-col", metavar="COLUMN", default=None, help="rating column: ratings map to event types"
    )
    group.add_argument("--csv-timestamp-col", metavar="COLUMN", default=None, help="timestamp column")
    group.add_argument(
        "--csv-event-col",
        default=None,
        metavar="COLUMN",
        help=f"event type column ({', '.join(EVENT_TYPES)} or an alias such as addtocart, transaction)",
    )
    group.add_argument(
        "--csv-item-id-col",
        metavar="COLUMN",
        default=None,
        help="item id column of the items file (default: --csv-item-col)",
    )
    group.add_argument(
        "--csv-text-cols",
        default=",".join(defaults.text),
        metavar="A,B,...",
        help="text columns of the items file: the first is the title, the rest the description "
        f"(default {','.join(defaults.text)})",
    )
    group.add_argument("--csv-brand-col", metavar="COLUMN", default=None, help="brand column of the items file")
    group.add_argument("--csv-category-col", metavar="COLUMN", default=None, help="category column of the items file")
    group.add_argument(
        "--csv-price-col",
        metavar="COLUMN",
        default=None,
        help=f"price column of the items file (absent: every price {UNKNOWN_PRICE})",
    )
    group.add_argument(
        "--csv-delimiter", default=None, metavar="CHAR", help="field delimiter (default: tab for .tsv, else comma)"
    )


def parse_dataset_spec(spec: str) -> tuple[str, Path]:
    """``"FORMAT:PATH"`` -> (format, path), refusing unknown formats."""
    format_name, separator, path = spec.partition(":")
    if not separator or not path:
        raise DatasetError(f"--dataset {spec!r}: expected FORMAT:PATH with FORMAT one of {', '.join(DATASET_FORMATS)}")
    if format_name not in DATASET_FORMATS:
        raise DatasetError(
            f"--dataset {spec!r}: unknown format {format_name!r}; expected one of {', '.join(DATASET_FORMATS)}"
        )
    return format_name, Path(path)


def _column_list(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def load_from_arguments(args: argparse.Namespace) -> LoadResult:
    """Load the dataset named by the options of :func:`add_dataset_arguments`."""
    format_name, path = parse_dataset_spec(args.dataset)
    thresholds = {"purchase_rating": args.purchase_rating, "cart_rating": args.cart_rating}
    if format_name == "movielens-100k":
        return load_movielens_100k(path, **thresholds)
    if format_name == "amazon-reviews":
        return load_amazon_reviews(path, meta=args.amazon_meta, **thresholds)
    if args.csv_items is None:
        raise DatasetError("--dataset csv:PATH needs --csv-items ITEMS_FILE (the items file of the pair)")
    columns = CsvColumns(
        user=args.csv_user_col,
        item=args.csv_item_col,
        rating=args.csv_rating_col,
        timestamp=args.csv_timestamp_col,
        event=args.csv_event_col,
        item_id=args.csv_item_id_col,
        text=_column_list(args.csv_text_cols),
        brand=args.csv_brand_col,
        category=args.csv_category_col,
        price=args.csv_price_col,
    )
    return load_csv_pair(path, args.csv_items, columns, delimiter=args.csv_delimiter, **thresholds)
