"""Sharded retrieval: a 3-shard build served by 3 retrieval processes, merged by ranking.

The shards are built from the session's test catalogue (tests/conftest.py) with the same
settings as the session's unsharded index, and served by separate ``vitrine serve
retrieval --shard I --shards 3`` processes on loopback; the unsharded index is the
session's in-process retrieval server. Real servers, real stubs, real processes.

What "the merged candidates match the unsharded index" means here: each shard of this
catalogue holds ~670 items, below the size at which the build trains an IVF-PQ index
(``MIN_ITEMS_FOR_IVFPQ``), so the shards search exactly; the unsharded index of 2,000
items is IVF-PQ. The reference is therefore the unsharded index searched *exactly*
(brute force over its stored vectors, with the query it builds itself), and the merged
top-100 must recall >= 0.99 of it. The overlap with what the unsharded IVF-PQ server
returns is measured and printed too, as is that server's own recall against exact
search. IVF-PQ accuracy at real shard sizes is measured by ``vitrine size-shards``
(docs/deploy.md, "Sharding").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import REGISTRY

from ranking_service.retrieval_client import (
    PARTIAL_SHARD_FAILED,
    PARTIAL_VERSION_SKEW,
    ShardedRetrievalClient,
    merge_answers,
    newest_majority_version,
)
from ranking_service.server import SERVICE_NAME as RANKING_SERVICE
from ranking_service.server import start_ranking_server
from retrieval_service.artifact import LoadedIndex, build_index_artifacts, load_index_artifact
from retrieval_service.server import start_retrieval_server
from retrieval_service.shards import shard_artifact_name, shard_of
from retrieval_service.vectors import history_query
from shared.artifacts import Artifact, ArtifactError, new_version, set_current
from shared.commands import server_process, vitrine_command
from shared.config import RankingSettings, RetrievalSettings, SettingsError, VitrineSettings, load_settings
from shared.data import PURCHASE, Dataset
from shared.grpc_server import RunningServer
from shared.interactions import recency_weights
from shared.proto.vitrine.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from tests.conftest import BuiltArtifacts, Servers, users_by_activity
from tests.fakes import HashingEmbedder

SHARDS = 3
N = 100
QUERIES = 100
# Shard processes need no text model (the artifacts were embedded with the hashing embedder).
SHARD_ENV = {"VITRINE_RETRIEVAL__TEXT_QUERIES": "false"}
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ShardSet:
    root: Path
    artifacts: list[Artifact]
    targets: list[str]

    @property
    def version(self) -> str:
        return self.artifacts[0].version


def _serve_shard_argv(root: Path, shard: int) -> list[str]:
    return vitrine_command(
        "serve", "retrieval", "--artifacts", str(root), "--shard", str(shard), "--shards", str(SHARDS)
    )


@pytest.fixture(scope="module")
def shard_set(
    tmp_path_factory: pytest.TempPathFactory, dataset: Dataset, embedder: HashingEmbedder, settings: VitrineSettings
) -> Iterator[ShardSet]:
    root = tmp_path_factory.mktemp("sharded")
    built = build_index_artifacts(dataset, embedder, root, settings.index_build, shards=SHARDS)
    run = tmp_path_factory.mktemp("shard-processes")
    with contextlib.ExitStack() as stack:
        ports = [
            stack.enter_context(
                server_process(
                    _serve_shard_argv(root, shard), run / f"shard-{shard}.port", run / f"shard-{shard}.log", SHARD_ENV
                )
            )
            for shard in range(SHARDS)
        ]
        yield ShardSet(root, built, [f"127.0.0.1:{port}" for port in ports])


@pytest.fixture(scope="module")
def client(shard_set: ShardSet) -> Iterator[ShardedRetrievalClient]:
    sharded = ShardedRetrievalClient(shard_set.targets, query_share=0.4, service="tests")
    yield sharded
    sharded.close()


@pytest.fixture(scope="module")
def unsharded(artifacts: BuiltArtifacts, settings: VitrineSettings) -> LoadedIndex:
    """The session's unsharded index, loaded here to search it exactly."""
    return load_index_artifact(artifacts.root, settings.retrieval.nprobe)


