"""The LambdaMART ranker: time-split replay and its lift over retrieval order."""

from __future__ import annotations

import numpy as np

from ranking_service.training import replay_requests
from shared.config import VitrineSettings
from shared.data import Dataset
from tests.conftest import BuiltArtifacts

# Asserted floor for the ranker's NDCG@10 lift over retrieval order on held-out users.
MIN_NDCG_LIFT = 0.05


def test_ranker_beats_retrieval_order_on_held_out_users(artifacts: BuiltArtifacts) -> None:
    metrics = artifacts.ranker.metrics
    ranker = metrics["holdout_ndcg@10_ranker"]
    retrieval = metrics["holdout_ndcg@10_retrieval_order"]
    assert metrics["holdout_requests"] >= 50
    assert ranker > retrieval * (1 + MIN_NDCG_LIFT), f"ranker NDCG@10 {ranker} vs retrieval order {retrieval}"


def test_replayed_requests_split_by_time(
    dataset: Dataset, artifacts: BuiltArtifacts, settings: VitrineSettings
) -> None:
    requests = replay_requests(dataset, artifacts.cutoff, settings.ranker_build)
    assert requests
    assert all(request.context.timestamp >= artifacts.cutoff for request in requests)
    assert all(set(request.labels.values()) <= {1, 2, 3} for request in requests)
    holdout_share = np.mean([request.holdout for request in requests])
    assert 0.1 < holdout_share < 0.3
    # Session items precede the request moment and are the user's own events.
    events = dataset.events
    for request in requests[:100]:
        user_row = int(np.flatnonzero(dataset.users.user_ids == request.user_id)[0])
        before = (events.user_index == user_row) & (events.timestamp <= request.context.timestamp)
        assert set(request.context.session_rows.tolist()) <= set(events.item_index[before].tolist())


def test_replay_is_deterministic(dataset: Dataset, artifacts: BuiltArtifacts, settings: VitrineSettings) -> None:
    first = replay_requests(dataset, artifacts.cutoff, settings.ranker_build)
    second = replay_requests(dataset, artifacts.cutoff, settings.ranker_build)
    assert [(r.user_id, r.context.timestamp, r.labels) for r in first] == [
        (r.user_id, r.context.timestamp, r.labels) for r in second
    ]


def test_manifest_records_parameters_and_importance(artifacts: BuiltArtifacts) -> None:
    params = artifacts.ranker.params
    assert params["lightgbm"]["objective"] == "lambdarank"
    assert params["cutoff"] == artifacts.cutoff
    assert len(params["feature_importance_gain"]) >= 30
    assert sum(params["feature_importance_gain"].values()) > 0
