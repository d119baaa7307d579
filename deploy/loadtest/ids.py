"""Real ids for the load test: users and items the served artifacts know.

Requests for ids the services have never seen would measure the cold-start and
NOT_FOUND paths, not the ones a shop's traffic mostly takes. The ids come from the
retrieval index artifact being served (``<artifacts>/index`` or its shards
``index-shard-<i>-of-<n>``): its ``user_ids.npy`` are the users with a history, its
``item_ids.npy`` the servable items. With the dataset the artifacts were built from,
each user's most recent session becomes the session context of their requests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.artifacts import ArtifactError, open_current

INDEX_NAME = "index"
_SHARD_NAME = re.compile(r"^index-shard-\d+-of-\d+$")


@dataclass(frozen=True)
class LoadIds:
    users: list[str]
    items: list[str]
    # user id -> item ids of their most recent session, newest first (may be empty).
    sessions: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.users or not self.items:
            raise ValueError(f"need at least one user and one item, got {len(self.users)} and {len(self.items)}")

    def to_json(self) -> dict[str, Any]:
        return {"users": self.users, "items": self.items, "sessions": self.sessions}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> LoadIds:
        return cls(
            users=[str(user) for user in payload["users"]],
            items=[str(item) for item in payload["items"]],
            sessions={str(user): [str(item) for item in items] for user, items in payload.get("sessions", {}).items()},
        )


def index_artifact_names(artifacts: Path) -> list[str]:
    """The served index: ``index`` itself, else all of its shards."""
    if (artifacts / INDEX_NAME / "CURRENT").is_file():
        return [INDEX_NAME]
    shards = sorted(
        path.parent.name for path in artifacts.glob("index-shard-*/CURRENT") if _SHARD_NAME.match(path.parent.name)
    )
    if not shards:
        raise ArtifactError(f"{artifacts}: no index artifact ({INDEX_NAME}/CURRENT or index-shard-*/CURRENT)")
    return shards


def ids_from_artifacts(artifacts: Path, data: Path | None = None, session_items: int = 3) -> LoadIds:
    """Users and items of the served index (verified against its manifest), sorted.

    ``data``: the dataset the artifacts were built from, for session context.
    """
    users: set[str] = set()
    items: set[str] = set()
    for name in index_artifact_names(artifacts):
        artifact = open_current(artifacts, name)
        users.update(str(user) for user in artifact.load_array("user_ids.npy").tolist())
        items.update(str(item) for item in artifact.load_array("item_ids.npy").tolist())
    sessions = _last_sessions(data, users, items, session_items) if data is not None and session_items else {}
    return LoadIds(users=sorted(users), items=sorted(items), sessions=sessions)


def _last_sessions(data: Path, users: set[str], items: set[str], limit: int) -> dict[str, list[str]]:
    from shared.data import load_dataset

    dataset = load_dataset(data)
    events = dataset.events
    user_ids = dataset.users.user_ids
    item_ids = dataset.catalog.item_ids
    sessions: dict[str, list[str]] = {}
    # Events are sorted by time: walk each user's events from their newest one.
    order = np.lexsort((-events.timestamp, events.user_index))
    starts = np.flatnonzero(np.r_[True, np.diff(events.user_index[order]) != 0])
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        rows = order[start:end]
        user = str(user_ids[events.user_index[rows[0]]])
        if user not in users:
            continue
        newest_session = events.session_id[rows[0]]
        chosen: list[str] = []
        for row in rows:
            if events.session_id[row] != newest_session or len(chosen) >= limit:
                break
            item = str(item_ids[events.item_index[row]])
            if item in items and item not in chosen:
                chosen.append(item)
        sessions[user] = chosen
    return sessions


def write_ids(ids: LoadIds, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ids.to_json()))


def read_ids(path: Path) -> LoadIds:
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable ids file: {error}") from error
    if not isinstance(payload, dict) or "users" not in payload or "items" not in payload:
        raise ValueError(f'{path}: expected {{"users": [...], "items": [...]}}')
    return LoadIds.from_json(payload)
