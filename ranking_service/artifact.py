"""Write and load the ranker artifact (``<root>/ranker/<version>/``).

Files: ``model.txt`` (LightGBM text model), ``features.json`` (feature names, in
order, checked against the code at load), the item table (``items/*.npy``) and an
event snapshot (``events/*.npy``) that the in-process feature store is built from.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import scipy.sparse as sp

from ranking_service.features import CATEGORICAL_FEATURES, FEATURE_NAMES
from ranking_service.scoring import RankerModel, score_prior
from ranking_service.store import ItemStats, ItemTable, UserHistoryStore, co_interactions, item_stats
from shared.artifacts import Artifact, ArtifactError, ArtifactWriter, open_artifact
from shared.config import ALL_TIME_POPULARITY, ItemModelSettings, PopularityCounting, RankerBuildSettings
from shared.data import Dataset, Events
from shared.item_model import fit_item_model
from shared.logs import event

log = logging.getLogger(__name__)

KIND = "vitrine.ranker"
_NEIGHBOUR_PARTS = ("indptr", "indices", "data")
_MAPPED_FIELDS = ("content_vectors",)
DEFAULT_NAME = "ranker"
_ITEM_FIELDS = (
    "item_ids",
    "titles",
    "brands",
    "categories",
    "category_codes",
    "brand_codes",
    "prices",
    "stock",
    "created_at",
    "content_vectors",
)


def write_ranker_artifact(
    root: Path,
    booster: lgb.Booster,
    items: ItemTable,
    dataset: Dataset,
    snapshot_at: int,
    params: dict[str, Any],
    metrics: dict[str, Any],
    item_model: ItemModelSettings,
    popularity: PopularityCounting,
    name: str = DEFAULT_NAME,
) -> Artifact:
    """The ranker artifact; ``item_model``: the settings of the item model fitted on the
    event snapshot and served with the ranker (recorded as ``params.item_model``);
    ``popularity``: how its popular items are counted (``params.popularity``)."""
    with ArtifactWriter(root, name) as writer:
        booster.save_model(str(writer.path("model.txt")))
        writer.save_json("features.json", {"names": list(FEATURE_NAMES), "categorical": list(CATEGORICAL_FEATURES)})
        for field in _ITEM_FIELDS:
            writer.save_array(f"items/{field}.npy", getattr(items, field))
        events = dataset.events.before(snapshot_at)
        writer.save_array("events/user_ids.npy", dataset.users.user_ids)
        writer.save_array("events/user_index.npy", events.user_index)
        writer.save_array("events/item_index.npy", events.item_index)
        writer.save_array("events/event_code.npy", events.event_code)
        writer.save_array("events/timestamp.npy", events.timestamp)
        # Sessions shape the item model (shared/item_model.py) that train-ranker --from-logs
        # refits on this snapshot; only equality matters, so codes rather than the ids.
        writer.save_array(
            "events/session_code.npy", np.unique(events.session_id, return_inverse=True)[1].astype(np.int32)
        )
        # Computed here, once per build, rather than at every start-up (seconds at 1M items).
        settings = recorded_build_settings(params, root)
        neighbours = co_interactions(events, len(items), settings)
        # EASE weights of the snapshot (an empty matrix: too many items for an item model).
        weights = fit_item_model(events, len(items), item_model)
        if weights is None:
            weights = sp.csr_matrix((len(items), len(items)), dtype=np.float32)
        for matrix_name, matrix in (("co_interactions", neighbours), ("item_model", weights)):
            for part in _NEIGHBOUR_PARTS:
                writer.save_array(f"stats/{matrix_name}_{part}.npy", getattr(matrix, part))
        served = {
            "snapshot_at": snapshot_at,
            "item_model": item_model.model_dump(),
            "popularity": popularity.model_dump(),
        }
        artifact = writer.commit(KIND, {**params, **served}, metrics)
    event(log, "ranker artifact written", version=artifact.version, path=str(artifact.path), **metrics)
    return artifact


def checked_model_text(path: Path) -> str:
    """The LightGBM text model, after a structural check.

    LightGBM's parser can crash the whole process on a damaged model string, so a
    model is handed to it only when its sections are complete and its tree count
    matches its header.
    """
    try:
        text = path.read_text()
    except UnicodeDecodeError as error:
        raise ArtifactError(f"{path}: not a LightGBM text model ({error})") from error
    header = re.search(r"^tree_sizes=(.*)$", text, re.MULTILINE)
    trees = len(re.findall(r"^Tree=\d+$", text, re.MULTILINE))
    if (
        not text.startswith("tree\n")
        or header is None
        or "\nend of trees\n" not in text
        or "\nend of parameters\n" not in text
        or trees != len(header.group(1).split())
    ):
        raise ArtifactError(f"{path}: incomplete or damaged LightGBM model; refusing to load it")
    return text


def served_item_model_settings(params: dict[str, Any], where: Path) -> ItemModelSettings:
    """The settings of the item model a ranker artifact serves: recorded on their own since
    the build tunes them on the snapshot; older artifacts fitted it with their build's."""
    recorded = params.get("item_model")
    if recorded is None:
        return recorded_build_settings(params, where).item_model
    return ItemModelSettings.model_validate(recorded)


