"""The LambdaMART ranker: time-split replay and its lift over retrieval order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from ranking_service.artifact import load_ranker_artifact, served_popular_candidates, served_popularity
from ranking_service.candidates import (
    PARTIAL_POPULAR_UNAVAILABLE,
    CandidateRequest,
    CandidateStage,
    joined_candidates,
    kept_candidates,
)
from ranking_service.features import FEATURE_INDEX, FEATURE_NAMES, CandidateSet, RequestContext
from ranking_service.ragged import Ragged
from ranking_service.retrieval_client import NO_OPTIONS, RetrievalClient, RetrievalOptions, RetrievedCandidates
from ranking_service.scoring import RankerModel, in_retrieval_order
from ranking_service.store import co_interactions
from ranking_service.training import (
    RankingData,
    compare_on_holdout,
    gate_cold_start,
    label_mask,
    replay_requests,
    validation_groups,
)
from retrieval_service.artifact import load_index_artifact
from shared.cli import main
from shared.config import ALL_TIME_POPULARITY, RankerBuildSettings, VitrineSettings
from shared.data import Dataset
from shared.errors import Unavailable
from shared.interactions import ranker_label_mask
from shared.proto.vitrine.v1 import catalog_pb2
from tests.conftest import BuiltArtifacts, Servers, users_by_activity

# Asserted floor for the ranker's NDCG@10 lift over retrieval order on held-out users.
MIN_NDCG_LIFT = 0.05


def test_ranker_beats_retrieval_order_on_held_out_users(artifacts: BuiltArtifacts) -> None:
    metrics = artifacts.ranker.metrics
    ranker = metrics["holdout_ndcg@10_ranker"]
    retrieval = metrics["holdout_ndcg@10_retrieval_order"]
    assert metrics["holdout_requests"] >= 50
    assert ranker > retrieval * (1 + MIN_NDCG_LIFT), f"ranker NDCG@10 {ranker} vs retrieval order {retrieval}"
    # What the trees add to the prior they start from is reported beside it.
    assert 0.0 < metrics["holdout_ndcg@10_prior_alone"] < 1.0
    assert "holdout_ndcg@10_prior_alone" not in compare_on_holdout(_popularity_ranker(), _holdout(1, 1, 0, True))


def _popularity_ranker() -> RankerModel:
    """A real LightGBM ranker that learned "higher item_log_popularity, more relevant"."""
    rng = np.random.default_rng(0)
    values = rng.random((400, len(FEATURE_NAMES))).astype(np.float32)
    labels = (values[:, FEATURE_INDEX["item_log_popularity"]] > 0.5).astype(np.int32)
    params = {"objective": "lambdarank", "verbose": -1, "min_data_in_leaf": 5}
    return RankerModel(lgb.train(params, lgb.Dataset(values, labels, group=[10] * 40), num_boost_round=10))


def _holdout(cold: int, warm: int, relevant_at: int, relevant_is_popular: bool) -> RankingData:
    """Requests of 10 candidates in retrieval order, the relevant one at ``relevant_at``;
    it is the one popular candidate or the one unpopular. Cold requests have no history
    and no session."""
    data = RankingData.empty()
    popularity = FEATURE_INDEX["item_log_popularity"]
    for request in range(cold + warm):
        values = np.zeros((10, len(FEATURE_NAMES)), np.float32)
        values[:, popularity] = 0.1 if relevant_is_popular else 0.9
        values[relevant_at, popularity] = 0.9 if relevant_is_popular else 0.1
        values[:, FEATURE_INDEX["user_log_events"]] = 0.0 if request < cold else 2.0
        data.features.append(values)
        data.labels.append(np.eye(10, dtype=np.int32)[relevant_at])
        data.all_labels.append(np.ones(1, np.int32))
        data.user_ids.append(f"u{request}")
    data.requests = data.with_relevant_candidate = cold + warm
    return data


def test_the_cold_start_gate_keeps_retrieval_order_where_the_holdout_says_so() -> None:
    ranker = _popularity_ranker()
    settings = RankerBuildSettings(cold_start_min_holdout_requests=20)
    # The ranker pushes the relevant first candidate down: on 25 cold requests that is
    # evidence against it, so cold requests keep retrieval's order, warm ones do not.
    losing = _holdout(cold=25, warm=5, relevant_at=0, relevant_is_popular=False)
    gated, figures = gate_cold_start(ranker, losing, settings)
    assert not gated.ranks_cold_start
    assert figures["ranks_cold_start"] is False
    assert figures["holdout_cold_start_requests"] == 25
    assert figures["holdout_cold_start_ndcg@10_retrieval_order"] == 1.0
    assert figures["holdout_cold_start_ndcg@10_ranker"] < 0.5
    served = compare_on_holdout(gated, losing)["holdout_ndcg@10_ranker"]
    assert compare_on_holdout(ranker, losing)["holdout_ndcg@10_ranker"] < served < 1.0
    assert served == pytest.approx((25 * 1.0 + 5 * figures["holdout_cold_start_ndcg@10_ranker"]) / 30, abs=1e-3)
    # Evidence for the ranker opens the gate; too few cold requests is no evidence; and
    # the gate can be switched off.
    winning = _holdout(cold=25, warm=0, relevant_at=9, relevant_is_popular=True)
    assert gate_cold_start(ranker, winning, settings)[0].ranks_cold_start
    few = _holdout(cold=10, warm=5, relevant_at=9, relevant_is_popular=True)
    assert not gate_cold_start(ranker, few, settings)[0].ranks_cold_start
    assert gate_cold_start(ranker, losing, RankerBuildSettings(cold_start_gate=False))[0].ranks_cold_start


def test_scores_in_retrieval_order_keep_the_rankers_scale() -> None:
    scores = np.asarray([0.2, 0.9, -0.1, 0.5], np.float32)
    assert in_retrieval_order(scores).tolist() == pytest.approx([0.9, 0.5, 0.2, -0.1])


def test_the_session_ranker_records_its_gate(artifacts: BuiltArtifacts) -> None:
    metrics, params = artifacts.ranker.metrics, artifacts.ranker.params
    assert params["ranks_cold_start"] == metrics["ranks_cold_start"]
    assert metrics["holdout_cold_start_requests"] >= 0
    loaded = load_ranker_artifact(artifacts.root)
    assert loaded.model.ranks_cold_start == params["ranks_cold_start"]


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


def test_replay_never_labels_an_item_created_after_the_request(
    dataset: Dataset, artifacts: BuiltArtifacts, settings: VitrineSettings
) -> None:
    mask = label_mask(dataset, settings.ranker_build, artifacts.cutoff)
    before = replay_requests(dataset, mask, settings.ranker_build)
    request = next(r for r in before if len(r.labels) >= 2)
    launched, kept = sorted(request.labels)[:2]
    created_at = dataset.catalog.created_at.copy()
    created_at[launched] = request.context.timestamp + 1
    relaunched = replace(dataset, catalog=replace(dataset.catalog, created_at=created_at))
    after = {r.user_id: r for r in replay_requests(relaunched, mask, settings.ranker_build)}[request.user_id]
    assert after.context.timestamp == request.context.timestamp
    assert launched not in after.labels
    assert after.labels[kept] == request.labels[kept]


def test_the_ranker_counts_popular_items_as_the_index_it_serves_with(artifacts: BuiltArtifacts) -> None:
    """The popular-items fallback (retrieval down) and the brand backfill answer what
    retrieval's popular source answers: on a time task, popularity decays in both."""
    index = load_index_artifact(artifacts.root)
    ranker = load_ranker_artifact(artifacts.root)
    recorded = served_popularity(artifacts.ranker.params)
    assert recorded == index.build.popularity
    assert recorded.half_life_days is not None
    ranker_order = ranker.items.item_ids[ranker.stats.popular_rows].tolist()
    assert ranker_order == index.item_ids[index.popular_rows].tolist()
    all_time = ranker.items.item_ids[np.argsort(-np.exp(ranker.stats.log_popularity), kind="stable")].tolist()
    assert ranker_order[:20] != all_time[:20]
    # Artifacts from before the record counted all time.
    assert served_popularity({}) == ALL_TIME_POPULARITY


