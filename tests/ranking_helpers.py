"""Helpers for tests that need a ranking server with their own rules or experiments."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np

from ranking_service.server import start_ranking_server
from ranking_service.store import ItemTable
from shared.config import RankingSettings
from shared.data import Dataset
from shared.proto.vitrine.v1 import ranking_pb2, ranking_pb2_grpc
from tests.conftest import BuiltArtifacts, Servers


@contextmanager
def ranking_server(
    artifacts: BuiltArtifacts, servers: Servers, **fields: Any
) -> Iterator[ranking_pb2_grpc.RankingStub]:
    """A real ranking server on loopback with these settings, calling the session's retrieval."""
    settings = RankingSettings.model_validate(
        {
            "artifacts": artifacts.root,
            "port": 0,
            "metrics_port": None,
            "retrieval_target": f"127.0.0.1:{servers.retrieval_server.port}",
            "max_k": 50,
            "compiled_trees": False,
            **fields,
        }
    )
    running = start_ranking_server(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield ranking_pb2_grpc.RankingStub(channel)
    finally:
        running.stop()


def now(dataset: Dataset) -> int:
    return int(dataset.events.timestamp.max()) + 60


def recommend(
    stub: ranking_pb2_grpc.RankingStub, dataset: Dataset, user_id: str, k: int, **fields: Any
) -> ranking_pb2.RecommendResponse:
    context = fields.pop("context", None) or ranking_pb2.RequestContext(
        timestamp=now(dataset), device=ranking_pb2.DEVICE_WEB
    )
    request = ranking_pb2.RecommendRequest(user_id=user_id, k=k, context=context, **fields)
    response: ranking_pb2.RecommendResponse = stub.Recommend(request, timeout=10)
    return response


def tiny_item_table(n: int = 6) -> ItemTable:
    """``n`` items i0..i(n-1), one brand and category, orthogonal content vectors."""
    return ItemTable(
        item_ids=np.asarray([f"i{r}" for r in range(n)]),
        titles=np.asarray([f"Item {r}" for r in range(n)]),
        brands=np.asarray(["Acme"] * n),
        categories=np.asarray(["tools"] * n),
        category_codes=np.zeros(n, np.int32),
        brand_codes=np.zeros(n, np.int32),
        prices=np.ones(n),
        stock=np.ones(n, np.int64),
        created_at=np.zeros(n, np.int64),
        content_vectors=np.eye(n, 8, dtype=np.float16),
    )
