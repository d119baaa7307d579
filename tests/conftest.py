"""Session fixtures: one small generated dataset, artifacts built from it, real servers.

Artifacts are built through the same Python entry points as ``vitrine build`` but
with a hashing embedder (tests/fakes.py) so most tests skip the 6-8 s import of
sentence-transformers; ``test_end_to_end.py`` runs the real CLI with the real model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from ranking_service.retrieval_client import RetrievalClient
from ranking_service.server import start_ranking_server
from ranking_service.store import item_table
from ranking_service.training import train_ranker_artifact
from retrieval_service.artifact import build_index_artifact
from retrieval_service.server import start_retrieval_server
from shared.artifacts import Artifact
from shared.config import RankingSettings, RetrievalSettings, VitrineSettings
from shared.data import Dataset
from shared.datagen import GeneratorConfig, generate
from shared.grpc_server import RunningServer
from shared.proto.vitrine.v1 import ranking_pb2_grpc, retrieval_pb2_grpc
from tests.fakes import HashingEmbedder
from tests.redis_helpers import RedisServer, free_port, start_redis, stop_redis

# Every build in the tests (in this process and in the commands it starts) tunes ALS on a
# two-point grid: the tuning path runs, without the default grid's 36 fits per build.
os.environ.setdefault("VITRINE_INDEX_BUILD__ALS_TUNING__FACTORS", "[16]")
os.environ.setdefault("VITRINE_INDEX_BUILD__ALS_TUNING__REGULARIZATION", "[1.0, 10.0]")
os.environ.setdefault("VITRINE_INDEX_BUILD__ALS_TUNING__ALPHA", "[1.0]")
# Likewise the item model's tuning runs on one validation split and a two-point l2 grid
# instead of three splits and six points (its averaging is tested in test_item_model.py
# with explicit settings): each point is a dense inverse, ~1 s at the session's 2,000 items.
for _build in ("INDEX_BUILD", "RANKER_BUILD"):
    os.environ.setdefault(f"VITRINE_{_build}__ITEM_MODEL__TUNE_SPLITS", "1")
    os.environ.setdefault(f"VITRINE_{_build}__ITEM_MODEL__L2_GRID", "[300.0, 1000.0]")
# Ranking processes the tests start score with LightGBM: compiling the trees costs 20 s of
# a core per process and holds its exit for up to ranking.exit_compile_wait_s. The compile
# is tested in test_scoring.py, and under SIGTERM in test_operations.py (which turns it on).
os.environ.setdefault("VITRINE_RANKING__COMPILED_TREES", "false")

TEST_DATA = GeneratorConfig(seed=11, n_items=2000, n_users=800, n_events=60_000)


@pytest.fixture(scope="session")
def settings() -> VitrineSettings:
    return VitrineSettings()


@pytest.fixture(scope="session")
def dataset() -> Dataset:
    return generate(TEST_DATA)


@pytest.fixture(scope="session")
def embedder() -> HashingEmbedder:
    return HashingEmbedder()


@dataclass(frozen=True)
class BuiltArtifacts:
    root: Path
    training_index: Artifact
    ranker: Artifact
    index: Artifact
    cutoff: int


@pytest.fixture(scope="session")
def artifacts(
    tmp_path_factory: pytest.TempPathFactory, dataset: Dataset, embedder: HashingEmbedder, settings: VitrineSettings
) -> BuiltArtifacts:
    root = tmp_path_factory.mktemp("artifacts")
    cutoff = dataset.events.time_at(1.0 - settings.ranker_build.label_window)
    training_index = build_index_artifact(
        dataset, embedder, root, settings.index_build, name="index-train", cutoff=cutoff
    )
    retrieval = start_retrieval_server(
        RetrievalSettings(artifacts=root, index_name="index-train", port=0, metrics_port=None, text_queries=False),
        settings.embedding,
    )
    client = RetrievalClient(f"127.0.0.1:{retrieval.port}")
    try:
        content = embedder.encode(dataset.catalog.embedding_texts())
        ranker = train_ranker_artifact(
            dataset,
            [client],
            root,
            settings.ranker_build,
            settings.ranking,
            item_table(dataset, content),
            settings.index_build,
            cutoff,
        )
    finally:
        client.close()
        retrieval.stop()
    index = build_index_artifact(dataset, embedder, root, settings.index_build)
    return BuiltArtifacts(root=root, training_index=training_index, ranker=ranker, index=index, cutoff=cutoff)


@dataclass(frozen=True)
class Servers:
    retrieval_server: RunningServer
    ranking_server: RunningServer
    retrieval: retrieval_pb2_grpc.RetrievalStub
    ranking: ranking_pb2_grpc.RankingStub
    channels: tuple[grpc.Channel, grpc.Channel]


@pytest.fixture(scope="session")
def servers(artifacts: BuiltArtifacts, settings: VitrineSettings) -> Iterator[Servers]:
    """Both real gRPC servers on free loopback ports, called through real stubs."""
    retrieval = start_retrieval_server(
        RetrievalSettings(artifacts=artifacts.root, port=0, metrics_port=0, text_queries=False, max_candidates=500),
        settings.embedding,
    )
    ranking = start_ranking_server(
        RankingSettings(
            artifacts=artifacts.root,
            port=0,
            metrics_port=0,
            retrieval_target=f"127.0.0.1:{retrieval.port}",
            max_k=50,
            compiled_trees=False,
        )
    )
    retrieval_channel = grpc.insecure_channel(f"127.0.0.1:{retrieval.port}")
    ranking_channel = grpc.insecure_channel(f"127.0.0.1:{ranking.port}")
    yield Servers(
        retrieval_server=retrieval,
        ranking_server=ranking,
        retrieval=retrieval_pb2_grpc.RetrievalStub(retrieval_channel),
        ranking=ranking_pb2_grpc.RankingStub(ranking_channel),
        channels=(retrieval_channel, ranking_channel),
    )
    retrieval_channel.close()
    ranking_channel.close()
    ranking.stop()
    retrieval.stop()


def users_by_activity(dataset: Dataset) -> list[str]:
    """User ids, most active first."""
    counts = np.bincount(dataset.events.user_index, minlength=len(dataset.users))
    order = np.argsort(-counts, kind="stable")
    return [str(dataset.users.user_ids[row]) for row in order if counts[row] > 0]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for one test module (tests/redis_helpers.py)."""
    server = start_redis(tmp_path_factory.mktemp("redis"), free_port())
    yield server
    stop_redis(server)