def served_popularity(params: dict[str, Any]) -> PopularityCounting:
    """How a ranker artifact's popular items are counted; artifacts older than the record
    counted all time."""
    recorded = params.get("popularity")
    return ALL_TIME_POPULARITY if recorded is None else PopularityCounting.model_validate(recorded)


def served_popular_candidates(params: dict[str, Any]) -> int:
    """How many popular items join a ranker's candidates, as its training replay added them
    (RankerBuildSettings.popular_candidates for its task); artifacts older than the setting
    trained without them."""
    recorded = params.get("ranker_build")
    value = recorded.get("popular_candidates", 0) if isinstance(recorded, dict) else 0
    return int(value)


def recorded_build_settings(params: dict[str, Any], where: Path) -> RankerBuildSettings:
    """The settings the ranker was trained with: co-interaction features must be computed
    as they were in training."""
    recorded = params.get("ranker_build")
    if not isinstance(recorded, dict):
        raise ArtifactError(f"{where}: the ranker parameters record no ranker_build settings")
    return RankerBuildSettings.model_validate(recorded)


def _load_item_matrix(artifact: Artifact, n_items: int, matrix_name: str) -> sp.csr_matrix:
    """A stored item x item matrix (co_interactions, item_model), after a structural check
    (scipy trusts its inputs)."""
    indptr, indices, data = (artifact.load_array(f"stats/{matrix_name}_{part}.npy") for part in _NEIGHBOUR_PARTS)
    if (
        indptr.shape != (n_items + 1,)
        or len(indices) != len(data)
        or int(indptr[0]) != 0
        or int(indptr[-1]) != len(indices)
        or np.any(np.diff(indptr) < 0)
        or (len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= n_items))
    ):
        raise ArtifactError(f"{artifact.path}: {matrix_name} matrix does not fit {n_items} items; rebuild the ranker")
    return sp.csr_matrix((data, indices, indptr), shape=(n_items, n_items))


@dataclass(frozen=True)
class LoadedRanker:
    version: str
    model: RankerModel
    items: ItemTable
    item_row: dict[str, int]
    stats: ItemStats
    histories: UserHistoryStore
    snapshot_at: int
    # The verified model file, for compiling the trees (ranking_service/scoring.py).
    model_path: Path | None = None
    # Popular items that join retrieval's candidates, as in training (served_popular_candidates).
    popular_candidates: int = 0


