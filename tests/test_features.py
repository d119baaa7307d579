"""Ranking features: shape, meaning, and no leakage from the future."""

from __future__ import annotations

import numpy as np
import pytest

from ranking_service.features import FEATURE_INDEX, FEATURE_NAMES, CandidateSet, FeatureBuilder, RequestContext
from ranking_service.store import UserHistoryStore, co_interactions, item_stats, item_table
from ranking_service.training import label_mask, replay_requests
from shared.config import RankerBuildSettings, VitrineSettings
from shared.data import Dataset, Events
from tests.conftest import BuiltArtifacts
from tests.fakes import HashingEmbedder


def _builder(dataset: Dataset, embedder: HashingEmbedder, as_of: int, events_upto: int | None = None) -> FeatureBuilder:
    events = dataset.events if events_upto is None else dataset.events.before(events_upto)
    items = item_table(dataset, embedder.encode(dataset.catalog.embedding_texts()))
    return FeatureBuilder(items, item_stats(events, len(items), as_of, RankerBuildSettings()))


def _candidates(rows: np.ndarray, from_popular: bool) -> CandidateSet:
    ones = np.ones(len(rows), np.float32)
    return CandidateSet(rows, ones, 0.5 * ones, 0.5 * ones, from_popular)


def test_at_least_thirty_named_features() -> None:
    assert len(FEATURE_NAMES) >= 30
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)


def test_features_are_computed_as_of_the_request_time(
    dataset: Dataset, embedder: HashingEmbedder, artifacts: BuiltArtifacts, settings: VitrineSettings
) -> None:
    """Features from the full event log equal features from a log cut at the request: no leakage."""
    requests = replay_requests(
        dataset, label_mask(dataset, settings.ranker_build, artifacts.cutoff), settings.ranker_build
    )[:40]
    full_store = UserHistoryStore(dataset.events, dataset.users.user_ids)
    with_future = _builder(dataset, embedder, artifacts.cutoff)
    without_future = _builder(dataset, embedder, artifacts.cutoff, events_upto=artifacts.cutoff)
    rng = np.random.default_rng(0)
    for request in requests:
        moment = request.context.timestamp
        past_store = UserHistoryStore(dataset.events.before(moment), dataset.users.user_ids)
        candidates = CandidateSet(
            rows=rng.choice(len(dataset.catalog), 50, replace=False).astype(np.int32),
            retrieval_scores=np.linspace(1, 0, 50, dtype=np.float32),
            content_scores=np.linspace(0.5, 0, 50, dtype=np.float32),
            collaborative_scores=np.linspace(0.5, 0, 50, dtype=np.float32),
            from_popular=False,
        )
        seen_then = with_future.build(full_store.history(request.user_id, before=moment), request.context, candidates)
        truly_past = without_future.build(past_store.history(request.user_id), request.context, candidates)
        np.testing.assert_array_equal(seen_then.values, truly_past.values)
        assert np.all(full_store.history(request.user_id, before=moment).timestamps < moment)


def test_affinity_and_repeat_features_reflect_history(dataset: Dataset, embedder: HashingEmbedder) -> None:
    store = UserHistoryStore(dataset.events, dataset.users.user_ids)
    user = str(dataset.users.user_ids[np.bincount(dataset.events.user_index).argmax()])
    history = store.history(user)
    builder = _builder(dataset, embedder, int(dataset.events.timestamp.max()) + 1)
    seen = history.item_rows[:5]
    unseen = np.setdiff1d(np.arange(len(dataset.catalog)), history.item_rows)[:5].astype(np.int32)
    rows = np.concatenate([seen, unseen]).astype(np.int32)
    context = RequestContext(timestamp=int(dataset.events.timestamp.max()) + 1, device="ios", session_rows=seen[:2])
    matrix = builder.build(history, context, _candidates(rows, from_popular=False))
    values = matrix.values
    assert values.shape == (10, len(FEATURE_NAMES))
    assert np.all(values[:5, FEATURE_INDEX["user_item_interactions"]] >= 1)
    assert np.all(values[5:, FEATURE_INDEX["user_item_interactions"]] == 0)
    assert np.all(values[5:, FEATURE_INDEX["user_item_days_since"]] == 365.0)
    assert values[0, FEATURE_INDEX["session_length"]] == 2
    assert values[0, FEATURE_INDEX["device"]] == 1
    # A history item is most similar to itself.
    np.testing.assert_allclose(values[:2, FEATURE_INDEX["content_sim_recent_max"]], 1.0, atol=1e-2)
    assert np.all(matrix.closest_history_row[:2] == seen[:2])


