"""Catalogue updates on the live index: UpsertItems, DeleteItems and UpdateStock.

Each accepted batch is validated as a whole, written ahead to a log (one JSON line with a
sequence number and a checksum, fsynced) and then applied to the served index, so it is
visible when the call returns and a restart replays it:

* upsert: the item text is embedded as the build does (``Catalog.embedding_texts``), the
  fused vector is ``[w_c * unit(text), 0]`` (a new item has no collaborative signal, like
  a cold item at build time), and it is appended to the IVF lists and the float16 store
  without retraining; a replaced item's old row is retired.
* delete: the row is retired (no search returns it) and the id forgotten.
* stock: the row's stock is set in place.

The log lives beside the artifact, not in it (the artifact directory is checksummed):
``<wal root>/<artifact name>-updates/<version>/wal.jsonl``. It stores the text embedding of
every upserted item, so a restart replays it without the text model. The next build
(:func:`fold_into_dataset`) applies the logs to the catalogue and records the last
sequence it folded; the server that loads that build carries over what came after it
(:func:`open_live_catalog`). docs/catalog-updates.md describes the whole life cycle.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from retrieval_service.artifact import LoadedIndex
from retrieval_service.index import grown
from retrieval_service.retriever import TextQueryEncoder
from retrieval_service.shards import shard_of
from retrieval_service.vectors import fuse
from shared.artifacts import CURRENT, MANIFEST, current_version
from shared.config import CatalogUpdateSettings
from shared.data import Catalog, Dataset, Events
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from shared.logs import event
from shared.proto.vitrine.v1 import catalog_pb2, retrieval_pb2

log = logging.getLogger(__name__)

WAL_FILE = "wal.jsonl"
# The manifest parameter a build records the folded logs under.
FOLDED_PARAM = "catalog_updates"
OP_UPSERT, OP_DELETE, OP_STOCK, OP_ORIGIN = "upsert", "delete", "stock", "origin"
MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 20_000


class WalError(RuntimeError):
    """A write-ahead log is damaged (other than a torn last line) or does not fit the index."""


# --- validation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemUpdate:
    """One upserted item, as validated (``created_at`` resolved to the server clock)."""

    item_id: str
    title: str
    description: str
    brand: str
    category: str
    price: float
    stock: int
    created_at: int

    def to_proto(self) -> catalog_pb2.ItemAttributes:
        return catalog_pb2.ItemAttributes(**dataclasses.asdict(self))


def catalog_of(items: Sequence[ItemUpdate]) -> Catalog:
    """The items as a :class:`Catalog` (their embedding texts are the build's)."""
    return Catalog(
        item_ids=np.asarray([item.item_id for item in items], dtype=np.str_),
        titles=np.asarray([item.title for item in items], dtype=np.str_),
        descriptions=np.asarray([item.description for item in items], dtype=np.str_),
        brands=np.asarray([item.brand for item in items], dtype=np.str_),
        categories=np.asarray([item.category for item in items], dtype=np.str_),
        prices=np.asarray([item.price for item in items], dtype=np.float64),
        stock=np.asarray([item.stock for item in items], dtype=np.int64),
        created_at=np.asarray([item.created_at for item in items], dtype=np.int64),
    )


def _check_batch(size: int, field: str, max_batch: int) -> None:
    if size == 0:
        raise InvalidArgument(f"{field} is empty; send at least one", field=field)
    if size > max_batch:
        raise InvalidArgument(
            f"{field} has {size} entries; at most {max_batch} per call (setting retrieval.updates.max_batch)",
            field=field,
        )


def _check_id(item_id: str, field: str, seen: set[str]) -> None:
    if not item_id.strip():
        raise InvalidArgument(f"{field} is empty", field=field)
    if len(item_id) > MAX_ID_CHARS:
        raise InvalidArgument(f"{field} has {len(item_id)} characters; at most {MAX_ID_CHARS}", field=field)
    if item_id in seen:
        raise InvalidArgument(f"{field} {item_id!r} appears twice in this batch", field=field)
    seen.add(item_id)


def validated_items(items: Sequence[catalog_pb2.ItemAttributes], max_batch: int, now: int) -> list[ItemUpdate]:
    """The batch as :class:`ItemUpdate`; INVALID_ARGUMENT naming ``items[i].<field>`` otherwise."""
    _check_batch(len(items), "items", max_batch)
    seen: set[str] = set()
    checked = []
    for position, item in enumerate(items):
        where = f"items[{position}]"
        _check_id(item.item_id, f"{where}.item_id", seen)
        if not item.title.strip():
            raise InvalidArgument(f"{where}.title is empty; every item needs a title", field=f"{where}.title")
        if len(item.title) + len(item.description) > MAX_TEXT_CHARS:
            raise InvalidArgument(
                f"{where}: title and description have more than {MAX_TEXT_CHARS} characters",
                field=f"{where}.description",
            )
        if not math.isfinite(item.price) or item.price <= 0:
            raise InvalidArgument(
                f"{where}.price must be a finite number > 0 (as in the catalogue), got {item.price}",
                field=f"{where}.price",
            )
        if item.stock < 0:
            raise InvalidArgument(f"{where}.stock must be >= 0, got {item.stock}", field=f"{where}.stock")
        if item.created_at < 0:
            raise InvalidArgument(
                f"{where}.created_at must be unix seconds (0 = now), got {item.created_at}",
                field=f"{where}.created_at",
            )
        checked.append(
            ItemUpdate(
                item_id=item.item_id,
                title=item.title,
                description=item.description,
                brand=item.brand,
                category=item.category,
                price=float(item.price),
                stock=int(item.stock),
                created_at=int(item.created_at) or now,
            )
        )
    return checked


def validated_ids(item_ids: Sequence[str], field: str, max_batch: int) -> list[str]:
    _check_batch(len(item_ids), field, max_batch)
    seen: set[str] = set()
    for position, item_id in enumerate(item_ids):
        _check_id(item_id, f"{field}[{position}]", seen)
    return list(item_ids)


def validated_levels(levels: Sequence[retrieval_pb2.StockLevel], max_batch: int) -> list[tuple[str, int]]:
    _check_batch(len(levels), "levels", max_batch)
    seen: set[str] = set()
    for position, level in enumerate(levels):
        _check_id(level.item_id, f"levels[{position}].item_id", seen)
        if level.stock < 0:
            raise InvalidArgument(
                f"levels[{position}].stock must be >= 0, got {level.stock}", field=f"levels[{position}].stock"
            )
    return [(level.item_id, int(level.stock)) for level in levels]


# --- the write-ahead log ------------------------------------------------------------------


@dataclass(frozen=True)
class WalRecord:
    sequence: int
    op: str
    at: int
    body: dict[str, Any]

    def payload(self) -> dict[str, Any]:
        return {"seq": self.sequence, "op": self.op, "at": self.at, "body": self.body}


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _checksum(payload: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(payload)).hexdigest()[:32]


def encode_line(record: WalRecord) -> bytes:
    payload = record.payload()
    return _canonical({**payload, "sha256": _checksum(payload)}) + b"\n"


def _decode_line(line: bytes, expected_sequence: int) -> WalRecord | None:
    """The record on ``line``, or None when it is damaged or out of sequence."""
    try:
        payload = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    checksum = payload.pop("sha256", None)
    if checksum != _checksum(payload) or payload.get("seq") != expected_sequence:
        return None
    if not isinstance(payload.get("body"), dict) or not isinstance(payload.get("op"), str):
        return None
    return WalRecord(sequence=int(payload["seq"]), op=payload["op"], at=int(payload.get("at", 0)), body=payload["body"])


@dataclass(frozen=True)
class WalContents:
    records: list[WalRecord]
    # Bytes of intact lines; anything after them is a torn write.
    intact_bytes: int
    torn: bool


def read_wal(path: Path) -> WalContents:
    """Every intact record of the log at ``path`` (none when it does not exist).

    A damaged last line is what a crash mid-write leaves: it is dropped with a warning. A
    damaged line followed by intact ones is not a crash, and raises :class:`WalError`.
    """
    if not path.is_file():
        return WalContents([], 0, False)
    data = path.read_bytes()
    lines = data.split(b"\n")
    # The piece after the last newline is empty for a clean log, else a torn write.
    complete, tail = lines[:-1], lines[-1]
    records: list[WalRecord] = []
    offset = 0
    for number, line in enumerate(complete, start=1):
        record = _decode_line(line, len(records) + 1)
        if record is None:
            if number == len(complete) and not tail:
                event(log, "torn last line of the write-ahead log dropped", level=logging.WARNING, path=str(path))
                return WalContents(records, offset, True)
            raise WalError(
                f"{path}: line {number} is damaged or out of sequence, and intact lines follow it; "
                "this is not a torn write from a crash. Restore the log or move it away "
                "(its changes are then lost) before starting the server"
            )
        records.append(record)
        offset += len(line) + 1
    if tail:
        event(log, "torn last line of the write-ahead log dropped", level=logging.WARNING, path=str(path))
    return WalContents(records, offset, bool(tail))


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_new_wal(path: Path, records: Sequence[WalRecord], fsync: bool) -> None:
    """A log holding exactly ``records``, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    with temporary.open("wb") as handle:
        for record in records:
            handle.write(encode_line(record))
        handle.flush()
        if fsync:
            os.fsync(handle.fileno())
    os.replace(temporary, path)
    if fsync:
        _fsync_directory(path.parent)


class WriteAheadLog:
    """Appends records to one log file; each append is on disk (fsync) when it returns."""

    def __init__(self, path: Path, last_sequence: int, fsync: bool) -> None:
        self.path = path
        self._last_sequence = last_sequence
        self._fsync = fsync
        self._handle = path.open("ab")

    @classmethod
    def open(cls, path: Path, fsync: bool) -> tuple[WriteAheadLog, list[WalRecord]]:
        """The log at ``path`` (created empty when missing) and its records; a torn last
        line is cut off so the next append starts on a clean line."""
        path.parent.mkdir(parents=True, exist_ok=True)
        contents = read_wal(path)
        if not path.exists():
            write_new_wal(path, [], fsync)
        elif contents.torn:
            os.truncate(path, contents.intact_bytes)
        last = contents.records[-1].sequence if contents.records else 0
        return cls(path, last, fsync), contents.records

    @property
    def last_sequence(self) -> int:
        return self._last_sequence

    def append(self, op: str, body: dict[str, Any]) -> WalRecord:
        record = WalRecord(sequence=self._last_sequence + 1, op=op, at=int(time.time()), body=body)
        self._handle.write(encode_line(record))
        self._handle.flush()
        if self._fsync:
            os.fsync(self._handle.fileno())
        self._last_sequence = record.sequence
        return record

    def close(self) -> None:
        self._handle.close()


def wal_path(wal_root: Path, artifact_name: str, version: str) -> Path:
    return Path(wal_root) / f"{artifact_name}-updates" / version / WAL_FILE


def _encode_vector(vector: npt.NDArray[np.floating]) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f2").tobytes()).decode("ascii")


def _decode_vector(text: str, dimension: int) -> npt.NDArray[np.float32]:
    vector = np.frombuffer(base64.b64decode(text, validate=True), dtype="<f2").astype(np.float32)
    if vector.shape != (dimension,):
        raise WalError(f"a logged vector has {vector.size} values; the index's text half has {dimension}")
    return vector


def _item_body(item: ItemUpdate, vector: npt.NDArray[np.floating]) -> dict[str, Any]:
    return {**dataclasses.asdict(item), "vector": _encode_vector(vector)}


def _item_of(body: dict[str, Any]) -> ItemUpdate:
    return ItemUpdate(**{field.name: body[field.name] for field in dataclasses.fields(ItemUpdate)})


# --- the live catalogue -------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateResult:
    applied: int
    unknown_item_ids: list[str]
    sequence: int
    index_version: str

    def to_proto(self) -> retrieval_pb2.CatalogUpdateResponse:
        return retrieval_pb2.CatalogUpdateResponse(
            applied=self.applied,
            unknown_item_ids=self.unknown_item_ids,
            sequence=self.sequence,
            index_version=self.index_version,
        )


def _appended(buffer: npt.NDArray[Any], size: int, values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``buffer`` (``size`` rows used) with ``values`` written after them; a wider string
    dtype or more room means a new buffer (views handed out earlier stay valid)."""
    dtype = np.promote_types(buffer.dtype, values.dtype)
    if dtype != buffer.dtype:
        widened = np.empty(len(buffer), dtype=dtype)
        widened[:size] = buffer[:size]
        buffer = widened
    buffer = grown(buffer, size, len(values))
    buffer[size : size + len(values)] = values
    return buffer


class LiveCatalog:
    """The catalogue changes of one served index version: logged, then applied.

    Writers are serialised by one lock; searches never take it (the index has its own
    read/write lock around the FAISS structures, see :class:`VectorIndex`).
    """

    def __init__(
        self,
        loaded: LoadedIndex,
        wal: WriteAheadLog,
        settings: CatalogUpdateSettings,
        encoder: TextQueryEncoder | None,
    ) -> None:
        self._loaded = loaded
        self._wal = wal
        self._settings = settings
        self._encoder = encoder
        self._lock = threading.Lock()
        self._sealed = False
        # Items upserted since the build (the ranking service's snapshot does not know them).
        self._fresh: dict[str, ItemUpdate] = {}
        self._ids = loaded.item_ids
        self._stock = loaded.stock

    @property
    def version(self) -> str:
        return self._loaded.version

    @property
    def last_sequence(self) -> int:
        return self._wal.last_sequence

    @property
    def wal_file(self) -> Path:
        return self._wal.path

    def fresh_item(self, item_id: str) -> ItemUpdate | None:
        return self._fresh.get(item_id)

    def seal(self) -> None:
        """Refuse further changes (UNAVAILABLE): a newer version is taking over this log's tail."""
        with self._lock:
            self._sealed = True

    def unseal(self) -> None:
        with self._lock:
            self._sealed = False

    def close(self) -> None:
        with self._lock:
            self._sealed = True
            self._wal.close()

    def _check_open(self) -> None:
        if self._sealed:
            raise Unavailable(f"index version {self.version} is being replaced; retry the change shortly")

    # -- the RPCs -------------------------------------------------------------------------
    def upsert(self, items: list[ItemUpdate]) -> UpdateResult:
        loaded = self._loaded
        encoder = self._encoder
        if encoder is None:
            raise FailedPrecondition(
                "UpsertItems needs the text model, which this server did not load (setting retrieval.text_queries)"
            )
        if encoder.model_id != loaded.embedding_model:
            raise FailedPrecondition(
                f"the index was built with text model {loaded.embedding_model}, the server has {encoder.model_id}; "
                "rebuild the index or configure embedding.model_path"
            )
        if loaded.shard_count > 1:
            for position, item in enumerate(items):
                shard = shard_of(item.item_id, loaded.shard_count)
                if shard != loaded.shard:
                    raise InvalidArgument(
                        f"item {item.item_id!r} belongs to shard {shard} of {loaded.shard_count}; "
                        f"this server holds shard {loaded.shard}",
                        field=f"items[{position}].item_id",
                    )
        content = np.stack([encoder.encode(text) for text in catalog_of(items).embedding_texts()]).astype(np.float32)
        with self._lock:
            self._check_open()
            fresh_rows = loaded.index.size - loaded.base_items
            if fresh_rows + len(items) > self._settings.max_fresh_items:
                raise FailedPrecondition(
                    f"index version {loaded.version} already holds {fresh_rows} upserted rows; at most "
                    f"{self._settings.max_fresh_items} (setting retrieval.updates.max_fresh_items): run a build"
                )
            body = {
                "model": encoder.model_id,
                "items": [_item_body(item, vector) for item, vector in zip(items, content, strict=True)],
            }
            record = self._wal.append(OP_UPSERT, body)
            # The applied vectors are the logged (float16) ones, so a replay gives the same index.
            self._apply_upsert(items, content.astype(np.float16).astype(np.float32))
        event(log, "items upserted", items=len(items), sequence=record.sequence, version=loaded.version)
        return UpdateResult(len(items), [], record.sequence, loaded.version)

    def delete(self, item_ids: list[str]) -> UpdateResult:
        with self._lock:
            self._check_open()
            known = [item_id for item_id in item_ids if item_id in self._loaded.item_row]
            unknown = [item_id for item_id in item_ids if item_id not in self._loaded.item_row]
            sequence = self._wal.last_sequence
            if known:
                sequence = self._wal.append(OP_DELETE, {"item_ids": known}).sequence
                self._apply_delete(known)
        event(log, "items deleted", items=len(known), unknown=len(unknown), sequence=sequence)
        return UpdateResult(len(known), unknown, sequence, self.version)

    def update_stock(self, levels: list[tuple[str, int]]) -> UpdateResult:
        with self._lock:
            self._check_open()
            known = [(item_id, stock) for item_id, stock in levels if item_id in self._loaded.item_row]
            unknown = [item_id for item_id, _ in levels if item_id not in self._loaded.item_row]
            if not known:
                raise NotFound(f"none of the {len(levels)} item ids is in index version {self.version}", field="levels")
            sequence = self._wal.append(OP_STOCK, {"levels": [[item_id, stock] for item_id, stock in known]}).sequence
            self._apply_stock(known)
        event(log, "stock updated", items=len(known), unknown=len(unknown), sequence=sequence)
        return UpdateResult(len(known), unknown, sequence, self.version)

    # -- applying (the RPCs and the replay) ----------------------------------------------
    def _apply_upsert(self, items: Sequence[ItemUpdate], content: npt.NDArray[np.float32]) -> None:
        loaded = self._loaded
        if content.shape[1] != loaded.content_dim:
            raise WalError(
                f"text vectors have {content.shape[1]} values; the index's text half has {loaded.content_dim}"
            )
        fused = fuse(content, np.zeros((len(items), loaded.collaborative_dim), np.float32), loaded.build)
        replaced = np.asarray(
            [loaded.item_row[item.item_id] for item in items if item.item_id in loaded.item_row], dtype=np.int64
        )
        size = loaded.index.size
        # Ids and stock grow before the index does: any row a search finds has both.
        self._ids = _appended(self._ids, size, np.asarray([item.item_id for item in items], dtype=np.str_))
        self._stock = _appended(self._stock, size, np.asarray([item.stock for item in items], dtype=np.int64))
        loaded.item_ids = self._ids[: size + len(items)]
        loaded.stock = self._stock[: size + len(items)]
        if loaded.tables is not None and loaded.tables.has_attributes:
            # Filters and declared preferences read attributes by row: new rows need theirs.
            loaded.tables = loaded.tables.with_items(
                [item.category for item in items],
                [item.brand for item in items],
                np.asarray([item.price for item in items], dtype=np.float64),
            )
        rows = loaded.index.add(fused, retire=replaced)
        for item, row in zip(items, rows.tolist(), strict=True):
            loaded.item_row[item.item_id] = row
            self._fresh[item.item_id] = item

    def _apply_delete(self, item_ids: Iterable[str]) -> None:
        loaded = self._loaded
        rows = [loaded.item_row[item_id] for item_id in item_ids if item_id in loaded.item_row]
        loaded.index.retire(np.asarray(rows, dtype=np.int64))
        for item_id in item_ids:
            loaded.item_row.pop(item_id, None)
            self._fresh.pop(item_id, None)

    def _apply_stock(self, levels: Iterable[tuple[str, int]]) -> None:
        loaded = self._loaded
        stock = loaded.stock
        for item_id, level in levels:
            row = loaded.item_row.get(item_id)
            if row is None:
                continue
            stock[row] = level
            fresh = self._fresh.get(item_id)
            if fresh is not None:
                self._fresh[item_id] = dataclasses.replace(fresh, stock=level)

    def replay(self, records: Sequence[WalRecord]) -> None:
        """Apply logged records (a restart, or the tail carried over from an older version)."""
        with self._lock:
            for record in records:
                try:
                    self._replay_one(record)
                except (KeyError, TypeError, ValueError) as error:
                    raise WalError(
                        f"{self._wal.path}: record {record.sequence} ({record.op}) is malformed: {error}"
                    ) from error
        if records:
            event(
                log,
                "catalogue updates replayed",
                version=self.version,
                records=len(records),
                last_sequence=self.last_sequence,
                fresh_items=len(self._fresh),
            )

    def _replay_one(self, record: WalRecord) -> None:
        body = record.body
        if record.op == OP_UPSERT:
            if body["model"] != self._loaded.embedding_model:
                raise WalError(
                    f"{self._wal.path}: record {record.sequence} was embedded with {body['model']}, "
                    f"the index with {self._loaded.embedding_model}"
                )
            items = [_item_of(item) for item in body["items"]]
            content = np.stack([_decode_vector(item["vector"], self._loaded.content_dim) for item in body["items"]])
            self._apply_upsert(items, content)
        elif record.op == OP_DELETE:
            self._apply_delete([str(item_id) for item_id in body["item_ids"]])
        elif record.op == OP_STOCK:
            self._apply_stock([(str(item_id), int(stock)) for item_id, stock in body["levels"]])
        elif record.op != OP_ORIGIN:
            raise WalError(f"{self._wal.path}: record {record.sequence} has unknown operation {record.op!r}")


def read_params(artifacts: Path, artifact_name: str, version: str) -> dict[str, Any]:
    """The build parameters of a (verified, loaded) index version."""
    manifest = json.loads((Path(artifacts) / artifact_name / version / MANIFEST).read_text())
    params = manifest.get("params", {})
    return params if isinstance(params, dict) else {}


def _carry_over(wal_root: Path, artifact_name: str, version: str, params: dict[str, Any], fsync: bool) -> None:
    """Start the log of a new version with what its build did not fold in.

    The build recorded the version whose log it folded and the last sequence it read;
    later records of that log (changes acknowledged while the build ran) are copied,
    renumbered after an ``origin`` record, into this version's log.
    """
    folded = params.get(FOLDED_PARAM, {}).get("folded", {}).get(artifact_name)
    if not isinstance(folded, dict) or not folded.get("version") or folded["version"] == version:
        return
    source = wal_path(wal_root, artifact_name, str(folded["version"]))
    after = int(folded.get("sequence", 0))
    tail = [record for record in read_wal(source).records if record.sequence > after and record.op != OP_ORIGIN]
    origin = WalRecord(1, OP_ORIGIN, int(time.time()), {"from_version": folded["version"], "after_sequence": after})
    copied = [dataclasses.replace(record, sequence=position) for position, record in enumerate(tail, start=2)]
    write_new_wal(wal_path(wal_root, artifact_name, version), [origin, *copied], fsync)
    event(
        log,
        "catalogue updates carried over to the new index version",
        version=version,
        from_version=folded["version"],
        after_sequence=after,
        records=len(copied),
    )


def open_live_catalog(
    loaded: LoadedIndex,
    artifact_name: str,
    params: dict[str, Any],
    wal_root: Path,
    settings: CatalogUpdateSettings,
    encoder: TextQueryEncoder | None,
) -> LiveCatalog:
    """The live catalogue of ``loaded``: its log opened (or started from the tail of the
    log its build folded) and replayed onto the index."""
    path = wal_path(wal_root, artifact_name, loaded.version)
    if not path.exists():
        _carry_over(wal_root, artifact_name, loaded.version, params, settings.fsync)
    wal, records = WriteAheadLog.open(path, settings.fsync)
    live = LiveCatalog(loaded, wal, settings, encoder)
    try:
        live.replay(records)
    except BaseException:
        wal.close()
        raise
    return live


# --- folding into the next build ------------------------------------------------------------


@dataclass(frozen=True)
class FoldedCatalog:
    dataset: Dataset
    # Recorded in the manifest under FOLDED_PARAM.
    params: dict[str, Any]


def _catalogue_changes(
    records: Iterable[WalRecord], base: set[str]
) -> tuple[dict[str, ItemUpdate | None], dict[str, int]]:
    """The final state the records leave: per changed id its attributes (None: deleted), and
    stock levels of base items whose attributes did not change."""
    changed: dict[str, ItemUpdate | None] = {}
    stock: dict[str, int] = {}
    for record in records:
        if record.op == OP_UPSERT:
            for body in record.body["items"]:
                item = _item_of(body)
                changed[item.item_id] = item
                stock.pop(item.item_id, None)
        elif record.op == OP_DELETE:
            for item_id in record.body["item_ids"]:
                changed[str(item_id)] = None
                stock.pop(str(item_id), None)
        elif record.op == OP_STOCK:
            for item_id, level in record.body["levels"]:
                current = changed.get(item_id)
                if current is not None:
                    changed[item_id] = dataclasses.replace(current, stock=int(level))
                elif item_id not in changed and item_id in base:
                    stock[item_id] = int(level)
    return changed, stock


def apply_to_dataset(dataset: Dataset, records: Sequence[WalRecord]) -> Dataset:
    """``dataset`` with the logged changes applied: replaced items keep their row (and their
    events), deleted items and their events go, new items are appended."""
    catalog = dataset.catalog
    row_of = catalog.index_of()
    changed, stock_levels = _catalogue_changes(records, set(row_of))
    if not changed and not stock_levels:
        return dataset
    columns: dict[str, list[Any]] = {
        "item_ids": catalog.item_ids.tolist(),
        "titles": catalog.titles.tolist(),
        "descriptions": catalog.descriptions.tolist(),
        "brands": catalog.brands.tolist(),
        "categories": catalog.categories.tolist(),
        "prices": catalog.prices.tolist(),
        "stock": catalog.stock.tolist(),
        "created_at": catalog.created_at.tolist(),
    }
    keep = np.ones(len(catalog), dtype=bool)
    appended: list[ItemUpdate] = []
    for item_id, item in changed.items():
        row = row_of.get(item_id)
        if item is None:
            if row is not None:
                keep[row] = False
            continue
        if row is None:
            appended.append(item)
            continue
        for column, value in zip(columns, dataclasses.astuple(item), strict=True):
            columns[column][row] = value
    for item_id, level in stock_levels.items():
        columns["stock"][row_of[item_id]] = level
    for item in appended:
        for column, value in zip(columns, dataclasses.astuple(item), strict=True):
            columns[column].append(value)
    keep = np.concatenate([keep, np.ones(len(appended), dtype=bool)])
    new_catalog = Catalog(
        item_ids=np.asarray(columns["item_ids"], dtype=np.str_)[keep],
        titles=np.asarray(columns["titles"], dtype=np.str_)[keep],
        descriptions=np.asarray(columns["descriptions"], dtype=np.str_)[keep],
        brands=np.asarray(columns["brands"], dtype=np.str_)[keep],
        categories=np.asarray(columns["categories"], dtype=np.str_)[keep],
        prices=np.asarray(columns["prices"], dtype=np.float64)[keep],
        stock=np.asarray(columns["stock"], dtype=np.int64)[keep],
        created_at=np.asarray(columns["created_at"], dtype=np.int64)[keep],
    )
    # Events of deleted items go; the others point at their item's new row.
    new_row = np.cumsum(keep) - 1
    events = dataset.events
    kept_events = keep[: len(catalog)][events.item_index]
    remaining = events.select(kept_events)
    remapped = Events(
        user_index=remaining.user_index,
        item_index=new_row[remaining.item_index].astype(np.int32),
        event_code=remaining.event_code,
        timestamp=remaining.timestamp,
        device=remaining.device,
        session_id=remaining.session_id,
    )
    return dataclasses.replace(dataset, catalog=new_catalog, events=remapped)


def fold_into_dataset(
    dataset: Dataset, artifacts: Path, wal_root: Path, artifact_names: Sequence[str]
) -> FoldedCatalog:
    """``dataset`` with the logs of the serving versions of ``artifact_names`` applied
    (what a build does first), and the manifest record of what it folded."""
    records: list[WalRecord] = []
    folded: dict[str, dict[str, Any]] = {}
    for name in artifact_names:
        if not (Path(artifacts) / name / CURRENT).is_file():
            continue
        version = current_version(artifacts, name)
        contents = read_wal(wal_path(wal_root, name, version))
        records.extend(contents.records)
        last = contents.records[-1].sequence if contents.records else 0
        folded[name] = {"version": version, "sequence": last}
    changed = apply_to_dataset(dataset, records)
    counts = {
        "upserts": sum(len(r.body["items"]) for r in records if r.op == OP_UPSERT),
        "deletes": sum(len(r.body["item_ids"]) for r in records if r.op == OP_DELETE),
        "stock_levels": sum(len(r.body["levels"]) for r in records if r.op == OP_STOCK),
    }
    event(log, "catalogue updates folded into the build", items=len(changed.catalog), **counts, folded=folded)
    return FoldedCatalog(changed, {FOLDED_PARAM: {"folded": folded, **counts}})
