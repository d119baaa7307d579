"""The LambdaMART ranker: time-split replay and its lift over retrieval order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ranking_service.artifact import load_ranker_artifact
from ranking_service.store import co_interactions
from ranking_service.training import label_mask, replay_requests, validation_groups
from shared.cli import main
from shared.config import VitrineSettings
from shared.data import Dataset
from shared.interactions import ranker_label_mask
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
    requests = replay_requests(
        dataset, label_mask(dataset, settings.ranker_build, artifacts.cutoff), settings.ranker_build
    )
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
    first = replay_requests(
        dataset, label_mask(dataset, settings.ranker_build, artifacts.cutoff), settings.ranker_build
    )
    second = replay_requests(
        dataset, label_mask(dataset, settings.ranker_build, artifacts.cutoff), settings.ranker_build
    )
    assert [(r.user_id, r.context.timestamp, r.labels) for r in first] == [
        (r.user_id, r.context.timestamp, r.labels) for r in second
    ]


def test_manifest_records_parameters_and_importance(artifacts: BuiltArtifacts) -> None:
    params = artifacts.ranker.params
    assert params["lightgbm"]["objective"] == "lambdarank"
    assert params["cutoff"] == artifacts.cutoff
    assert len(params["feature_importance_gain"]) >= 30
    assert sum(params["feature_importance_gain"].values()) > 0


def test_per_user_label_split_keeps_each_users_newest_events(dataset: Dataset) -> None:
    events = dataset.events
    mask = ranker_label_mask(events, "per_user", 0.25)
    for user in np.unique(events.user_index)[:50]:
        mine = events.user_index == user
        n = int(mine.sum())
        labels = mask[mine]
        expected = 0 if n < 2 else int(np.clip(np.rint(0.25 * n), 1, n - 1))
        assert int(labels.sum()) == expected
        if expected:  # every label is at least as new as every history event of the user
            assert events.timestamp[mine][labels].min() >= events.timestamp[mine][~labels].max()


def test_global_label_split_is_one_cutoff(dataset: Dataset) -> None:
    mask = ranker_label_mask(dataset.events, "global", 0.2)
    cutoff = dataset.events.time_at(0.8)
    assert np.array_equal(mask, dataset.events.timestamp >= cutoff)
    with pytest.raises(ValueError, match="unknown label split"):
        ranker_label_mask(dataset.events, "sideways", 0.2)


def test_random_label_split_draws_the_same_number_of_events_anywhere_in_time(dataset: Dataset) -> None:
    events = dataset.events
    newest = ranker_label_mask(events, "per_user", 0.25)
    drawn = ranker_label_mask(events, "random", 0.25, seed=3)
    assert np.array_equal(np.bincount(events.user_index[drawn]), np.bincount(events.user_index[newest]))
    assert not np.array_equal(drawn, newest)
    assert np.array_equal(drawn, ranker_label_mask(events, "random", 0.25, seed=3))  # reproducible


def test_random_label_split_replays_one_request_after_everything(dataset: Dataset, settings: VitrineSettings) -> None:
    build = settings.ranker_build.model_copy(update={"label_split": "random"})
    mask = label_mask(dataset, build)
    requests = replay_requests(dataset, mask, build)
    events = dataset.events
    assert len({request.user_id for request in requests}) == len(requests)
    assert all(request.context.timestamp > events.timestamp.max() for request in requests)
    first = requests[0]
    user_row = int(np.flatnonzero(dataset.users.user_ids == first.user_id)[0])
    assert set(first.labels) == set(events.item_index[mask & (events.user_index == user_row)].tolist())


def test_ranker_artifact_stores_the_co_interactions_of_its_snapshot(
    dataset: Dataset, artifacts: BuiltArtifacts, settings: VitrineSettings
) -> None:
    loaded = load_ranker_artifact(artifacts.root)
    expected = co_interactions(dataset.events.before(loaded.snapshot_at), len(dataset.catalog), settings.ranker_build)
    stored = loaded.stats.co_interactions
    assert stored.nnz == expected.nnz > 0
    assert abs(stored - expected).max() == 0


def test_random_label_draws_differ_but_label_as_many_events_per_user(dataset: Dataset) -> None:
    events = dataset.events
    draws = [ranker_label_mask(events, "random", 0.25, seed=3, draw=draw) for draw in range(3)]
    assert np.array_equal(draws[0], ranker_label_mask(events, "random", 0.25, seed=3))  # draw 0 is the old split
    assert np.array_equal(draws[1], ranker_label_mask(events, "random", 0.25, seed=4))  # draw i: seed + i
    for drawn in draws[1:]:
        assert not np.array_equal(drawn, draws[0])
        assert np.array_equal(np.bincount(events.user_index[drawn]), np.bincount(events.user_index[draws[0]]))
    with pytest.raises(ValueError, match="only the random split has several draws"):
        ranker_label_mask(events, "global", 0.25, draw=1)


def test_only_the_random_split_has_several_draws(settings: VitrineSettings) -> None:
    build = settings.ranker_build.model_copy(update={"label_split": "random", "label_draws": 3})
    assert build.label_draw_count() == 3
    assert build.label_draw_count(cutoff=1_000) == 1  # an explicit cutoff fixes the labels
    assert build.model_copy(update={"label_split": "global"}).label_draw_count() == 1


def test_early_stopping_validates_on_whole_users() -> None:
    user_ids = [f"u{n % 40}" for n in range(120)]  # three draws of 40 users
    is_valid = validation_groups(user_ids, seed=7)
    valid_users = {user for user, valid in zip(user_ids, is_valid, strict=True) if valid}
    train_users = {user for user, valid in zip(user_ids, is_valid, strict=True) if not valid}
    assert valid_users
    assert train_users
    assert not valid_users & train_users
    assert np.array_equal(is_valid, validation_groups(user_ids, seed=7))
    # Tiny data still leaves a request on each side.
    assert validation_groups(["a", "a", "b"], seed=7).any()
    assert not validation_groups(["a", "a", "b"], seed=7).all()


def test_training_commands_refuse_a_draw_the_split_does_not_have(tmp_path: Path) -> None:
    """Refused before any data is read."""
    dataset_dir = tmp_path / "not-read"
    with pytest.raises(SystemExit, match="--label-draw 1 is out of range"):
        main(["build-index", "--data", str(dataset_dir), "--out", str(tmp_path), "--without-ranker-labels",
              "--label-split", "global", "--label-draw", "1"])  # fmt: skip
    with pytest.raises(SystemExit, match="give --retrieval once per draw, got 1"):
        main(["train-ranker", "--data", str(dataset_dir), "--out", str(tmp_path), "--label-split", "random",
              "--retrieval", "127.0.0.1:1"])  # fmt: skip