def test_kept_candidates_cuts_every_per_candidate_field_alike() -> None:
    candidates = CandidateSet(
        rows=np.asarray([4, 7, 9], np.int32),
        retrieval_scores=np.asarray([0.9, 0.5, 0.1], np.float32),
        content_scores=np.asarray([0.3, 0.2, 0.1], np.float32),
        collaborative_scores=np.asarray([0.6, 0.3, 0.0], np.float32),
        from_popular=False,
        sources=(("fused",), ("item_model", "fused"), ("popular",)),
        source_scores=((0.9,), (0.4, 0.5), (0.1,)),
        anchor_rows=(np.asarray([1], np.int32), np.asarray([2, 3], np.int32), np.zeros(0, np.int32)),
        stock=np.asarray([5, 0, 2], np.int64),
    )
    kept = kept_candidates(candidates, np.asarray([True, False, True]))
    assert kept.rows.tolist() == [4, 9]
    assert kept.retrieval_scores.tolist() == pytest.approx([0.9, 0.1])
    assert kept.content_scores.tolist() == pytest.approx([0.3, 0.1])
    assert kept.collaborative_scores.tolist() == pytest.approx([0.6, 0.0])
    assert list(kept.sources) == [("fused",), ("popular",)]
    assert list(kept.source_scores) == [(0.9,), (0.1,)]
    assert [anchors.tolist() for anchors in kept.anchor_rows] == [[1], []]
    assert kept.stock is not None
    assert kept.stock.tolist() == [5, 2]
    assert kept_candidates(candidates, np.ones(3, dtype=bool)) is candidates


