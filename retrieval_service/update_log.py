"""The catalogue-update log: where UpsertItems / DeleteItems / UpdateStock are written
before they are applied (retrieval_service/updates.py), so a restart replays them and the
next build folds them in.

Two stores, chosen by ``retrieval.updates.log``:

* :class:`FileLogStore`: a write-ahead log on local disk (one JSON line per record with a
  sequence number and a checksum, fsynced), for one retrieval replica per index or shard.
* :class:`RedisLogStore`: one Redis stream per index version, shared by every replica.
  An append takes the next sequence number atomically (a Lua script refuses it when
  another replica took that number first: the writer catches up and plans again), and
  every replica follows the stream, so a change sent to one replica reaches all of them.

Both keep the same records (:class:`WalRecord`, checksummed the same way), number them
1, 2, ... per index version, and carry the tail a build did not fold over to the next
version (:func:`carried_over`). docs/catalog-updates.md describes the life cycle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import redis

from shared.config import CatalogUpdateSettings, SharedUpdateLogSettings
from shared.errors import FailedPrecondition, Unavailable
from shared.logs import event
from shared.redis_client import redacted_url, redis_client

log = logging.getLogger(__name__)

WAL_FILE = "wal.jsonl"
OP_UPSERT, OP_DELETE, OP_STOCK, OP_ORIGIN = "upsert", "delete", "stock", "origin"


class WalError(RuntimeError):
    """A log is damaged (other than a torn last line of a file) or does not fit the index."""


class LogBehind(Exception):
    """Another writer took the sequence number this append asked for (shared log only):
    catch up with the log and plan the change again."""


@dataclass(frozen=True)
class FoldedFrom:
    """What the build of an index version folded: the log of ``version`` up to ``sequence``."""

    version: str
    sequence: int


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

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def shared(self) -> bool:
        return False

    def append(self, record: WalRecord) -> None:
        if record.sequence != self._last_sequence + 1:
            # One writer per file: a gap or a repeat is a bug, never a race.
            raise WalError(f"{self.path}: record {record.sequence} after {self._last_sequence}")
        self._handle.write(encode_line(record))
        self._handle.flush()
        if self._fsync:
            os.fsync(self._handle.fileno())
        self._last_sequence = record.sequence

    def records_after(self, sequence: int) -> list[WalRecord]:
        # The only writer is this process: nothing is in the file that it did not apply.
        return []

    def wait_records_after(self, sequence: int, timeout_s: float) -> list[WalRecord]:
        return []

    def discard(self) -> None:
        """Remove the log of a version that never served (the next load carries the tail
        over afresh)."""
        self.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        self._handle.close()


def wal_path(wal_root: Path, artifact_name: str, version: str) -> Path:
    return Path(wal_root) / f"{artifact_name}-updates" / version / WAL_FILE


def carried_over(tail: Sequence[WalRecord], folded: FoldedFrom) -> list[WalRecord]:
    """The first records of a new version's log: an ``origin`` record naming where they
    come from, then the records of the folded version's log after what its build folded
    (changes acknowledged while the build ran), renumbered from 2."""
    origin = WalRecord(
        1, OP_ORIGIN, int(time.time()), {"from_version": folded.version, "after_sequence": folded.sequence}
    )
    kept = [record for record in tail if record.sequence > folded.sequence and record.op != OP_ORIGIN]
    return [origin, *(replace(record, sequence=position) for position, record in enumerate(kept, start=2))]


def _carried_event(artifact_name: str, version: str, folded: FoldedFrom, records: int) -> None:
    event(
        log,
        "catalogue updates carried over to the new index version",
        index=artifact_name,
        version=version,
        from_version=folded.version,
        after_sequence=folded.sequence,
        records=records,
    )


class UpdateLog(Protocol):
    """The log of one index version, as one writer (a retrieval replica) sees it."""

    @property
    def name(self) -> str:
        """Where the log is, for messages (a path, or a Redis URL and key)."""
        ...

    @property
    def shared(self) -> bool:
        """Whether other replicas write to it too (then it must be followed)."""
        ...

    def append(self, record: WalRecord) -> None:
        """Store ``record`` durably; :class:`LogBehind` when its sequence number is taken,
        :class:`~shared.errors.Unavailable` when the log is unreachable or sealed."""
        ...

    def records_after(self, sequence: int) -> list[WalRecord]:
        """Records other writers appended after ``sequence``, in order."""
        ...

    def wait_records_after(self, sequence: int, timeout_s: float) -> list[WalRecord]:
        """Like :meth:`records_after`, waiting up to ``timeout_s`` for at least one."""
        ...

    def discard(self) -> None:
        """Called when the version never served: undo what opening it created, if safe."""
        ...

    def close(self) -> None: ...


class UpdateLogStore(Protocol):
    """The logs of every index version, in one place (disk or Redis)."""

    def exists(self, artifact_name: str, version: str) -> bool: ...

    def read(self, artifact_name: str, version: str) -> list[WalRecord]:
        """Every record of a version's log (none when it has none)."""
        ...

    def open(self, artifact_name: str, version: str, folded: FoldedFrom | None) -> tuple[UpdateLog, list[WalRecord]]:
        """The log of ``version`` for writing and the records to replay. A version whose
        log does not exist yet starts from the tail of the log its build folded."""
        ...

    def close(self) -> None: ...