def load_ranker_model(artifact: Artifact) -> RankerModel:
    """The artifact's trees and prior, after checking they were trained on this build's features."""
    features = json.loads(artifact.file("features.json").read_text())
    if features.get("names") != list(FEATURE_NAMES):
        raise ArtifactError(
            f"{artifact.path}: the model was trained on features {features.get('names')}, "
            f"this build computes {list(FEATURE_NAMES)}; retrain the ranker"
        )
    booster = lgb.Booster(model_str=checked_model_text(artifact.file("model.txt")))
    try:
        prior = score_prior(recorded_build_settings(artifact.params, artifact.path))
    except ValueError as error:
        raise ArtifactError(f"{artifact.path}: {error}") from error
    return RankerModel(booster, prior, bool(artifact.params.get("ranks_cold_start", True)))


def load_ranker_artifact(root: Path, name: str = DEFAULT_NAME, version: str | None = None) -> LoadedRanker:
    artifact = open_artifact(root, name, KIND, version)
    model = load_ranker_model(artifact)
    model_path = artifact.file("model.txt")
    # The content vectors (1M items: 768 MB) are mapped, not read: the largest part of start-up.
    items = ItemTable(
        **{field: artifact.load_array(f"items/{field}.npy", mmap=field in _MAPPED_FIELDS) for field in _ITEM_FIELDS}
    )
    user_ids = artifact.load_array("events/user_ids.npy")
    events = _load_events(artifact)
    snapshot_at = int(artifact.params["snapshot_at"])
    loaded = LoadedRanker(
        version=artifact.version,
        model=model,
        items=items,
        item_row=items.row_of(),
        stats=item_stats(
            events,
            len(items),
            snapshot_at,
            recorded_build_settings(artifact.params, artifact.path),
            _load_item_matrix(artifact, len(items), "co_interactions"),
            _load_item_matrix(artifact, len(items), "item_model"),
            served_popularity(artifact.params),
        ),
        histories=UserHistoryStore(events, user_ids),
        snapshot_at=snapshot_at,
        model_path=model_path,
        popular_candidates=served_popular_candidates(artifact.params),
    )
    event(log, "ranker artifact loaded", version=artifact.version, items=len(items), users=len(loaded.histories))
    return loaded


def _load_events(artifact: Artifact, with_sessions: bool = False) -> Events:
    """The artifact's event snapshot (ids as rows; see write_ranker_artifact). Session ids
    (as their codes) only ``with_sessions``: serving does not use them, refitting the item
    model does; artifacts written before they were stored give every event the same one."""
    timestamps = artifact.load_array("events/timestamp.npy")
    blank = np.zeros(len(timestamps), dtype="<U1")
    sessions = (
        artifact.load_array("events/session_code.npy").astype(np.str_)
        if with_sessions and "events/session_code.npy" in artifact.manifest["files"]
        else blank
    )
    return Events(
        user_index=artifact.load_array("events/user_index.npy"),
        item_index=artifact.load_array("events/item_index.npy"),
        event_code=artifact.load_array("events/event_code.npy"),
        timestamp=timestamps,
        # Not used by ranking features; kept out of the artifact to keep it small.
        device=blank,
        session_id=sessions,
    )


@dataclass(frozen=True)
class RankerSnapshot:
    """What a ranker artifact holds besides its model: the item table and the event
    snapshot (``vitrine train-ranker --from-logs`` builds the next artifact on them)."""

    version: str
    items: ItemTable
    user_ids: np.ndarray
    events: Events
    snapshot_at: int
    params: dict[str, Any]


def load_ranker_snapshot(root: Path, name: str = DEFAULT_NAME, version: str | None = None) -> RankerSnapshot:
    artifact = open_artifact(root, name, KIND, version)
    items = ItemTable(**{field: artifact.load_array(f"items/{field}.npy") for field in _ITEM_FIELDS})
    events = _load_events(artifact, with_sessions=True)
    return RankerSnapshot(
        version=artifact.version,
        items=items,
        user_ids=artifact.load_array("events/user_ids.npy"),
        events=events,
        snapshot_at=int(artifact.params["snapshot_at"]),
        params=artifact.params,
    )
