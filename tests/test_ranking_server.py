"""Integration: ranking -> retrieval, both real servers on loopback, real stubs."""

from __future__ import annotations

import socket

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ranking_service.server import start_ranking_server
from shared.config import RankingSettings
from shared.data import PURCHASE, Dataset
from shared.proto.vitrine.v1 import ranking_pb2, ranking_pb2_grpc
from tests.conftest import BuiltArtifacts, Servers, users_by_activity


def _now(dataset: Dataset) -> int:
    return int(dataset.events.timestamp.max()) + 60


def _recommend(
    servers: Servers, dataset: Dataset, user_id: str, k: int, **fields: object
) -> ranking_pb2.RecommendResponse:
    context = ranking_pb2.RequestContext(timestamp=_now(dataset), device=ranking_pb2.DEVICE_WEB)
    request = ranking_pb2.RecommendRequest(user_id=user_id, k=k, context=context, **fields)  # type: ignore[arg-type]
    return servers.ranking.Recommend(request, timeout=10)


def _purchased(dataset: Dataset, user_id: str) -> set[str]:
    user_row = int(np.flatnonzero(dataset.users.user_ids == user_id)[0])
    events = dataset.events
    mine = (events.user_index == user_row) & (events.event_code == PURCHASE)
    return set(dataset.catalog.item_ids[events.item_index[mine]].tolist())


def test_health_reports_serving(servers: Servers) -> None:
    stub = health_pb2_grpc.HealthStub(servers.channels[1])
    response = stub.Check(health_pb2.HealthCheckRequest(service="vitrine.v1.Ranking"), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("k", [1, 10, 50])
def test_k_items_unique_valid_ids_with_reasons(servers: Servers, dataset: Dataset, k: int) -> None:
    user = users_by_activity(dataset)[3]
    response = _recommend(servers, dataset, user, k)
    ids = [item.item_id for item in response.items]
    assert len(ids) == k
    assert len(set(ids)) == k
    assert set(ids) <= set(dataset.catalog.item_ids.tolist())
    scores = [item.score for item in response.items]
    assert scores == sorted(scores, reverse=True)
    assert all(item.reason and item.title and item.brand and item.price > 0 for item in response.items)
    assert response.request_id
    assert response.model_version
    assert response.index_version
    assert not response.cold_start


def test_versions_match_the_served_artifacts(servers: Servers, dataset: Dataset, artifacts: BuiltArtifacts) -> None:
    response = _recommend(servers, dataset, users_by_activity(dataset)[0], 5)
    assert response.model_version == artifacts.ranker.version
    assert response.index_version == artifacts.index.version


def test_purchased_items_are_never_recommended(servers: Servers, dataset: Dataset) -> None:
    buyers = [user for user in users_by_activity(dataset)[:40] if len(_purchased(dataset, user)) >= 3][:10]
    assert buyers, "the test dataset should have users with purchases"
    for user in buyers:
        response = _recommend(servers, dataset, user, 50)
        assert not {item.item_id for item in response.items} & _purchased(dataset, user)


def test_explicit_exclusions_and_out_of_stock_are_removed(servers: Servers, dataset: Dataset) -> None:
    user = users_by_activity(dataset)[5]
    first = [item.item_id for item in _recommend(servers, dataset, user, 20).items]
    second = [item.item_id for item in _recommend(servers, dataset, user, 20, exclude_item_ids=first[:5]).items]
    assert len(second) == 20
    assert not set(first[:5]) & set(second)
    out_of_stock = set(dataset.catalog.item_ids[dataset.catalog.stock <= 0].tolist())
    assert not out_of_stock & set(first + second)


def test_deterministic_for_the_same_request(servers: Servers, dataset: Dataset) -> None:
    user = users_by_activity(dataset)[7]
    first = _recommend(servers, dataset, user, 20)
    second = _recommend(servers, dataset, user, 20)
    assert [(i.item_id, i.score) for i in first.items] == [(i.item_id, i.score) for i in second.items]
    assert first.request_id != second.request_id


def test_session_items_steer_recommendations(servers: Servers, dataset: Dataset) -> None:
    catalog = dataset.catalog
    category = str(catalog.categories[np.argmax(catalog.stock > 0)])
    session = catalog.item_ids[(catalog.categories == category) & (catalog.stock > 0)][:3].tolist()
    context = ranking_pb2.RequestContext(timestamp=_now(dataset), session_item_ids=session)
    response = servers.ranking.Recommend(
        ranking_pb2.RecommendRequest(user_id="anonymous-shopper", k=10, context=context), timeout=10
    )
    share = np.mean([item.category == category for item in response.items])
    assert share >= 0.6, f"a session of {category} items got {share:.0%} {category} recommendations"
    assert not response.cold_start


def test_unknown_user_gets_a_cold_start_answer(servers: Servers, dataset: Dataset) -> None:
    response = _recommend(servers, dataset, "brand-new-user", 10)
    assert response.cold_start
    assert len(response.items) == 10
    assert all(item.reason.startswith("popular in") for item in response.items)


@pytest.mark.parametrize(
    ("user_id", "k", "fragment"),
    [("u1", 0, "k must be between 1 and 50"), ("u1", -4, "k must be"), ("u1", 51, "k must be"), ("", 5, "user_id")],
)
def test_bad_requests_get_invalid_argument(servers: Servers, user_id: str, k: int, fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        servers.ranking.Recommend(ranking_pb2.RecommendRequest(user_id=user_id, k=k), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in str(caught.value.details())


def test_too_many_session_items_is_invalid_argument(servers: Servers) -> None:
    context = ranking_pb2.RequestContext(session_item_ids=["x"] * 51)
    with pytest.raises(grpc.RpcError) as caught:
        servers.ranking.Recommend(ranking_pb2.RecommendRequest(user_id="u", k=5, context=context), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("failure", "fallback"), [("down", True), ("down", False), ("too_slow", True), ("too_slow", False)]
)
def test_retrieval_failure_degrades_to_popular_or_is_unavailable(
    artifacts: BuiltArtifacts, servers: Servers, dataset: Dataset, failure: str, fallback: bool
) -> None:
    """Retrieval down (nothing listening) or slower than its budget: with the fallback the
    answer is degraded, never an error; without it, UNAVAILABLE with a reason, never INTERNAL.

    "Too slow" is a socket that accepts connections and never answers: a retrieval service
    that hangs. (A real server with a microsecond budget is not reliably too slow: gRPC
    rounds deadlines up to milliseconds and a loaded machine fires its timers late.)"""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    target = f"127.0.0.1:{_dead_port()}" if failure == "down" else f"127.0.0.1:{hung.getsockname()[1]}"
    ranking = start_ranking_server(
        RankingSettings(
            artifacts=artifacts.root,
            port=0,
            metrics_port=None,
            retrieval_target=target,
            retrieval_timeout_s=0.5,
            compiled_trees=False,
            fallback_to_popular=fallback,
        )
    )
    user = users_by_activity(dataset)[0]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ranking.port}") as channel:
            stub = ranking_pb2_grpc.RankingStub(channel)
            request = ranking_pb2.RecommendRequest(
                user_id=user, k=10, context=ranking_pb2.RequestContext(timestamp=_now(dataset))
            )
            if fallback:
                response = stub.Recommend(request, timeout=30)
                assert response.degraded
                assert len(response.items) == 10
                assert not {item.item_id for item in response.items} & _purchased(dataset, user)
                assert response.index_version == ""
            else:
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Recommend(request, timeout=30)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "retrieval service" in str(caught.value.details())
    finally:
        ranking.stop()
        hung.close()
