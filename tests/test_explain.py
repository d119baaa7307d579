"""Explanations: anchor items from the user's own history, top LightGBM contributions in words."""

from __future__ import annotations

import time
from collections.abc import Sequence

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import pytest

from ranking_service.artifact import load_ranker_artifact
from ranking_service.explain import FEATURE_TEXT, Explanation, anchor_rows, explanations
from ranking_service.features import FEATURE_INDEX, FEATURE_NAMES, CandidateSet, FeatureMatrix
from ranking_service.pipeline import RankingPipeline, RecommendQuery
from ranking_service.retrieval_client import RetrievalClient, RetrievedCandidates
from ranking_service.scoring import RankerModel, ScorePrior
from ranking_service.store import ItemStats
from shared.config import RankingSettings, RulesOverrides
from shared.data import Dataset
from shared.proto.vitrine.v1 import ranking_pb2, retrieval_pb2
from tests.conftest import BuiltArtifacts, Servers, users_by_activity
from tests.ranking_helpers import now, recommend, tiny_item_table


def _history_and_session(dataset: Dataset, user: str, session: list[str]) -> set[str]:
    user_row = int(np.flatnonzero(dataset.users.user_ids == user)[0])
    mine = dataset.events.user_index == user_row
    return set(dataset.catalog.item_ids[dataset.events.item_index[mine]].tolist()) | set(session)


def test_explanations_name_items_from_the_users_history(servers: Servers, dataset: Dataset) -> None:
    users = users_by_activity(dataset)[10:40]
    session = dataset.catalog.item_ids[dataset.catalog.stock > 0][100:102].tolist()
    with_anchor = total = 0
    for number, user in enumerate(users):
        context = ranking_pb2.RequestContext(
            timestamp=now(dataset), session_item_ids=session if number % 2 else [], device=ranking_pb2.DEVICE_WEB
        )
        response = recommend(servers.ranking, dataset, user, 10, context=context, explain=True)
        allowed = _history_and_session(dataset, user, list(context.session_item_ids))
        assert len(response.items) == 10
        for item in response.items:
            assert item.HasField("explanation")
            anchors = list(item.explanation.anchor_item_ids)
            assert set(anchors) <= allowed, (user, item.item_id, anchors)
            assert item.item_id not in anchors
            with_anchor += bool(anchors)
            total += 1
            contributions = item.explanation.contributions
            assert 1 <= len(contributions) <= 3
            assert {c.feature for c in contributions} <= set(FEATURE_NAMES)
            sizes = [abs(c.contribution) for c in contributions]
            assert sizes == sorted(sizes, reverse=True)
            assert all(c.text and "{" not in c.text for c in contributions)
            assert item.reason
    print(f"\nitems with at least one anchor from the user's history or session: {with_anchor}/{total}")
    assert with_anchor >= 0.8 * total


def test_no_explanation_unless_asked(servers: Servers, dataset: Dataset) -> None:
    user = users_by_activity(dataset)[2]
    plain = recommend(servers.ranking, dataset, user, 10)
    assert not any(item.HasField("explanation") for item in plain.items)
    assert all(item.reason for item in plain.items)
    explained = recommend(servers.ranking, dataset, user, 10, explain=True)
    assert [i.item_id for i in explained.items] == [i.item_id for i in plain.items]
    assert [i.reason for i in explained.items] == [i.reason for i in plain.items]


def test_cold_start_explanations_have_no_anchors(servers: Servers, dataset: Dataset) -> None:
    response = recommend(servers.ranking, dataset, "never-seen-user", 5, explain=True)
    assert response.cold_start
    for item in response.items:
        assert not item.explanation.anchor_item_ids
        assert item.explanation.contributions


# -- on hand-made arrays -----------------------------------------------------------------------


def _stats(n: int = 6) -> ItemStats:
    import scipy.sparse as sp

    co = sp.lil_matrix((n, n), dtype=np.float32)
    co[4, 1] = co[1, 4] = 0.5  # item 4 (history) is often chosen with candidate 1
    zeros = np.zeros(n, np.float32)
    return ItemStats(0, zeros, zeros, zeros, zeros, zeros, np.arange(n, dtype=np.int32), sp.csr_matrix(co))


def _two_candidates(anchor_rows: Sequence[npt.NDArray[np.int32]] = ()) -> CandidateSet:
    """Candidates 0 and 1 from retrieval, with ``anchor_rows`` when given."""
    return CandidateSet(
        rows=np.asarray([0, 1], np.int32),
        retrieval_scores=np.ones(2, np.float32),
        content_scores=np.zeros(2, np.float32),
        collaborative_scores=np.zeros(2, np.float32),
        from_popular=False,
        anchor_rows=anchor_rows,
    )


def _explain_first_two(model: RankerModel, values: npt.NDArray[np.float32]) -> list[Explanation]:
    """Explanations of the first two rows of ``values`` as the candidates 0 and 1."""
    candidates = _two_candidates()
    features = FeatureMatrix(values[:2], np.full(2, -1, np.int32), np.zeros(2, np.int8))
    return explanations(
        model, features, np.asarray([0, 1]), candidates, np.zeros(0, np.int32), tiny_item_table(), _stats()
    )


def test_contributions_are_the_largest_pred_contrib_in_words() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(size=(400, len(FEATURE_NAMES))).astype(np.float32)
    brand = FEATURE_INDEX["user_brand_affinity"]
    labels = (values[:, brand] > 0).astype(int)
    booster = lgb.train(
        {"objective": "binary", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5},
        lgb.Dataset(values, labels),
        num_boost_round=20,
    )
    result = _explain_first_two(RankerModel(booster), values)
    full = np.asarray(booster.predict(values[:2], pred_contrib=True))
    for line, explanation in enumerate(result):
        top = explanation.contributions[0]
        assert top.feature == "user_brand_affinity"
        assert top.contribution == pytest.approx(full[line, brand])
        up, down = FEATURE_TEXT["user_brand_affinity"]
        assert top.text == (up if top.contribution > 0 else down).format(brand="Acme")