def test_next_event_rankers_learn_and_serve_popular_candidates(artifacts: BuiltArtifacts) -> None:
    """The build records the task's popular candidates; the service adds what it records."""
    assert RankerBuildSettings().for_label_split("random").popular_candidates == 0
    assert RankerBuildSettings(popular_candidates=20).for_label_split("per_user").popular_candidates == 20
    recorded = served_popular_candidates(artifacts.ranker.params)  # the session's build: global split
    assert recorded == RankerBuildSettings().popular_candidates > 0
    assert load_ranker_artifact(artifacts.root).popular_candidates == recorded
    # Artifacts from before the setting trained without them.
    assert served_popular_candidates({"ranker_build": {"candidates": 300}}) == 0


def test_popular_candidates_join_what_retrieval_did_not_propose(
    artifacts: BuiltArtifacts, servers: Servers, settings: VitrineSettings, dataset: Dataset
) -> None:
    """They come from retrieval (a popular-only mix with the user's query), so deletions,
    live stock and shards hold for them, and they carry the query's scores."""
    ranker = load_ranker_artifact(artifacts.root)
    items, popular = ranker.items, ranker.stats.popular_rows
    user = users_by_activity(dataset)[0]
    history = ranker.histories.history(user, before=ranker.snapshot_at)
    context = RequestContext(timestamp=ranker.snapshot_at, device="", session_rows=np.zeros(0, np.int32))
    excluded = popular[:3].astype(np.int32)
    serving = settings.ranking.model_copy(update={"candidates": 20})
    client = RetrievalClient(f"127.0.0.1:{servers.retrieval_server.port}")
    try:

        def stage(extra: int) -> CandidateStage:
            return CandidateStage(items, ranker.item_row, popular, client, serving, popular_candidates=extra)

        plain = stage(0).retrieve(user, history, context, excluded, 10.0).candidates
        mixed = stage(30).retrieve(user, history, context, excluded, 10.0).candidates
        wanted = popular[~np.isin(popular, np.union1d(excluded, history.purchased_rows()))][:30]
        added = mixed.rows[len(plain.rows) :]
        assert mixed.rows[: len(plain.rows)].tolist() == plain.rows.tolist()
        assert len(added) > 0
        assert set(added.tolist()) == set(wanted.tolist()) - set(plain.rows.tolist())
        assert list(mixed.sources)[len(plain.rows) :] == [("popular",)] * len(added)
        assert len(mixed.source_scores) == len(mixed.rows) == len(mixed.anchor_rows)
        assert mixed.retrieval_scores[len(plain.rows) :].any()  # scored by the user's query
        # A filter holds for them too.
        category = str(items.categories[added[0]])
        only = CandidateRequest(item_filter=catalog_pb2.ItemFilter(categories=[category]))
        filtered = stage(30).retrieve(user, history, context, excluded, 10.0, only).candidates
        assert set(items.categories[filtered.rows].tolist()) == {category}
        # Newcomers get popular items (or their declared preferences) from retrieval itself.
        empty = ranker.histories.history("nobody", before=ranker.snapshot_at)
        cold = stage(30).retrieve("nobody", empty, context, excluded, 10.0).candidates
        assert len(cold.rows) == len(stage(0).retrieve("nobody", empty, context, excluded, 10.0).candidates.rows)
    finally:
        client.close()


