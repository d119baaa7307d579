"""End to end through the real CLI: datagen -> build (real text model) -> two server processes.

This is `make demo` on a small catalogue: the services run as separate processes on
free loopback ports and are called through real stubs, then stopped with SIGTERM.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from shared.commands import server_process, vitrine_command
from shared.config import VitrineSettings
from shared.data import load_dataset
from shared.proto.vitrine.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc


@dataclass(frozen=True)
class Deployment:
    data: Path
    artifacts: Path
    retrieval: retrieval_pb2_grpc.RetrievalStub
    ranking: ranking_pb2_grpc.RankingStub


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(vitrine_command(*args), capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("e2e")
    data, artifacts = work / "data", work / "artifacts"
    generated = _cli("datagen", "--out", str(data), "--items", "1200", "--users", "400", "--events", "30000")
    assert generated.returncode == 0, generated.stderr
    built = _cli("build", "--data", str(data), "--out", str(artifacts))
    assert built.returncode == 0, built.stderr[-3000:]
    with (
        server_process(
            vitrine_command("serve", "retrieval", "--artifacts", str(artifacts)), work / "r.port", work / "r.log"
        ) as retrieval_port,
        server_process(
            vitrine_command(
                "serve", "ranking", "--artifacts", str(artifacts), "--retrieval", f"127.0.0.1:{retrieval_port}"
            ),
            work / "k.port",
            work / "k.log",
        ) as ranking_port,
        grpc.insecure_channel(f"127.0.0.1:{retrieval_port}") as r,
        grpc.insecure_channel(f"127.0.0.1:{ranking_port}") as k,
    ):
        yield Deployment(data, artifacts, retrieval_pb2_grpc.RetrievalStub(r), ranking_pb2_grpc.RankingStub(k))


def test_artifacts_are_versioned_with_manifests(deployment: Deployment) -> None:
    for name in ("index", "index-train", "ranker"):
        version = (deployment.artifacts / name / "CURRENT").read_text().strip()
        assert (deployment.artifacts / name / version / "manifest.json").is_file()


def test_a_next_event_build_fits_no_sessions_and_decays_popularity(deployment: Deployment) -> None:
    """`vitrine build` on the default (global) label split: the ranker learns what comes
    next, a task sessions do not help (ItemModelSettings.for_label_split)."""
    for name in ("index", "index-train"):
        params = _manifest(deployment.artifacts, name)["params"]
        assert params["item_model_l2"] is not None  # there is an item model...
        assert params["item_model_session_gap_s"] is None  # ...fitted without sessions
        assert params["build"]["item_model"]["session_weight"] == 0.0
        # What is popular now predicts what comes next: popularity decays.
        assert params["build"]["popularity_half_life_days"] == VitrineSettings().index_build.popularity_half_life_days
    ranker = _manifest(deployment.artifacts, "ranker")["params"]
    assert ranker["item_model"]["session_weight"] == ranker["ranker_build"]["item_model"]["session_weight"] == 0.0


def _manifest(artifacts: Path, name: str) -> dict[str, Any]:
    version = (artifacts / name / "CURRENT").read_text().strip()
    manifest: dict[str, Any] = json.loads((artifacts / name / version / "manifest.json").read_text())
    return manifest


def test_recommend_over_grpc_between_processes(deployment: Deployment) -> None:
    dataset = load_dataset(deployment.data)
    user = str(dataset.users.user_ids[dataset.events.user_index[-1]])
    response = deployment.ranking.Recommend(
        ranking_pb2.RecommendRequest(
            user_id=user, k=10, context=ranking_pb2.RequestContext(timestamp=int(dataset.events.timestamp.max()))
        ),
        timeout=30,
    )
    assert len({item.item_id for item in response.items}) == 10
    assert all(item.reason for item in response.items)


def test_free_text_query_uses_the_real_model(deployment: Deployment) -> None:
    dataset = load_dataset(deployment.data)
    response = deployment.retrieval.Retrieve(
        retrieval_pb2.RetrieveRequest(text="black leather handbag", n=10), timeout=60
    )
    found = {c.item_id for c in response.candidates}
    categories = dataset.catalog.categories[[i in found for i in dataset.catalog.item_ids.tolist()]]
    share = float((categories == "handbags").mean())
    assert share >= 0.7, f"'black leather handbag' found categories {sorted(set(categories.tolist()))}"


def test_cli_reports_bad_settings_clearly(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("ranking:\n  max_k: -1\n")
    completed = subprocess.run(
        [sys.executable, "-m", "shared.cli", "serve", "ranking", "--artifacts", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"VITRINE_CONFIG": str(config), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert completed.returncode == 2
    assert "max_k" in completed.stderr