def test_empty_history_gives_neutral_user_features(dataset: Dataset, embedder: HashingEmbedder) -> None:
    builder = _builder(dataset, embedder, int(dataset.events.timestamp.max()) + 1)
    store = UserHistoryStore(dataset.events, dataset.users.user_ids)
    rows = np.arange(10, dtype=np.int32)
    context = RequestContext(
        timestamp=int(dataset.events.timestamp.max()), device="", session_rows=np.zeros(0, np.int32)
    )
    values = builder.build(store.history("nobody"), context, _candidates(rows, from_popular=True)).values
    assert np.all(values[:, FEATURE_INDEX["user_log_events"]] == 0)
    assert np.all(values[:, FEATURE_INDEX["user_category_affinity"]] == 0)
    assert np.all(values[:, FEATURE_INDEX["retrieval_from_popular"]] == 1)
    assert np.all(np.isfinite(values))


def _events(rows: list[tuple[int, int, int]]) -> Events:
    """(user, item, timestamp) triples as view events."""
    users, items, times = (np.asarray(column) for column in zip(*rows, strict=True))
    n = len(rows)
    return Events(
        user_index=users.astype(np.int32),
        item_index=items.astype(np.int32),
        event_code=np.zeros(n, np.int8),
        timestamp=times.astype(np.int64),
        device=np.full(n, "web"),
        session_id=np.full(n, "s"),
    )


def test_co_interactions_are_shrunk_cosines_of_shared_users() -> None:
    # Items 0 (touched by users 0, 1, 2), 1 (users 0, 1), 2 (user 2); user 1 touches item 1 twice.
    events = _events([(0, 0, 1), (0, 1, 2), (1, 0, 3), (1, 1, 4), (1, 1, 5), (2, 0, 6), (2, 2, 7)])
    similarity = co_interactions(events, 4, RankerBuildSettings(co_interaction_shrink=0.0)).toarray()
    assert similarity[0, 1] == pytest.approx(2 / np.sqrt(3 * 2))
    assert similarity[0, 2] == pytest.approx(1 / np.sqrt(3 * 1))
    assert similarity[1, 2] == 0.0
    assert np.all(np.diag(similarity) == 0)
    assert np.all(similarity[3] == 0)  # never touched
    np.testing.assert_allclose(similarity, similarity.T, rtol=1e-6)
    # Shrinkage lowers rare pairs more; each item keeps only its best neighbours.
    shrunk = co_interactions(events, 4, RankerBuildSettings(co_interaction_shrink=1.0)).toarray()
    assert shrunk[0, 1] == pytest.approx(2 / (np.sqrt(6) + 1))
    top_one = co_interactions(events, 4, RankerBuildSettings(co_interaction_neighbours=1)).toarray()
    assert np.count_nonzero(top_one[0]) == 1
    assert top_one[0].argmax() == 1


def test_co_interactions_count_only_each_users_newest_items() -> None:
    # User 0 touched items 0, 1, 2 in that order; with a history of 2, item 0 is forgotten.
    events = _events([(0, 0, 1), (0, 1, 2), (0, 2, 3)])
    similarity = co_interactions(events, 3, RankerBuildSettings(co_interaction_history=2)).toarray()
    assert similarity[1, 2] > 0
    assert similarity[0, 1] == 0.0
    assert similarity[0, 2] == 0.0
