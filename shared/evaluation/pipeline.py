"""Vitrine itself under evaluation, through its real services.

The train part becomes a dataset directory; ``vitrine build`` makes the artifacts from it
(ranker labels come from a later time window of train, so the ranker never sees test
data); two more indexes are built with one half of the fused vector switched off. Each
index is served by a retrieval process, the full pipeline by a ranking process, and every
evaluated user is asked for over gRPC, exactly as a client would.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import lightgbm
import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from shared.artifacts import open_current
from shared.commands import NO_TEXT_QUERIES, run_build, run_step, server_process, vitrine_command
from shared.data import save_dataset
from shared.evaluation.protocols import Split
from shared.proto.vitrine.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc

CALL_TIMEOUT_S = 30.0
# name -> (index artifact name, build-index flags)
RETRIEVAL_VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "vitrine-retrieval-fused": ("index", ()),
    "vitrine-retrieval-content": ("index-content", ("--collaborative-weight", "0")),
    "vitrine-retrieval-collaborative": ("index-collaborative", ("--content-weight", "0")),
}
FUSED = "vitrine-retrieval-fused"
# The fused index under the configured candidate mix (retrieval.sources), asked for as many
# candidates as the ranking service asks for: what the ranker sees.
SOURCES = "vitrine-retrieval-sources"
SOURCE_CANDIDATES = 300
# The ranking server lives for one pass over the evaluated users: compiling its trees
# (lleaves, 20 s of a core here) would only compete with those requests, and the compiled
# trees score exactly as LightGBM does (ranking.compiled_trees).
LIGHTGBM_SCORING = {"VITRINE_RANKING__COMPILED_TREES": "false"}
# The per-index rows measure one ANN search each: the fused source alone.
FUSED_ONLY = [retrieval_pb2.SourceQuota(source="fused", share=1.0)]


@dataclass
class VitrineLists:
    """What Vitrine answered for every user (item rows, best first)."""

    # method name -> per user row: top-k list (empty for users not evaluated)
    top_k: dict[str, list[npt.NDArray[np.int32]]] = field(default_factory=dict)
    # per user row: the fused index's candidates (longest N asked for)
    candidates: list[npt.NDArray[np.int32]] = field(default_factory=list)
    # per user row: the candidates of the configured mix (SOURCE_CANDIDATES of them)
    source_candidates: list[npt.NDArray[np.int32]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    build_seconds: float = 0.0
    degraded: int = 0
    feature_importance: dict[str, float] = field(default_factory=dict)


def run_vitrine(split: Split, workdir: Path, k: int, max_candidates: int) -> VitrineLists:
    data_dir = workdir / "train-data"
    artifacts = workdir / "artifacts"
    save_dataset(split.train_at_request(), data_dir)
    started = time.perf_counter()
    # The ranker learns the task the protocol poses: fill random gaps in a user's history
    # (random) or predict what comes after a time cutoff (temporal).
    label_split = "random" if split.protocol == "random" else "global"
    run_build(data_dir, artifacts, label_split=label_split)
    for index_name, flags in RETRIEVAL_VARIANTS.values():
        if index_name != "index":
            run_step(
                "build-index", "--data", str(data_dir), "--out", str(artifacts), "--name", index_name, *flags,
                "--label-split", label_split,
            )  # fmt: skip
    lists = VitrineLists(build_seconds=time.perf_counter() - started)
    lists.feature_importance = _feature_importance(artifacts)
    with _services(artifacts, workdir / "logs") as (retrieval_ports, ranking_port):
        _ask_retrieval(split, retrieval_ports, k, max_candidates, lists)
        _ask_ranking(split, ranking_port, k, lists)
    return lists


@contextmanager
def _services(artifacts: Path, logs: Path) -> Iterator[tuple[dict[str, int], int]]:
    with ExitStack() as stack:
        ports = {
            method: stack.enter_context(
                server_process(
                    vitrine_command("serve", "retrieval", "--artifacts", str(artifacts), "--index-name", index_name),
                    logs / f"{index_name}.port",
                    logs / f"{index_name}.log",
                    env=NO_TEXT_QUERIES,
                )
            )
            for method, (index_name, _) in RETRIEVAL_VARIANTS.items()
        }
        ranking_port = stack.enter_context(
            server_process(
                vitrine_command(
                    "serve", "ranking", "--artifacts", str(artifacts), "--retrieval", f"127.0.0.1:{ports[FUSED]}"
                ),
                logs / "ranking.port",
                logs / "ranking.log",
                env=LIGHTGBM_SCORING,
            )
        )
        yield ports, ranking_port


def _train_item_ids(split: Split, item_ids: list[str]) -> list[list[str]]:
    events = split.train.events
    order = np.argsort(events.user_index, kind="stable")
    users = events.user_index[order]
    bounds = np.searchsorted(users, np.arange(len(split.train.users) + 1))
    return [
        [item_ids[row] for row in np.unique(events.item_index[order[bounds[u] : bounds[u + 1]]]).tolist()]
        for u in range(len(split.train.users))
    ]


def _ask_retrieval(split: Split, ports: dict[str, int], k: int, max_candidates: int, lists: VitrineLists) -> None:
    catalog_ids = split.train.catalog.item_ids.tolist()
    row_of = {item_id: row for row, item_id in enumerate(catalog_ids)}
    seen = _train_item_ids(split, catalog_ids)
    user_ids = split.train.users.user_ids.tolist()
    n_users = len(user_ids)
    empty = np.zeros(0, dtype=np.int32)
    for method, port in [*ports.items(), (SOURCES, ports[FUSED])]:
        top: list[npt.NDArray[np.int32]] = [empty] * n_users
        started = time.perf_counter()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = retrieval_pb2_grpc.RetrievalStub(channel)
            for user in tqdm(split.evaluated_users.tolist(), desc=method, unit="user", mininterval=1.0):
                n = max_candidates if method == FUSED else SOURCE_CANDIDATES if method == SOURCES else k
                response = stub.Retrieve(
                    retrieval_pb2.RetrieveRequest(
                        user_id=user_ids[user],
                        n=n,
                        exclude_item_ids=seen[user],
                        mix=[] if method == SOURCES else FUSED_ONLY,
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                rows = np.asarray([row_of[c.item_id] for c in response.candidates], dtype=np.int32)
                top[user] = rows[:k]
                if method == FUSED:
                    if not lists.candidates:
                        lists.candidates = [empty] * n_users
                    lists.candidates[user] = rows
                if method == SOURCES:
                    if not lists.source_candidates:
                        lists.source_candidates = [empty] * n_users
                    lists.source_candidates[user] = rows
        lists.top_k[method] = top
        lists.seconds[method] = time.perf_counter() - started


def _ask_ranking(split: Split, port: int, k: int, lists: VitrineLists) -> None:
    catalog_ids = split.train.catalog.item_ids.tolist()
    row_of = {item_id: row for row, item_id in enumerate(catalog_ids)}
    seen = _train_item_ids(split, catalog_ids)
    user_ids = split.train.users.user_ids.tolist()
    top: list[npt.NDArray[np.int32]] = [np.zeros(0, dtype=np.int32)] * len(user_ids)
    started = time.perf_counter()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ranking_pb2_grpc.RankingStub(channel)
        context = ranking_pb2.RequestContext(timestamp=split.request_time)
        for user in tqdm(split.evaluated_users.tolist(), desc="vitrine", unit="user", mininterval=1.0):
            response = stub.Recommend(
                ranking_pb2.RecommendRequest(user_id=user_ids[user], k=k, context=context, exclude_item_ids=seen[user]),
                timeout=CALL_TIMEOUT_S,
            )
            lists.degraded += int(response.degraded)
            top[user] = np.asarray([row_of[item.item_id] for item in response.items], dtype=np.int32)
    lists.top_k["vitrine"] = top
    lists.seconds["vitrine"] = time.perf_counter() - started


def _feature_importance(artifacts: Path) -> dict[str, float]:
    """Total gain per ranker feature, from the verified ranker artifact."""
    ranker = open_current(artifacts, "ranker")
    booster = lightgbm.Booster(model_file=str(ranker.file("model.txt")))
    gains = booster.feature_importance(importance_type="gain")
    return {name: float(gain) for name, gain in zip(booster.feature_name(), gains, strict=True)}