def _history(dataset: Dataset, user_id: str, now: int, settings: VitrineSettings) -> tuple[list[str], list[float]]:
    """The user's last items and their weights, as the ranking service sends them."""
    events = dataset.events
    user_row = int(np.flatnonzero(dataset.users.user_ids == user_id)[0])
    mine = np.flatnonzero(events.user_index == user_row)
    latest = mine[np.argsort(-events.timestamp[mine], kind="stable")][: settings.ranking.history_length]
    weights = recency_weights(
        events.event_code[latest], events.timestamp[latest], now, settings.ranking.query_half_life_days
    )
    return dataset.catalog.item_ids[events.item_index[latest]].tolist(), weights.tolist()


def _purchased(dataset: Dataset, user_id: str) -> list[str]:
    user_row = int(np.flatnonzero(dataset.users.user_ids == user_id)[0])
    events = dataset.events
    mine = (events.user_index == user_row) & (events.event_code == PURCHASE)
    return sorted(set(dataset.catalog.item_ids[events.item_index[mine]].tolist()))


def _exact_top(index: LoadedIndex, query: npt.NDArray[np.float32], n: int, exclude: list[str]) -> set[str]:
    scores = index.index.vectors.astype(np.float32) @ query.astype(np.float32).ravel()
    scores[[index.item_row[item_id] for item_id in exclude if item_id in index.item_row]] = -np.inf
    return set(index.item_ids[np.argsort(-scores, kind="stable")[:n]].tolist())


def _served_ids(servers: Servers, request: retrieval_pb2.RetrieveRequest) -> set[str]:
    return {candidate.item_id for candidate in servers.retrieval.Retrieve(request, timeout=TIMEOUT_S).candidates}


def _dead_target() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def _ranking(artifacts: BuiltArtifacts, targets: list[str], **fields: Any) -> RunningServer:
    return start_ranking_server(
        RankingSettings(
            artifacts=artifacts.root,
            port=0,
            metrics_port=None,
            retrieval_shards=targets,
            max_k=50,
            compiled_trees=False,
            **fields,
        )
    )


def _recommend(port: int, user_id: str, now: int, k: int = 20) -> ranking_pb2.RecommendResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = ranking_pb2.RecommendRequest(
            user_id=user_id, k=k, context=ranking_pb2.RequestContext(timestamp=now, device=ranking_pb2.DEVICE_WEB)
        )
        return ranking_pb2_grpc.RankingStub(channel).Recommend(request, timeout=TIMEOUT_S)