def test_joined_candidates_keep_every_per_candidate_field_aligned() -> None:
    candidates = CandidateSet(
        rows=np.asarray([4, 7], np.int32),
        retrieval_scores=np.asarray([0.9, 0.5], np.float32),
        content_scores=np.asarray([0.3, 0.2], np.float32),
        collaborative_scores=np.asarray([0.6, 0.3], np.float32),
        from_popular=False,
        sources=(("covisitation",), ("item_model", "fused")),
        source_scores=((3.0,), (0.4, 0.5)),
        anchor_rows=(np.asarray([1], np.int32), np.asarray([2, 3], np.int32)),
        stock=np.asarray([5, 0], np.int64),
    )
    curated = CandidateSet(
        rows=np.asarray([7, 9, 2], np.int32),
        retrieval_scores=np.asarray([0.5, 0.2, 0.1], np.float32),
        content_scores=np.zeros(3, np.float32),
        collaborative_scores=np.zeros(3, np.float32),
        from_popular=True,
        sources=(("popular",), ("popular",), ("pin",)),
        stock=np.asarray([0, 90, 20], np.int64),
    )
    joined = joined_candidates(candidates, curated)
    assert joined.rows.tolist() == [4, 7, 9, 2]  # 7 once
    assert joined.retrieval_scores.tolist() == pytest.approx([0.9, 0.5, 0.2, 0.1])
    assert not joined.from_popular
    assert list(joined.sources) == [("covisitation",), ("item_model", "fused"), ("popular",), ("pin",)]
    # Before, pins left the scores unpadded and every candidate lost its source-score features.
    assert list(joined.source_scores) == [(3.0,), (0.4, 0.5), (), ()]
    assert [anchors.tolist() for anchors in joined.anchor_rows] == [[1], [2, 3], [], []]
    assert joined.stock is not None
    assert joined.stock.tolist() == [5, 0, 90, 20]
    assert joined_candidates(candidates, kept_candidates(curated, np.asarray([True, False, False]))) is candidates
    # A columnar answer stays flat, so features read it without a loop over candidates.
    columnar = replace(
        candidates,
        sources=Ragged.from_counts(["covisitation", "item_model", "fused"], [1, 2]),
        source_scores=Ragged.from_counts([3.0, 0.4, 0.5], [1, 2]),
    )
    flat = joined_candidates(columnar, curated)
    assert isinstance(flat.sources, Ragged)
    assert isinstance(flat.source_scores, Ragged)
    assert list(flat.sources) == list(joined.sources)
    assert list(flat.source_scores) == list(joined.source_scores)


class PopularFailingClient(RetrievalClient):
    """The real client, failing every popular-only request (the popular candidates' call)."""

    def by_history(
        self,
        item_ids: Sequence[str],
        weights: Sequence[float],
        n: int,
        exclude: Sequence[str],
        timeout_s: float,
        options: RetrievalOptions = NO_OPTIONS,
    ) -> RetrievedCandidates:
        if list(options.mix) == [("popular", 1.0)]:
            raise Unavailable("retrieval timed out (test)")
        return super().by_history(item_ids, weights, n, exclude, timeout_s, options)


def test_a_failed_popular_call_leaves_retrievals_answer_flagged_partial(
    artifacts: BuiltArtifacts, servers: Servers, settings: VitrineSettings, dataset: Dataset
) -> None:
    ranker = load_ranker_artifact(artifacts.root)
    user = users_by_activity(dataset)[0]
    history = ranker.histories.history(user, before=ranker.snapshot_at)
    context = RequestContext(timestamp=ranker.snapshot_at, device="", session_rows=np.zeros(0, np.int32))
    nothing = np.zeros(0, np.int32)
    client = PopularFailingClient(f"127.0.0.1:{servers.retrieval_server.port}")
    try:
        for fallback in (True, False):
            serving = settings.ranking.model_copy(update={"candidates": 20, "fallback_to_popular": fallback})
            stage = CandidateStage(
                ranker.items, ranker.item_row, ranker.stats.popular_rows, client, serving, popular_candidates=30
            )
            if not fallback:  # training: no silent gaps
                with pytest.raises(Unavailable, match="timed out"):
                    stage.retrieve(user, history, context, nothing, 10.0)
                continue
            answer = stage.retrieve(user, history, context, nothing, 10.0)
            assert answer.partial_reason == PARTIAL_POPULAR_UNAVAILABLE
            assert not answer.degraded_reason
            assert len(answer.candidates.rows) == 20
    finally:
        client.close()
