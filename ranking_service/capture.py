"""Training data capture: served impressions and logged events as JSON lines.

``<directory>/impressions/impressions-<start>-<pid>-<n>.jsonl`` holds one line per
Recommend answer; ``<directory>/events/events-<start>-<pid>-<n>.jsonl`` one line per
event LogEvents accepted. Each file starts with a header line
(``{"record": "header", "schema": 1, "kind": ..., "feature_names": [...]}``) so a reader
can refuse logs written by a build that computed other features. A background thread
writes, flushes every ``flush_interval_s`` and rotates files past ``rotate_bytes``; the
request path only puts a record on a bounded queue (a full queue drops the record and
counts it, it never blocks). :meth:`CaptureWriter.close` (on server stop) writes
everything queued.

``vitrine train-ranker --from-logs`` (ranking_service/training.py) reads them back.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ranking_service.features import FEATURE_NAMES
from shared.config import CaptureSettings
from shared.logs import event

log = logging.getLogger(__name__)

CAPTURE_SCHEMA = 1
IMPRESSIONS = "impressions"
EVENTS = "events"
KINDS = (IMPRESSIONS, EVENTS)


def header(kind: str) -> dict[str, Any]:
    return {"record": "header", "schema": CAPTURE_SCHEMA, "kind": kind, "feature_names": list(FEATURE_NAMES)}


@dataclass
class _OpenFile:
    handle: TextIO
    bytes_written: int


class CaptureWriter:
    """Appends impression and event records from any thread; one writer thread does the IO."""

    def __init__(self, settings: CaptureSettings) -> None:
        self._settings = settings
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(maxsize=settings.queue_size)
        self._files: dict[str, _OpenFile] = {}
        self._sequence = 0
        self.dropped = 0
        self.written = 0
        for kind in KINDS:
            (settings.directory / kind).mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self._thread.start()
        event(log, "capture writing", directory=str(settings.directory))

    def impression(self, record: dict[str, Any]) -> None:
        self._put(IMPRESSIONS, record)

    def events(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._put(EVENTS, record)

    def _put(self, kind: str, record: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait((kind, record))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                event(log, "capture queue full; records dropped", level=logging.WARNING, dropped=self.dropped)

    def _open(self, kind: str) -> _OpenFile:
        self._sequence += 1
        name = f"{kind}-{int(time.time())}-{os.getpid()}-{self._sequence:06d}.jsonl"
        handle = (self._settings.directory / kind / name).open("a", encoding="utf-8")
        line = json.dumps(header(kind), separators=(",", ":")) + "\n"
        handle.write(line)
        return _OpenFile(handle, len(line))

    def _write(self, kind: str, record: dict[str, Any]) -> None:
        current = self._files.get(kind)
        if current is None or current.bytes_written >= self._settings.rotate_bytes:
            if current is not None:
                current.handle.close()
            current = self._files[kind] = self._open(kind)
        line = json.dumps(record, separators=(",", ":")) + "\n"
        current.handle.write(line)
        current.bytes_written += len(line)
        self.written += 1

    def _flush(self) -> None:
        for current in self._files.values():
            current.handle.flush()

    def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=self._settings.flush_interval_s)
            except queue.Empty:
                item = ()  # type: ignore[assignment]
            if item is None:
                break
            if item:
                try:
                    self._write(*item)
                except OSError as error:
                    self.dropped += 1
                    event(log, "capture write failed", level=logging.ERROR, error=str(error))
            if time.monotonic() - last_flush >= self._settings.flush_interval_s:
                self._flush()
                last_flush = time.monotonic()
        self._flush()
        for current in self._files.values():
            current.handle.close()
        self._files.clear()

    def close(self) -> None:
        """Write everything queued, close the files; later records are dropped."""
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        self._thread.join()
        event(log, "capture closed", written=self.written, dropped=self.dropped)


def read_records(directory: Path, kind: str) -> list[dict[str, Any]]:
    """Every record of ``kind`` under ``directory`` (its ``<kind>/`` folder, or itself),
    after checking each file's header against this build's features."""
    folder = directory / kind if (directory / kind).is_dir() else directory
    files = sorted(folder.glob(f"{kind}-*.jsonl"))
    records: list[dict[str, Any]] = []
    expected = list(FEATURE_NAMES)
    for path in files:
        with path.open(encoding="utf-8") as handle:
            first = handle.readline()
            try:
                head = json.loads(first) if first else {}
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line 1 is not JSON ({error})") from error
            if head.get("record") != "header" or head.get("kind") != kind:
                raise ValueError(f"{path}: no {kind} header on line 1; not a Vitrine capture file")
            if head.get("schema") != CAPTURE_SCHEMA:
                raise ValueError(f"{path}: capture schema {head.get('schema')!r}; this build reads {CAPTURE_SCHEMA}")
            if head.get("feature_names") != expected:
                raise ValueError(
                    f"{path}: logged with features {head.get('feature_names')}, this build computes {expected}; "
                    "train from logs written by a server of this build"
                )
            for number, line in enumerate(handle, start=2):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    # The last line of a file cut by a crash; anything else is damage.
                    event(log, "unreadable capture line skipped", level=logging.WARNING, path=str(path), line=number)
    return records
