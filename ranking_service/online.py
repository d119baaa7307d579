"""Online user state: the events LogEvents stored since the ranker snapshot was built.

:class:`OnlineUserState` is the interface; :class:`InMemoryUserState` (the default, one
process) and :class:`RedisUserState` (shared by replicas, kept across restarts) implement
it. A Recommend merges a user's online events with the snapshot history
(:func:`merged_history`), so what was logged a moment ago changes the very next answer.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import redis

from ranking_service.store import UserHistory
from shared.config import OnlineStateSettings
from shared.logs import event
from shared.redis_client import redacted_url, redis_client

log = logging.getLogger(__name__)


class OnlineStateUnavailable(Exception):
    """The store could not be reached; the message names where it was looked for.
    ``quiet``: a known outage (reads paused), not worth another warning."""

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


@dataclass(frozen=True)
class OnlineEvent:
    user_id: str
    item_id: str
    event_code: int
    timestamp: int
    device: str = ""
    session_id: str = ""
    request_id: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @staticmethod
    def from_json(text: str | bytes) -> OnlineEvent:
        values = json.loads(text)
        return OnlineEvent(
            user_id=str(values["user_id"]),
            item_id=str(values["item_id"]),
            event_code=int(values["event_code"]),
            timestamp=int(values["timestamp"]),
            device=str(values.get("device", "")),
            session_id=str(values.get("session_id", "")),
            request_id=str(values.get("request_id", "")),
        )


class OnlineUserState(Protocol):
    def append(self, events: Sequence[OnlineEvent]) -> None:
        """Store ``events``; returns only once they are stored (raises OnlineStateUnavailable)."""

    def recent(self, user_id: str, since: int) -> list[OnlineEvent]:
        """The user's stored events with timestamp >= ``since``, newest first."""

    def close(self) -> None: ...


def _newest_first(events: Sequence[OnlineEvent], since: int) -> list[OnlineEvent]:
    return sorted((e for e in events if e.timestamp >= since), key=lambda e: e.timestamp, reverse=True)


class InMemoryUserState:
    """Per-user bounded deques in this process, at most ``max_users`` users (the least
    recently active is forgotten first); thread-safe."""

    def __init__(self, max_events_per_user: int, max_users: int = 1_000_000) -> None:
        self._max = max_events_per_user
        self._max_users = max_users
        self._events: OrderedDict[str, deque[OnlineEvent]] = OrderedDict()
        self._lock = threading.Lock()

    def append(self, events: Sequence[OnlineEvent]) -> None:
        with self._lock:
            for online_event in events:
                queue = self._events.get(online_event.user_id)
                if queue is None:
                    queue = self._events[online_event.user_id] = deque(maxlen=self._max)
                    if len(self._events) > self._max_users:
                        self._events.popitem(last=False)
                else:
                    self._events.move_to_end(online_event.user_id)
                queue.append(online_event)

    def recent(self, user_id: str, since: int) -> list[OnlineEvent]:
        with self._lock:
            stored = list(self._events.get(user_id, ()))
        return _newest_first(stored, since)

    def close(self) -> None:
        pass


class RedisUserState:
    """One Redis list per user (newest first), capped and with a TTL.

    A batch is written in one MULTI/EXEC transaction (LPUSH, LTRIM, EXPIRE per user) and
    :meth:`append` returns only after Redis acknowledged it: with Redis' append-only file
    on, a restart of the ranking process loses nothing acknowledged.
    """

    def __init__(self, settings: OnlineStateSettings) -> None:
        self._settings = settings
        self.url = redacted_url(settings.redis_url)
        # Reads are skipped until then (monotonic clock) after a failure.
        self._reads_paused_until = 0.0
        self._client = redis_client(settings)

    def _key(self, user_id: str) -> str:
        return f"{self._settings.key_prefix}{user_id}"

    def append(self, events: Sequence[OnlineEvent]) -> None:
        by_user: dict[str, list[str]] = {}
        for online_event in events:
            by_user.setdefault(online_event.user_id, []).append(online_event.to_json())
        if not by_user:
            return
        try:
            with self._client.pipeline(transaction=True) as pipe:
                for user_id, records in by_user.items():
                    key = self._key(user_id)
                    pipe.lpush(key, *records)
                    pipe.ltrim(key, 0, self._settings.max_events_per_user - 1)
                    pipe.expire(key, self._settings.ttl_s)
                pipe.execute()
        except redis.RedisError as error:
            raise OnlineStateUnavailable(f"online user state at {self.url} is unreachable: {error}") from error

    def recent(self, user_id: str, since: int) -> list[OnlineEvent]:
        if time.monotonic() < self._reads_paused_until:
            raise OnlineStateUnavailable(f"online user state at {self.url}: reads paused after a failure", quiet=True)
        try:
            records = self._client.lrange(self._key(user_id), 0, -1)
        except redis.RedisError as error:
            self._reads_paused_until = time.monotonic() + self._settings.read_backoff_s
            raise OnlineStateUnavailable(f"online user state at {self.url} is unreachable: {error}") from error
        parsed: list[OnlineEvent] = []
        for record in records:
            try:
                parsed.append(OnlineEvent.from_json(record))
            except (ValueError, KeyError, TypeError):
                event(log, "unreadable online event skipped", level=logging.WARNING, user_id=user_id)
        return _newest_first(parsed, since)

    def close(self) -> None:
        self._client.close()


def online_user_state(settings: OnlineStateSettings) -> OnlineUserState:
    if settings.backend == "redis":
        return RedisUserState(settings)
    return InMemoryUserState(settings.max_events_per_user, settings.max_users)


def merged_history(
    snapshot: UserHistory, online: Sequence[OnlineEvent], item_row: dict[str, int], before: int
) -> UserHistory:
    """The snapshot history with the online events (known items, before ``before``) in
    front of it, newest first. Online events are newer than the snapshot by construction
    (:meth:`OnlineUserState.recent` with ``since`` = the snapshot time)."""
    known = [e for e in online if e.item_id in item_row and e.timestamp < before]
    if not known:
        return snapshot
    known.sort(key=lambda e: e.timestamp, reverse=True)
    rows = np.asarray([item_row[e.item_id] for e in known], dtype=np.int32)
    codes = np.asarray([e.event_code for e in known], dtype=np.int8)
    times = np.asarray([e.timestamp for e in known], dtype=np.int64)
    history = UserHistory(
        np.concatenate([rows, snapshot.item_rows]),
        np.concatenate([codes, snapshot.event_codes]),
        np.concatenate([times, snapshot.timestamps]),
    )
    # Snapshot events at or after an online one (clock skew, backdated logs) keep the order right.
    order = np.argsort(-history.timestamps, kind="stable")
    return UserHistory(history.item_rows[order], history.event_codes[order], history.timestamps[order])


def with_online_events(
    state: OnlineUserState | None,
    user_id: str,
    snapshot: UserHistory,
    item_row: dict[str, int],
    snapshot_at: int,
    before: int,
) -> UserHistory:
    """What a Recommend calls once: the snapshot history merged with the online events.

    When the online store cannot be reached the request goes on with the snapshot history
    alone (logged as a warning): an answer without the last minutes beats no answer.
    """
    if state is None:
        return snapshot
    try:
        online = state.recent(user_id, since=snapshot_at)
    except OnlineStateUnavailable as error:
        if not error.quiet:
            event(
                log,
                "online user state unavailable; using the snapshot history",
                level=logging.WARNING,
                error=str(error),
            )
        return snapshot
    return merged_history(snapshot, online, item_row, before)
