"""Integration: the real retrieval server on loopback, called through real stubs."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.data import Dataset
from shared.proto.vitrine.v1 import retrieval_pb2
from tests.conftest import BuiltArtifacts, Servers, users_by_activity


def _ids(response: retrieval_pb2.RetrieveResponse) -> list[str]:
    return [candidate.item_id for candidate in response.candidates]


def test_health_reports_serving(servers: Servers) -> None:
    stub = health_pb2_grpc.HealthStub(servers.channels[0])
    response = stub.Check(health_pb2.HealthCheckRequest(service="vitrine.v1.Retrieval"), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_retrieve_by_user_returns_n_unique_scored_candidates(
    servers: Servers, dataset: Dataset, artifacts: BuiltArtifacts
) -> None:
    user = users_by_activity(dataset)[0]
    response = servers.retrieval.Retrieve(retrieval_pb2.RetrieveRequest(user_id=user, n=100), timeout=5)
    ids = _ids(response)
    assert len(ids) == 100
    assert len(set(ids)) == 100
    assert set(ids) <= set(dataset.catalog.item_ids.tolist())
    scores = [candidate.score for candidate in response.candidates]
    assert scores == sorted(scores, reverse=True)
    # The configured mix (default: the fused ANN, tagged "ann"); each candidate once.
    primary = {candidate.source for candidate in response.candidates}
    assert "ann" in primary
    assert primary <= {"ann", "content", "collaborative", "covisitation", "item_model", "trending", "trending_category"}
    assert response.index_version == artifacts.index.version
    assert response.dimension > 0
    # The text and collaborative parts are both there and add up to the score.
    parts = np.asarray([(c.content_score, c.collaborative_score, c.score) for c in response.candidates])
    np.testing.assert_allclose(parts[:, 0] + parts[:, 1], parts[:, 2], atol=2e-3)
    assert np.any(parts[:, 0] != 0)
    assert np.any(parts[:, 1] != 0)


def test_popular_candidates_have_no_score_parts(servers: Servers) -> None:
    response = servers.retrieval.Retrieve(retrieval_pb2.RetrieveRequest(user_id="nobody-knows-me", n=5), timeout=5)
    assert {candidate.source for candidate in response.candidates} == {"popular"}
    assert all(c.content_score == 0 and c.collaborative_score == 0 for c in response.candidates)


def test_retrieve_excludes_given_items(servers: Servers, dataset: Dataset) -> None:
    user = users_by_activity(dataset)[1]
    # The fused source alone: its order does not depend on what other sources fill.
    fused = [retrieval_pb2.SourceQuota(source="fused", share=1.0)]
    first = _ids(servers.retrieval.Retrieve(retrieval_pb2.RetrieveRequest(user_id=user, n=30, mix=fused), timeout=5))
    excluded = first[:10]
    second = _ids(
        servers.retrieval.Retrieve(
            retrieval_pb2.RetrieveRequest(user_id=user, n=30, exclude_item_ids=[*excluded, "no-such-item"], mix=fused),
            timeout=5,
        )
    )
    assert len(second) == 30
    assert not set(excluded) & set(second)
    assert second[:20] == first[10:30]


def test_history_query_finds_items_of_the_same_category(servers: Servers, dataset: Dataset) -> None:
    catalog = dataset.catalog
    category = catalog.categories[0]
    same_category = catalog.item_ids[catalog.categories == category][:5].tolist()
    response = servers.retrieval.Retrieve(
        retrieval_pb2.RetrieveRequest(history=retrieval_pb2.ItemHistory(item_ids=same_category), n=20), timeout=5
    )
    found = np.isin(catalog.item_ids, _ids(response))
    share = float(np.mean(catalog.categories[found] == category))
    assert share >= 0.8, f"only {share:.0%} of the neighbours of five {category} items are {category}"


def test_unknown_user_gets_popular_items(servers: Servers) -> None:
    response = servers.retrieval.Retrieve(retrieval_pb2.RetrieveRequest(user_id="never-seen", n=10), timeout=5)
    assert len(response.candidates) == 10
    assert {candidate.source for candidate in response.candidates} == {"popular"}


def test_a_history_whose_weights_are_all_zero_gets_popular_items(servers: Servers, dataset: Dataset) -> None:
    """Weight 0 leaves an item out of the query; leaving them all out is an empty history
    (found by tests/test_fuzz.py: the answer was empty)."""
    history = retrieval_pb2.ItemHistory(item_ids=dataset.catalog.item_ids[:5].tolist(), weights=[0.0] * 5)
    response = servers.retrieval.Retrieve(retrieval_pb2.RetrieveRequest(history=history, n=10), timeout=5)
    popular = servers.retrieval.Retrieve(retrieval_pb2.RetrieveRequest(user_id="never-seen", n=10), timeout=5)
    assert len(response.candidates) == 10
    assert {candidate.source for candidate in response.candidates} == {"popular"}
    assert _ids(response) == _ids(popular)


def test_similar_items_excludes_the_item_itself(servers: Servers, dataset: Dataset) -> None:
    item = str(dataset.catalog.item_ids[5])
    response = servers.retrieval.SimilarItems(retrieval_pb2.SimilarItemsRequest(item_id=item, n=10), timeout=5)
    assert len(response.candidates) == 10
    assert item not in _ids(response)


def test_explicit_vector_query(servers: Servers) -> None:
    dimension = servers.retrieval.Retrieve(retrieval_pb2.RetrieveRequest(user_id="x", n=1), timeout=5).dimension
    vector = np.random.default_rng(0).standard_normal(dimension).astype(np.float32)
    response = servers.retrieval.Retrieve(
        retrieval_pb2.RetrieveRequest(vector=retrieval_pb2.FloatVector(values=vector.tolist()), n=7), timeout=5
    )
    assert len(response.candidates) == 7


@pytest.mark.parametrize(
    ("request_message", "code", "fragment"),
    [
        (retrieval_pb2.RetrieveRequest(n=10), grpc.StatusCode.INVALID_ARGUMENT, "set one query"),
        (retrieval_pb2.RetrieveRequest(user_id="u", n=0), grpc.StatusCode.INVALID_ARGUMENT, "n must be between"),
        (retrieval_pb2.RetrieveRequest(user_id="u", n=501), grpc.StatusCode.INVALID_ARGUMENT, "n must be between"),
        (
            retrieval_pb2.RetrieveRequest(vector=retrieval_pb2.FloatVector(values=[1.0, 2.0]), n=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "this index expects",
        ),
        (
            retrieval_pb2.RetrieveRequest(vector=retrieval_pb2.FloatVector(values=[float("nan")] * 3), n=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "expects",
        ),
        (retrieval_pb2.RetrieveRequest(text="   ", n=5), grpc.StatusCode.INVALID_ARGUMENT, "text is empty"),
        (
            retrieval_pb2.RetrieveRequest(history=retrieval_pb2.ItemHistory(item_ids=[]), n=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "history.item_ids is empty",
        ),
        (
            retrieval_pb2.RetrieveRequest(history=retrieval_pb2.ItemHistory(item_ids=["a", "b"], weights=[1.0]), n=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "one per item",
        ),
        (
            retrieval_pb2.RetrieveRequest(user_id="u", n=5, exclude_item_ids=["x"] * 10_001),
            grpc.StatusCode.INVALID_ARGUMENT,
            "at most",
        ),
    ],
)
def test_bad_retrieve_requests_get_invalid_argument(
    servers: Servers, request_message: retrieval_pb2.RetrieveRequest, code: grpc.StatusCode, fragment: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        servers.retrieval.Retrieve(request_message, timeout=5)
    assert caught.value.code() == code
    assert fragment in str(caught.value.details())


def test_text_query_without_text_model_is_failed_precondition(servers: Servers) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        servers.retrieval.Retrieve(retrieval_pb2.RetrieveRequest(text="black leather handbag", n=5), timeout=5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "retrieval.text_queries" in str(caught.value.details())


def test_similar_items_of_unknown_item_is_not_found(servers: Servers) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        servers.retrieval.SimilarItems(retrieval_pb2.SimilarItemsRequest(item_id="SKU-nope", n=5), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "SKU-nope" in str(caught.value.details())


def test_similar_items_bad_n_is_invalid_argument(servers: Servers, dataset: Dataset) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        servers.retrieval.SimilarItems(
            retrieval_pb2.SimilarItemsRequest(item_id=str(dataset.catalog.item_ids[0]), n=-3), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