def test_the_prior_counts_in_its_features_contribution() -> None:
    """With a prior, contributions still add up to the score: the prior is its feature's."""
    rng = np.random.default_rng(5)
    values = rng.normal(size=(200, len(FEATURE_NAMES))).astype(np.float32)
    booster = lgb.train(
        {"objective": "regression", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5},
        lgb.Dataset(values, values[:, FEATURE_INDEX["user_brand_affinity"]]),
        num_boost_round=10,
    )
    model = RankerModel(booster, ScorePrior("item_model_relative", 50.0))
    result = _explain_first_two(model, values)
    trees = np.asarray(booster.predict(values[:2], pred_contrib=True))
    column = FEATURE_INDEX["item_model_relative"]
    for line, explanation in enumerate(result):
        named = {c.feature: c.contribution for c in explanation.contributions}
        expected = trees[line, column] + 50.0 * values[line, column]
        assert named["item_model_relative"] == pytest.approx(expected)
        assert explanation.contributions[0].feature == "item_model_relative"  # the largest by far


def test_anchors_from_retrieval_else_closest_by_content_and_co_interaction() -> None:
    user_rows = np.asarray([3, 4], np.int32)
    # Retrieval's anchors for candidate 0: item 5 is not the user's, so it is dropped.
    candidates = _two_candidates((np.asarray([5, 4], np.int32), np.zeros(0, np.int32)))
    features = FeatureMatrix(
        np.zeros((2, len(FEATURE_NAMES)), np.float32), np.asarray([3, 3], np.int32), np.zeros(2, np.int8)
    )
    together = np.asarray(_stats().co_interactions[user_rows][:, candidates.rows].toarray())
    assert anchor_rows(0, candidates, features, user_rows, together[:, 0]) == (4,)
    # No retrieval anchors: the closest by content (3), then by co-interaction (4).
    assert anchor_rows(1, candidates, features, user_rows, together[:, 1]) == (3, 4)


class AnchorRecordingClient(RetrievalClient):
    """The real client, noting whether each RetrieveRequest it sends asks for anchors."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.asked_for_anchors: list[bool] = []

    def _call(self, request: retrieval_pb2.RetrieveRequest, timeout_s: float) -> RetrievedCandidates:
        self.asked_for_anchors.append(not request.without_anchors)
        return super()._call(request, timeout_s)


def test_retrieval_sends_anchors_only_for_explanations(
    artifacts: BuiltArtifacts, servers: Servers, dataset: Dataset
) -> None:
    """Anchors cost retrieval ~1 ms per 500 candidates; only explain=true reads them."""
    client = AnchorRecordingClient(f"127.0.0.1:{servers.retrieval_server.port}")
    settings = RankingSettings(artifacts=artifacts.root, compiled_trees=False)
    pipeline = RankingPipeline(load_ranker_artifact(artifacts.root), client, settings)
    try:
        for user in users_by_activity(dataset)[:5]:
            plain = pipeline.recommend(RecommendQuery(user, 10, now(dataset), "web", [], []), 5.0)
            explained = pipeline.recommend(RecommendQuery(user, 10, now(dataset), "web", [], [], explain=True), 5.0)
            assert [item.item_id for item in plain.items] == [item.item_id for item in explained.items]
            assert any(item.anchor_item_ids for item in explained.items)
    finally:
        client.close()
    # Each request's second call, for its popular candidates (a next-event ranker), never
    # asks for anchors either.
    assert client.asked_for_anchors == [False, False, True, False] * 5


def test_cost_of_rules_and_explanations_is_printed(
    artifacts: BuiltArtifacts, servers: Servers, dataset: Dataset
) -> None:
    """Not a timed assertion: the rules and explain stage times, in process, for the report."""
    client = RetrievalClient(f"127.0.0.1:{servers.retrieval_server.port}")
    settings = RankingSettings(artifacts=artifacts.root, compiled_trees=False, max_k=50)
    pipeline = RankingPipeline(load_ranker_artifact(artifacts.root), client, settings)
    users = users_by_activity(dataset)[:60]
    cases = {
        "default rules": (RulesOverrides(), False),
        "mmr 0.5": (RulesOverrides(mmr_lambda=0.5), False),
        "mmr 0.5 + caps": (RulesOverrides(mmr_lambda=0.5, max_per_brand=2, max_per_category=3), False),
        "default + explain": (RulesOverrides(), True),
    }
    timings: dict[str, dict[str, list[float]]] = {name: {"rules": [], "explain": [], "total": []} for name in cases}
    try:
        for user in users:  # the cases interleaved, so machine load hits them alike
            for name, (rules, explain) in cases.items():
                query = RecommendQuery(user, 20, now(dataset), "web", [], [], rules=rules, explain=explain)
                started = time.perf_counter()
                result = pipeline.recommend(query, 5.0)
                timings[name]["total"].append((time.perf_counter() - started) * 1000)
                timings[name]["rules"].append(result.stage_ms["rules"])
                timings[name]["explain"].append(result.stage_ms.get("explain", 0.0))
    finally:
        client.close()
    for name, measured in timings.items():
        print(
            f"\n{name:>18}, k=20, {len(users)} users: rules p50 {np.median(measured['rules']):.2f} ms, "
            f"explain p50 {np.median(measured['explain']):.2f} ms, "
            f"whole request p50 {np.median(measured['total']):.1f} ms"
        )
