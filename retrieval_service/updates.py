"""Catalogue updates on the live index: UpsertItems, DeleteItems and UpdateStock.

Each accepted batch is validated as a whole, written to the update log
(retrieval_service/update_log.py: a file per index version for one replica, or a Redis
stream that every replica shares and follows) and then applied to the served index, so it
is visible when the call returns and a restart replays it:

* upsert: the item text is embedded as the build does (``Catalog.embedding_texts``), the
  fused vector is ``[w_c * unit(text), 0]`` (a new item has no collaborative signal, like
  a cold item at build time), and it is appended to the IVF lists and the float16 store
  without retraining; a replaced item's old row is retired.
* delete: the row is retired (no search returns it) and the id forgotten.
* stock: the row's stock is set in place.

The log stores the text embedding of every upserted item, so a replay (a restart, or
another replica following a shared log) needs no text model. The next build
(:func:`fold_into_dataset`) applies the logs to the catalogue and records the last
sequence it folded; the servers that load that build carry over what came after it
(:func:`open_live_catalog`). docs/catalog-updates.md describes the whole life cycle.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from retrieval_service.artifact import LoadedIndex
from retrieval_service.index import grown
from retrieval_service.retriever import TextQueryEncoder
from retrieval_service.shards import shard_of
from retrieval_service.update_log import (
    OP_DELETE,
    OP_ORIGIN,
    OP_STOCK,
    OP_UPSERT,
    FoldedFrom,
    LogBehind,
    UpdateLog,
    UpdateLogStore,
    WalError,
    WalRecord,
)
from retrieval_service.vectors import fuse
from shared.artifacts import CURRENT, MANIFEST, current_version
from shared.config import CatalogUpdateSettings
from shared.data import Catalog, Dataset
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from shared.logs import event
from shared.proto.vitrine.v1 import catalog_pb2, retrieval_pb2
from shared.telemetry import CATALOG_FOLLOW_FAILURES, CATALOG_SEQUENCE

log = logging.getLogger(__name__)

# The manifest parameter a build records the folded logs under.
FOLDED_PARAM = "catalog_updates"
MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 20_000


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


@dataclass
class _Planned:
    """A change planned against the current state: what to log, how to apply it, what to answer."""

    result: UpdateResult
    op: str | None = None  # None: nothing to log (e.g. every id unknown)
    body: dict[str, Any] = dataclasses.field(default_factory=dict)
    apply: Callable[[], None] = lambda: None


class LiveCatalog:
    """The catalogue changes of one served index version: logged, then applied.

    Writers are serialised by one lock; searches never take it (the index has its own
    read/write lock around the FAISS structures, see :class:`VectorIndex`). With a shared
    log, a follower thread applies what other replicas append, in sequence order, and a
    write that finds its sequence number taken catches up and plans again.
    """

    def __init__(
        self,
        loaded: LoadedIndex,
        update_log: UpdateLog,
        settings: CatalogUpdateSettings,
        encoder: TextQueryEncoder | None,
        artifact_name: str = "index",
    ) -> None:
        self._loaded = loaded
        self._artifact_name = artifact_name
        self._log = update_log
        self._settings = settings
        self._encoder = encoder
        self._lock = threading.Lock()
        self._sealed = False
        self._closed = threading.Event()
        # The last record applied to the index (replayed, followed or written here).
        self._applied = 0
        # Set when the follower met a record it cannot apply: writes are refused from then on.
        self._broken: str | None = None
        self._follower: threading.Thread | None = None
        # Items upserted since the build (the ranking service's snapshot does not know them).
        self._fresh: dict[str, ItemUpdate] = {}
        self._ids = loaded.item_ids
        self._stock = loaded.stock

    @property
    def version(self) -> str:
        return self._loaded.version

    @property
    def last_sequence(self) -> int:
        return self._applied

    @property
    def log_name(self) -> str:
        return self._log.name

    def fresh_item(self, item_id: str) -> ItemUpdate | None:
        return self._fresh.get(item_id)

    def seal(self) -> None:
        """Refuse further changes (UNAVAILABLE): a newer version is taking over this log's tail."""
        with self._lock:
            self._sealed = True

    def unseal(self) -> None:
        with self._lock:
            self._sealed = False

    def discard(self) -> None:
        """Close a catalogue whose version never served."""
        self.close(discard=True)

    def close(self, discard: bool = False) -> None:
        self._closed.set()
        if self._follower is not None:
            self._follower.join(self._settings.redis.follow_block_s + 5)
        with self._lock:
            self._sealed = True
            if discard:
                self._log.discard()
            else:
                self._log.close()

    def _check_open(self) -> None:
        if self._sealed:
            raise Unavailable(f"index version {self.version} is being replaced; retry the change shortly")
        if self._broken is not None:
            raise FailedPrecondition(self._broken)

    def _commit(self, plan: Callable[[], _Planned]) -> _Planned:
        """Log the change ``plan`` makes of the current state, then apply it. When another
        replica appended first (shared log), catch up with the log and plan again: the
        change is always validated against the state it is logged after."""
        with self._lock:
            for _ in range(self._settings.redis.append_attempts):
                self._check_open()
                planned = plan()
                if planned.op is None:
                    planned.result = dataclasses.replace(planned.result, sequence=self._applied)
                    return planned
                record = WalRecord(self._applied + 1, planned.op, int(time.time()), planned.body)
                try:
                    self._log.append(record)
                except LogBehind:
                    self._apply_records(self._log.records_after(self._applied))
                    continue
                planned.apply()
                self._applied = record.sequence
                CATALOG_SEQUENCE.labels(self._artifact_name, self.version).set(self._applied)
                planned.result = dataclasses.replace(planned.result, sequence=record.sequence)
                return planned
        raise Unavailable(
            f"{self._settings.redis.append_attempts} attempts to append to {self._log.name} lost the race to "
            "other replicas (setting retrieval.updates.redis.append_attempts); retry the change"
        )

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
        body = {
            "model": encoder.model_id,
            "items": [_item_body(item, vector) for item, vector in zip(items, content, strict=True)],
        }
        # The applied vectors are the logged (float16) ones, so a replay gives the same index.
        logged = content.astype(np.float16).astype(np.float32)

        def plan() -> _Planned:
            fresh_rows = loaded.index.size - loaded.base_items
            if fresh_rows + len(items) > self._settings.max_fresh_items:
                raise FailedPrecondition(
                    f"index version {loaded.version} already holds {fresh_rows} upserted rows; at most "
                    f"{self._settings.max_fresh_items} (setting retrieval.updates.max_fresh_items): run a build"
                )
            result = UpdateResult(len(items), [], 0, loaded.version)
            return _Planned(result, OP_UPSERT, body, lambda: self._apply_upsert(items, logged))

        result = self._commit(plan).result
        event(log, "items upserted", items=len(items), sequence=result.sequence, version=loaded.version)
        return result

    def delete(self, item_ids: list[str]) -> UpdateResult:
        def plan() -> _Planned:
            known = [item_id for item_id in item_ids if item_id in self._loaded.item_row]
            unknown = [item_id for item_id in item_ids if item_id not in self._loaded.item_row]
            result = UpdateResult(len(known), unknown, 0, self.version)
            if not known:
                return _Planned(result)
            return _Planned(result, OP_DELETE, {"item_ids": known}, lambda: self._apply_delete(known))

        result = self._commit(plan).result
        event(
            log, "items deleted", items=result.applied, unknown=len(result.unknown_item_ids), sequence=result.sequence
        )
        return result

    def update_stock(self, levels: list[tuple[str, int]]) -> UpdateResult:
        def plan() -> _Planned:
            known = [(item_id, stock) for item_id, stock in levels if item_id in self._loaded.item_row]
            unknown = [item_id for item_id, _ in levels if item_id not in self._loaded.item_row]
            if not known:
                raise NotFound(f"none of the {len(levels)} item ids is in index version {self.version}", field="levels")
            result = UpdateResult(len(known), unknown, 0, self.version)
            body = {"levels": [[item_id, stock] for item_id, stock in known]}
            return _Planned(result, OP_STOCK, body, lambda: self._apply_stock(known))

        result = self._commit(plan).result
        event(
            log, "stock updated", items=result.applied, unknown=len(result.unknown_item_ids), sequence=result.sequence
        )
        return result

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
            self._apply_records(records)
        if records:
            event(
                log,
                "catalogue updates replayed",
                version=self.version,
                records=len(records),
                last_sequence=self.last_sequence,
                fresh_items=len(self._fresh),
            )

    def _apply_records(self, records: Iterable[WalRecord]) -> None:
        """Apply the records after the last applied one, in order (the lock is held)."""
        for record in records:
            if record.sequence <= self._applied:
                continue
            if record.sequence != self._applied + 1:
                raise WalError(f"{self._log.name}: record {record.sequence} follows record {self._applied}")
            try:
                self._replay_one(record)
            except (KeyError, TypeError, ValueError) as error:
                raise WalError(
                    f"{self._log.name}: record {record.sequence} ({record.op}) is malformed: {error}"
                ) from error
            self._applied = record.sequence

    def follow(self) -> None:
        """Apply what other replicas append to a shared log, from a background thread."""
        if self._log.shared and self._follower is None:
            self._follower = threading.Thread(target=self._follow, name=f"follow-{self.version}", daemon=True)
            self._follower.start()

    def _follow(self) -> None:
        settings = self._settings.redis
        failing = False
        while not self._closed.is_set():
            try:
                records = self._log.wait_records_after(self._applied, settings.follow_block_s)
                if records:
                    with self._lock:
                        if self._closed.is_set():
                            return
                        self._apply_records(records)
                    event(log, "catalogue updates followed", version=self.version, last_sequence=self._applied)
            except Unavailable as error:
                CATALOG_FOLLOW_FAILURES.labels(self._artifact_name, "unreachable").inc()
                if not failing:
                    event(log, "cannot follow the shared catalogue-update log", level=logging.WARNING, error=str(error))
                failing = True
                self._closed.wait(settings.follow_retry_s)
                continue
            except WalError as error:
                CATALOG_FOLLOW_FAILURES.labels(self._artifact_name, "broken").inc()
                self._broken = (
                    f"this replica stopped following the catalogue-update log of index version {self.version}: "
                    f"{error}. It answers searches as of record {self._applied} and refuses changes; restart it"
                )
                event(log, "catalogue-update log cannot be followed", level=logging.ERROR, error=str(error))
                return
            if failing:
                event(log, "following the shared catalogue-update log again", version=self.version)
            failing = False

    def _replay_one(self, record: WalRecord) -> None:
        body = record.body
        if record.op == OP_UPSERT:
            if body["model"] != self._loaded.embedding_model:
                raise WalError(
                    f"{self._log.name}: record {record.sequence} was embedded with {body['model']}, "
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
            raise WalError(f"{self._log.name}: record {record.sequence} has unknown operation {record.op!r}")


def read_params(artifacts: Path, artifact_name: str, version: str) -> dict[str, Any]:
    """The build parameters of a (verified, loaded) index version."""
    manifest = json.loads((Path(artifacts) / artifact_name / version / MANIFEST).read_text())
    params = manifest.get("params", {})
    return params if isinstance(params, dict) else {}


def folded_from(params: dict[str, Any], artifact_name: str) -> FoldedFrom | None:
    """What the build of a version (its manifest ``params``) folded of ``artifact_name``'s log."""
    folded = params.get(FOLDED_PARAM, {}).get("folded", {}).get(artifact_name)
    if not isinstance(folded, dict) or not folded.get("version"):
        return None
    return FoldedFrom(str(folded["version"]), int(folded.get("sequence", 0)))


def open_live_catalog(
    loaded: LoadedIndex,
    artifact_name: str,
    params: dict[str, Any],
    store: UpdateLogStore,
    settings: CatalogUpdateSettings,
    encoder: TextQueryEncoder | None,
) -> LiveCatalog:
    """The live catalogue of ``loaded``: its log opened (or started from the tail of the
    log its build folded) and replayed onto the index. Call :meth:`LiveCatalog.follow`
    once it serves."""
    update_log, records = store.open(artifact_name, loaded.version, folded_from(params, artifact_name))
    live = LiveCatalog(loaded, update_log, settings, encoder, artifact_name)
    try:
        live.replay(records)
    except BaseException:
        update_log.close()
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
    every_item = Catalog(
        item_ids=np.asarray(columns["item_ids"], dtype=np.str_),
        titles=np.asarray(columns["titles"], dtype=np.str_),
        descriptions=np.asarray(columns["descriptions"], dtype=np.str_),
        brands=np.asarray(columns["brands"], dtype=np.str_),
        categories=np.asarray(columns["categories"], dtype=np.str_),
        prices=np.asarray(columns["prices"], dtype=np.float64),
        stock=np.asarray(columns["stock"], dtype=np.int64),
        created_at=np.asarray(columns["created_at"], dtype=np.int64),
    )
    # Events of deleted items go; the others point at their item's new row.
    return dataclasses.replace(dataset, catalog=every_item).select_items(keep)


def fold_into_dataset(
    dataset: Dataset, artifacts: Path, store: UpdateLogStore, artifact_names: Sequence[str]
) -> FoldedCatalog:
    """``dataset`` with the logs of the serving versions of ``artifact_names`` applied
    (what a build does first), and the manifest record of what it folded."""
    records: list[WalRecord] = []
    folded: dict[str, dict[str, Any]] = {}
    for name in artifact_names:
        if not (Path(artifacts) / name / CURRENT).is_file():
            continue
        version = current_version(artifacts, name)
        logged = store.read(name, version)
        records.extend(logged)
        folded[name] = {"version": version, "sequence": logged[-1].sequence if logged else 0}
    changed = apply_to_dataset(dataset, records)
    counts = {
        "upserts": sum(len(r.body["items"]) for r in records if r.op == OP_UPSERT),
        "deletes": sum(len(r.body["item_ids"]) for r in records if r.op == OP_DELETE),
        "stock_levels": sum(len(r.body["levels"]) for r in records if r.op == OP_STOCK),
    }
    event(log, "catalogue updates folded into the build", items=len(changed.catalog), **counts, folded=folded)
    return FoldedCatalog(changed, {FOLDED_PARAM: {"folded": folded, **counts}})