class FileLogStore:
    """Write-ahead logs on local disk: <root>/<artifact name>-updates/<version>/wal.jsonl."""

    def __init__(self, root: Path, fsync: bool) -> None:
        self.root = Path(root)
        self._fsync = fsync

    def path(self, artifact_name: str, version: str) -> Path:
        return wal_path(self.root, artifact_name, version)

    def exists(self, artifact_name: str, version: str) -> bool:
        return self.path(artifact_name, version).exists()

    def read(self, artifact_name: str, version: str) -> list[WalRecord]:
        return read_wal(self.path(artifact_name, version)).records

    def open(
        self, artifact_name: str, version: str, folded: FoldedFrom | None
    ) -> tuple[WriteAheadLog, list[WalRecord]]:
        path = self.path(artifact_name, version)
        if not path.exists() and folded is not None and folded.version != version:
            records = carried_over(self.read(artifact_name, folded.version), folded)
            write_new_wal(path, records, self._fsync)
            _carried_event(artifact_name, version, folded, len(records) - 1)
        return WriteAheadLog.open(path, self._fsync)

    def close(self) -> None:
        pass


# A record is appended only as the next number and only while no newer version sealed the
# log: both checked and the record added in one atomic step.
_APPEND = """
local sealed_by = redis.call('GET', KEYS[2])
if sealed_by then return {-1, sealed_by} end
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last = 0
if #newest > 0 then last = tonumber(string.match(newest[1][1], '%-(%d+)$')) end
if last + 1 ~= tonumber(ARGV[1]) then return {-2, tostring(last)} end
redis.call('XADD', KEYS[1], '0-' .. ARGV[1], 'record', ARGV[2])
return {1, ARGV[1]}
"""
# A new version's log is created whole, once: replicas loading it at the same time all
# try, one wins, the others find it there.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for position, line in ipairs(ARGV) do redis.call('XADD', KEYS[1], '0-' .. position, 'record', line) end
return 1
"""
_FIELD = b"record"
_PAGE = 1000


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stream_records(key: str, entries: Any, after: int) -> list[WalRecord]:
    """The records of XRANGE / XREAD ``entries`` (id, fields) following record ``after``."""
    records: list[WalRecord] = []
    for entry_id, fields in entries or ():
        expected = after + len(records) + 1
        record = _decode_line(fields.get(_FIELD, b""), expected)
        if record is None:
            raise WalError(
                f"Redis stream {key}: entry {_text(entry_id)} is damaged or out of sequence "
                f"(expected record {expected}); restore it from Redis' append-only file or run a build"
            )
        records.append(record)
    return records


class RedisUpdateLog:
    """The Redis stream of one index version, as one replica writes and follows it."""

    def __init__(self, store: RedisLogStore, key: str) -> None:
        self._store = store
        self._key = key
        self._seal_key = f"{key}:sealed"
        # Blocking reads get a connection of their own, so writes never queue behind them.
        self._follower = redis_client(store.settings, extra_socket_timeout_s=store.settings.follow_block_s)

    @property
    def name(self) -> str:
        return f"{self._store.url} stream {self._key}"

    @property
    def shared(self) -> bool:
        return True

    def append(self, record: WalRecord) -> None:
        problem = self._store.durability_problem
        if problem is not None:
            raise FailedPrecondition(problem)
        try:
            outcome = self._store.append_script(
                keys=[self._key, self._seal_key], args=[record.sequence, encode_line(record)[:-1]]
            )
        except redis.RedisError as error:
            raise Unavailable(
                f"the shared catalogue-update log at {self.name} is unreachable ({error}); "
                "the change may not have been applied: retry it (upserts, deletes and stock levels are idempotent)"
            ) from error
        status, detail = int(outcome[0]), outcome[1]
        if status == -2:
            raise LogBehind(f"record {record.sequence} taken; the log is at {detail!r}")
        if status == -1:
            raise Unavailable(
                f"index version of {self._key} is being replaced by version {_text(detail)}, which took over its "
                "catalogue-update log; retry the change shortly (it will reach the new version)"
            )

    def _range(self, after: int) -> list[WalRecord]:
        records: list[WalRecord] = []
        while True:
            start = after + len(records) + 1
            entries: Any = self._store.client.xrange(self._key, min=f"0-{start}", max="+", count=_PAGE)
            records.extend(_stream_records(self._key, entries, start - 1))
            if len(entries) < _PAGE:
                return records

    def records_after(self, sequence: int) -> list[WalRecord]:
        try:
            return self._range(sequence)
        except redis.RedisError as error:
            raise Unavailable(f"the shared catalogue-update log at {self.name} is unreachable ({error})") from error

    def wait_records_after(self, sequence: int, timeout_s: float) -> list[WalRecord]:
        try:
            answer: Any = self._follower.xread(
                {self._key: f"0-{sequence}"}, count=_PAGE, block=max(1, int(timeout_s * 1000))
            )
        except redis.RedisError as error:
            raise Unavailable(f"the shared catalogue-update log at {self.name} is unreachable ({error})") from error
        if not answer:
            return []
        return _stream_records(self._key, answer[0][1], sequence)

    def discard(self) -> None:
        # Never delete a shared log: another replica may already serve this version and
        # have acknowledged changes in it. Leaving it is safe; the next load reuses it.
        self.close()

    def close(self) -> None:
        self._follower.close()


class RedisLogStore:
    """One Redis stream per index version: <key_prefix><artifact name>:<version>."""

    def __init__(self, settings: SharedUpdateLogSettings, require_durable: bool) -> None:
        self.settings = settings
        self.url = redacted_url(settings.redis_url)
        self.client = redis_client(settings)
        self.append_script = self.client.register_script(_APPEND)
        self._create_script = self.client.register_script(_CREATE)
        self._require_durable = require_durable
        self._lock = threading.Lock()
        self.durability_problem: str | None = None

    def key(self, artifact_name: str, version: str) -> str:
        return f"{self.settings.key_prefix}{artifact_name}:{version}"

    def _unreachable(self, error: redis.RedisError) -> Unavailable:
        return Unavailable(f"the shared catalogue-update log at {self.url} is unreachable ({error})")

    def exists(self, artifact_name: str, version: str) -> bool:
        try:
            return bool(self.client.exists(self.key(artifact_name, version)))
        except redis.RedisError as error:
            raise self._unreachable(error) from error

    def read(self, artifact_name: str, version: str) -> list[WalRecord]:
        log = RedisUpdateLog(self, self.key(artifact_name, version))
        try:
            return log.records_after(0)
        finally:
            log.close()

    def _check_durability(self) -> None:
        """An acknowledged change must survive a Redis restart: with the append-only file
        fsynced on every write, Redis answers a write only once it is on disk."""
        try:
            config = self.client.config_get("append*")
        except redis.ResponseError as error:  # CONFIG renamed or not permitted (managed Redis)
            event(
                log,
                "cannot verify that Redis persists every write",
                level=logging.WARNING,
                url=self.url,
                error=str(error),
            )
            return
        appendonly, appendfsync = config.get("appendonly"), config.get("appendfsync")
        if appendonly == "yes" and appendfsync == "always":
            self.durability_problem = None
            return
        message = (
            f"Redis at {self.url} has appendonly={appendonly} appendfsync={appendfsync}: an acknowledged "
            "catalogue change could be lost on a Redis restart. Set appendonly yes and appendfsync always, "
            "or retrieval.updates.fsync=false to accept that"
        )
        event(log, "shared catalogue-update log is not durable", level=logging.WARNING, url=self.url, problem=message)
        self.durability_problem = message if self._require_durable else None

    def open(
        self, artifact_name: str, version: str, folded: FoldedFrom | None
    ) -> tuple[RedisUpdateLog, list[WalRecord]]:
        key = self.key(artifact_name, version)
        try:
            self._check_durability()
            if folded is not None and folded.version != version and not self.client.exists(key):
                old_key = self.key(artifact_name, folded.version)
                # From here on the folded version's replicas refuse changes (UNAVAILABLE,
                # retryable), so its tail is final when it is read.
                self.client.set(f"{old_key}:sealed", version)
                old = RedisUpdateLog(self, old_key)
                try:
                    records = carried_over(old.records_after(0), folded)
                finally:
                    old.close()
                if self._create_script(keys=[key], args=[encode_line(record)[:-1] for record in records]):
                    _carried_event(artifact_name, version, folded, len(records) - 1)
            sealed_by = self.client.get(f"{key}:sealed")
            if sealed_by is not None:
                # Loading a version whose log a newer one took over means CURRENT was moved
                # back to it (a rollback): it takes changes again. Changes the newer version
                # acknowledged are not in it.
                self.client.delete(f"{key}:sealed")
                event(
                    log,
                    "catalogue-update log reopened after a rollback",
                    level=logging.WARNING,
                    index=artifact_name,
                    version=version,
                    sealed_by=_text(sealed_by),
                )
        except redis.RedisError as error:
            raise self._unreachable(error) from error
        update_log = RedisUpdateLog(self, key)
        try:
            return update_log, update_log.records_after(0)
        except BaseException:
            update_log.close()
            raise

    def close(self) -> None:
        self.client.close()


def update_log_store(settings: CatalogUpdateSettings, artifacts: Path) -> UpdateLogStore:
    """The store ``retrieval.updates`` configures (file logs default to the artifact root)."""
    if settings.log == "redis":
        return RedisLogStore(settings.redis, require_durable=settings.fsync)
    return FileLogStore(settings.wal_dir or artifacts, settings.fsync)