def _counter(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- the build -------------------------------------------------------------------------------


def test_a_sharded_build_partitions_the_catalogue_in_one_vector_space(
    shard_set: ShardSet, unsharded: LoadedIndex, dataset: Dataset, settings: VitrineSettings
) -> None:
    loaded = [
        load_index_artifact(shard_set.root, settings.retrieval.nprobe, shard_artifact_name("index", shard, SHARDS))
        for shard in range(SHARDS)
    ]
    assert {artifact.version for artifact in shard_set.artifacts} == {shard_set.version}
    assert [(index.shard, index.shard_count) for index in loaded] == [(shard, SHARDS) for shard in range(SHARDS)]
    all_items: list[str] = []
    for index in loaded:
        items = index.item_ids.tolist()
        assert items, f"shard {index.shard} is empty"
        assert {shard_of(item_id, SHARDS) for item_id in items} == {index.shard}
        # The same fused vectors as the unsharded build: one vector space, comparable scores.
        rows = [unsharded.item_row[item_id] for item_id in items]
        assert np.array_equal(index.index.vectors, unsharded.index.vectors[rows])
        users = list(index.user_row)
        assert {shard_of(user_id, SHARDS) for user_id in users} <= {index.shard}
        for user_id in users[:50]:
            row = unsharded.user_row[user_id]
            assert np.array_equal(index.user_vectors[index.user_row[user_id]], unsharded.user_vectors[row])
        all_items += items
    assert sorted(all_items) == sorted(dataset.catalog.item_ids.tolist())
    assert sum(len(index.user_row) for index in loaded) == len(unsharded.user_row)


def test_each_shard_process_says_which_shard_it_answers_for(shard_set: ShardSet, servers: Servers) -> None:
    for shard, target in enumerate(shard_set.targets):
        with grpc.insecure_channel(target) as channel:
            response = retrieval_pb2_grpc.RetrievalStub(channel).Retrieve(
                retrieval_pb2.RetrieveRequest(user_id="nobody-knows-me", n=20), timeout=TIMEOUT_S
            )
        assert (response.shard, response.shard_count, response.index_version) == (shard, SHARDS, shard_set.version)
        assert len(response.candidates) == 20
        assert {shard_of(candidate.item_id, SHARDS) for candidate in response.candidates} == {shard}
    whole = servers.retrieval.Retrieve(retrieval_pb2.RetrieveRequest(user_id="nobody-knows-me", n=5), timeout=5)
    assert (whole.shard, whole.shard_count) == (0, 1)


def test_query_vector_rejects_bad_queries(shard_set: ShardSet) -> None:
    bad = [
        (retrieval_pb2.QueryVectorRequest(), "set one query"),
        (retrieval_pb2.QueryVectorRequest(user_id=""), "user_id is empty"),
        (retrieval_pb2.QueryVectorRequest(history=retrieval_pb2.ItemHistory()), "history.item_ids is empty"),
        (
            retrieval_pb2.QueryVectorRequest(history=retrieval_pb2.ItemHistory(item_ids=["a"], weights=[-1.0])),
            "finite and >= 0",
        ),
    ]
    with grpc.insecure_channel(shard_set.targets[0]) as channel:
        stub = retrieval_pb2_grpc.RetrievalStub(channel)
        for request, fragment in bad:
            with pytest.raises(grpc.RpcError) as caught:
                stub.QueryVector(request, timeout=TIMEOUT_S)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert fragment in str(caught.value.details())


# -- merged answers against the unsharded index ------------------------------------------------


def test_merged_candidates_match_the_unsharded_index(
    client: ShardedRetrievalClient,
    servers: Servers,
    unsharded: LoadedIndex,
    dataset: Dataset,
    settings: VitrineSettings,
) -> None:
    """History queries (what ranking sends, purchases excluded) and user-id queries for 100
    users each: merged top-100 of 3 shards against the unsharded index's exact top-100."""
    now = int(dataset.events.timestamp.max()) + 60
    users = [user for user in users_by_activity(dataset) if user in unsharded.user_row][:QUERIES]
    assert len(users) == QUERIES
    recall: dict[str, list[float]] = {"history": [], "user": []}
    overlap_with_served: dict[str, list[float]] = {"history": [], "user": []}
    served_recall: dict[str, list[float]] = {"history": [], "user": []}
    for user in users:
        item_ids, weights = _history(dataset, user, now, settings)
        exclude = _purchased(dataset, user)
        rows = np.asarray([unsharded.item_row[item_id] for item_id in item_ids], dtype=np.int64)
        query = history_query(
            unsharded.index.vectors, rows, np.asarray(weights, dtype=np.float32), unsharded.content_dim, unsharded.build
        )
        exact = _exact_top(unsharded, query, N, exclude)
        merged = client.by_history(item_ids, weights, N, exclude, TIMEOUT_S)
        assert (merged.partial_reason, merged.from_popular) == ("", False)
        assert merged.index_version
        assert not set(merged.item_ids) & set(exclude)
        assert list(merged.scores) == sorted(merged.scores, reverse=True)
        served = _served_ids(
            servers,
            retrieval_pb2.RetrieveRequest(
                history=retrieval_pb2.ItemHistory(item_ids=item_ids, weights=weights), n=N, exclude_item_ids=exclude
            ),
        )
        recall["history"].append(len(set(merged.item_ids) & exact) / N)
        overlap_with_served["history"].append(len(set(merged.item_ids) & served) / N)
        served_recall["history"].append(len(served & exact) / N)

        user_query = unsharded.user_vectors[unsharded.user_row[user]].astype(np.float32)
        exact_user = _exact_top(unsharded, user_query, N, [])
        merged_user = client.by_user(user, N, [], TIMEOUT_S)
        assert (merged_user.partial_reason, merged_user.from_popular) == ("", False)
        served_user = _served_ids(servers, retrieval_pb2.RetrieveRequest(user_id=user, n=N))
        recall["user"].append(len(set(merged_user.item_ids) & exact_user) / N)
        overlap_with_served["user"].append(len(set(merged_user.item_ids) & served_user) / N)
        served_recall["user"].append(len(served_user & exact_user) / N)

    for kind in ("history", "user"):
        print(
            f"\n{kind} queries, {QUERIES} users, top-{N}: recall of merged 3-shard candidates vs unsharded exact "
            f"{np.mean(recall[kind]):.4f} (min {min(recall[kind]):.2f}); overlap with the unsharded IVF-PQ server "
            f"{np.mean(overlap_with_served[kind]):.4f}; that server's own recall vs exact "
            f"{np.mean(served_recall[kind]):.4f}"
        )
        assert np.mean(recall[kind]) >= 0.99, kind
        # The unsharded IVF-PQ server misses what it misses whether or not the index is sharded:
        # the merged answer must agree with it as well as exact search does.
        assert np.mean(overlap_with_served[kind]) >= np.mean(served_recall[kind]) - 0.01, kind


def test_popular_items_of_the_shards_merge_into_the_catalogue_order(
    client: ShardedRetrievalClient, servers: Servers, dataset: Dataset
) -> None:
    """An unknown user, a history of unknown items, and one whose weights are all 0: every
    shard answers with its popular items, scored by their rank in the whole catalogue, so
    the merge is the unsharded answer."""
    exclude = dataset.catalog.item_ids[:40].tolist()
    known = dataset.catalog.item_ids[40:45].tolist()
    for merged, request in [
        (
            client.by_user("a-stranger", N, exclude, TIMEOUT_S),
            retrieval_pb2.RetrieveRequest(user_id="a-stranger", n=N, exclude_item_ids=exclude),
        ),
        (
            client.by_history(["no-such-item"], [1.0], N, [], TIMEOUT_S),
            retrieval_pb2.RetrieveRequest(history=retrieval_pb2.ItemHistory(item_ids=["no-such-item"]), n=N),
        ),
        (
            client.by_history(known, [0.0] * len(known), N, [], TIMEOUT_S),
            retrieval_pb2.RetrieveRequest(
                history=retrieval_pb2.ItemHistory(item_ids=known, weights=[0.0] * len(known)), n=N
            ),
        ),
    ]:
        whole = servers.retrieval.Retrieve(request, timeout=TIMEOUT_S)
        assert (merged.partial_reason, merged.from_popular) == ("", True)
        assert merged.item_ids == [candidate.item_id for candidate in whole.candidates]
        assert np.allclose(merged.scores, [candidate.score for candidate in whole.candidates])


def test_merge_keeps_one_version_and_the_best_score_per_item() -> None:
    def answer(version: str, shard: int, *scored: tuple[str, float]) -> retrieval_pb2.RetrieveResponse:
        return retrieval_pb2.RetrieveResponse(
            candidates=[retrieval_pb2.Candidate(item_id=i, score=s, source="ann") for i, s in scored],
            index_version=version,
            shard=shard,
            shard_count=3,
        )

    merged = merge_answers(
        [answer("v2", 0, ("a", 0.9), ("b", 0.5)), answer("v2", 1, ("c", 0.7), ("a", 0.95)), answer("v2", 2)], n=3
    )
    assert [(c.item_id, round(c.score, 3)) for c in merged] == [("a", 0.95), ("c", 0.7), ("b", 0.5)]
    tied = merge_answers([answer("v2", 0, ("y", 0.5)), answer("v2", 1, ("x", 0.5))], n=2)
    assert [c.item_id for c in tied] == ["x", "y"]
    assert newest_majority_version(["v1", "v2", "v2"]) == "v2"
    assert newest_majority_version(["v1", "v1", "v2"]) == "v1"
    assert newest_majority_version(["20250101T000000-a", "20260101T000000-b"]) == "20260101T000000-b"


# -- the ranking service over shards ------------------------------------------------------------


def test_ranking_with_shard_targets_returns_a_normal_recommend(
    shard_set: ShardSet, artifacts: BuiltArtifacts, servers: Servers, dataset: Dataset
) -> None:
    now = int(dataset.events.timestamp.max()) + 60
    ranking = _ranking(artifacts, shard_set.targets)
    overlaps = []
    try:
        for user in users_by_activity(dataset)[:20]:
            sharded = _recommend(ranking.port, user, now)
            assert (sharded.degraded, sharded.partial, sharded.cold_start) == (False, False, False)
            assert len({item.item_id for item in sharded.items}) == 20
            assert all(item.reason and item.title for item in sharded.items)
            assert sharded.index_version == shard_set.version
            whole = _recommend(servers.ranking_server.port, user, now)
            overlaps.append(len({i.item_id for i in sharded.items} & {i.item_id for i in whole.items}) / 20)
        cold = _recommend(ranking.port, "first-visit", now, k=10)
        whole_cold = _recommend(servers.ranking_server.port, "first-visit", now, k=10)
        assert (cold.degraded, cold.partial, cold.cold_start) == (False, False, True)
        assert [item.item_id for item in cold.items] == [item.item_id for item in whole_cold.items]
    finally:
        ranking.stop()
    print(f"\nRecommend k=20 over 3 shards vs unsharded, 20 users: mean overlap {np.mean(overlaps):.3f}")
    assert np.mean(overlaps) >= 0.95


def test_a_hung_or_killed_shard_gives_partial_answers_not_errors(
    shard_set: ShardSet, artifacts: BuiltArtifacts, dataset: Dataset
) -> None:
    """Shard 2 runs in a process of its own here: stopped (SIGSTOP) it misses its deadline,
    killed (SIGKILL) it refuses connections; either way Recommend answers from shards 0 and 1,
    flagged partial, within the caller's deadline."""
    target = _dead_target()
    argv = [*_serve_shard_argv(shard_set.root, 2), "--port", target.rsplit(":", 1)[1], "--metrics-port", "0"]
    process = subprocess.Popen(
        argv, env={**os.environ, **SHARD_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    now = int(dataset.events.timestamp.max()) + 60
    user = users_by_activity(dataset)[1]
    # The hung shard holds the query step for its whole share of the retrieval timeout;
    # 3 s leaves the healthy shards ample time on a loaded 2-core machine (with 1 s they
    # missed the search step there now and then, and the answer came out degraded).
    ranking = _ranking(artifacts, [*shard_set.targets[:2], target], retrieval_timeout_s=3.0)
    labels = {"service": RANKING_SERVICE, "reason": PARTIAL_SHARD_FAILED}
    try:
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
        normal = _recommend(ranking.port, user, now)
        assert (normal.degraded, normal.partial) == (False, False)
        assert 2 in {shard_of(item.item_id, SHARDS) for item in normal.items}

        outcomes = {}
        for fault, sig in (("hung", signal.SIGSTOP), ("killed", signal.SIGKILL)):
            process.send_signal(sig)
            before = _counter("vitrine_partial_responses_total", labels)
            started = time.perf_counter()
            with grpc.insecure_channel(f"127.0.0.1:{ranking.port}") as channel:
                response = ranking_pb2_grpc.RankingStub(channel).Recommend(
                    ranking_pb2.RecommendRequest(user_id=user, k=20, context=ranking_pb2.RequestContext(timestamp=now)),
                    timeout=5.0,
                )
            outcomes[fault] = round((time.perf_counter() - started) * 1000.0, 1)
            assert (response.degraded, response.partial) == (False, True), fault
            assert len(response.items) == 20
            assert {shard_of(item.item_id, SHARDS) for item in response.items} <= {0, 1}, fault
            assert response.index_version == shard_set.version
            assert _counter("vitrine_partial_responses_total", labels) == before + 1
        print(f"\nRecommend with shard 2 hung / killed (caller deadline 5 s): {outcomes} ms, partial answers")
    finally:
        ranking.stop()
        process.kill()
        process.wait(timeout=30)


def test_all_shards_down_falls_back_to_popular_items(artifacts: BuiltArtifacts, dataset: Dataset) -> None:
    ranking = _ranking(artifacts, [_dead_target() for _ in range(SHARDS)], retrieval_timeout_s=0.5)
    try:
        response = _recommend(ranking.port, users_by_activity(dataset)[0], int(dataset.events.timestamp.max()))
    finally:
        ranking.stop()
    assert (response.degraded, response.partial) == (True, False)
    assert len(response.items) == 20


def test_version_skew_keeps_the_majority_version(
    shard_set: ShardSet, dataset: Dataset, tmp_path: Path, settings: VitrineSettings
) -> None:
    """Mid-rollout, a shard serving another build's version lives in another vector space:
    its answer is left out (partial, reason version_skew) rather than merged."""
    name = shard_artifact_name("index", 1, SHARDS)
    newer = new_version()
    shutil.copytree(shard_set.root / name / shard_set.version, tmp_path / name / newer)
    set_current(tmp_path, name, newer)
    newer_shard = start_retrieval_server(
        RetrievalSettings(
            artifacts=tmp_path, port=0, metrics_port=None, text_queries=False, shard=1, shards=SHARDS, reload_poll_s=0
        ),
        settings.embedding,
    )
    targets = [shard_set.targets[0], f"127.0.0.1:{newer_shard.port}", shard_set.targets[2]]
    sharded = ShardedRetrievalClient(targets, query_share=0.4, service="tests")
    try:
        answer = sharded.by_user(users_by_activity(dataset)[2], N, [], TIMEOUT_S)
    finally:
        sharded.close()
        newer_shard.stop()
    assert answer.partial_reason == PARTIAL_VERSION_SKEW
    assert answer.index_version == shard_set.version
    assert {shard_of(item_id, SHARDS) for item_id in answer.item_ids} <= {0, 2}


# -- configuration ------------------------------------------------------------------------------


def test_a_server_refuses_the_artifact_of_another_shard(
    shard_set: ShardSet, tmp_path: Path, settings: VitrineSettings
) -> None:
    """Shard 0's files under shard 1's name must not be served as shard 1."""
    root = tmp_path / "mislabelled"
    shutil.copytree(shard_set.root / shard_artifact_name("index", 0, SHARDS), root / shard_artifact_name("index", 1, 3))
    with pytest.raises(ArtifactError, match="holds shard 0 of 3, but this server is configured for shard 1 of 3"):
        start_retrieval_server(
            RetrievalSettings(artifacts=root, port=0, metrics_port=None, text_queries=False, shard=1, shards=SHARDS),
            settings.embedding,
        )


def test_shard_settings_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITRINE_RETRIEVAL__SHARD", "3")
    monkeypatch.setenv("VITRINE_RETRIEVAL__SHARDS", "3")
    with pytest.raises(SettingsError, match=r"retrieval\.shard must be below retrieval\.shards"):
        load_settings()
    monkeypatch.setenv("VITRINE_RETRIEVAL__SHARD", "2")
    monkeypatch.setenv("VITRINE_RANKING__RETRIEVAL_SHARDS", '["shard-0:50051", "shard-1:50051", "shard-2:50051"]')
    loaded = load_settings()
    assert (loaded.retrieval.shard, loaded.retrieval.shards) == (2, 3)
    assert loaded.ranking.retrieval_shards == ["shard-0:50051", "shard-1:50051", "shard-2:50051"]
    monkeypatch.setenv("VITRINE_RANKING__RETRIEVAL_SHARDS", '["shard-0:50051", ""]')
    with pytest.raises(SettingsError, match="retrieval_shards"):
        load_settings()
