"""Operability and fault tests: reflection, metrics, rich errors, hot reload under load,
refused artifacts, load shedding, SIGTERM under load.

Each test is bounded in time. The servers here run on a private copy of the artifact
root, so reloading them does not disturb the session-wide servers of other tests.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from pydantic import SecretStr

from ranking_service.server import start_ranking_server
from retrieval_service.server import start_retrieval_server
from shared.artifacts import MANIFEST, Artifact, ArtifactWriter, open_artifact, set_current
from shared.commands import server_process, vitrine_command
from shared.config import EmbeddingSettings, RankingSettings, RetrievalSettings, ServerSettings, load_settings
from shared.data import Dataset
from shared.grpc_server import RunningServer, serve_until_signalled, start_server
from shared.proto.vitrine.v1 import admin_pb2, admin_pb2_grpc, ranking_pb2, ranking_pb2_grpc
from shared.reloading import Reloadable
from shared.security import AuthSettings, ClientTlsSettings, TlsSettings, call_credentials_metadata, open_channel
from tests.conftest import BuiltArtifacts, Servers, users_by_activity
from tests.pki import make_pki

INDEX_KIND = "vitrine.retrieval-index"
RANKER_KIND = "vitrine.ranker"


def copy_version(
    root: Path, name: str, kind: str, mutate: Callable[[Path], None] | None = None, make_current: bool = False
) -> Artifact:
    """A new version of an artifact with the current files, optionally changed before the manifest is written."""
    source = open_artifact(root, name, kind)
    writer = ArtifactWriter(root, name)
    for relative in source.manifest["files"]:
        shutil.copy2(source.path / relative, writer.path(relative))
    if mutate is not None:
        mutate(writer.staging)
    return writer.commit(kind, source.params, source.metrics, make_current=make_current)


@dataclass
class Deployment:
    root: Path
    retrieval: RunningServer
    ranking: RunningServer
    ranking_stub: ranking_pb2_grpc.RankingStub
    ranking_admin: admin_pb2_grpc.AdminStub
    retrieval_admin: admin_pb2_grpc.AdminStub
    now: int
    users: list[str]


@pytest.fixture(scope="module")
def deployment(
    artifacts: BuiltArtifacts, dataset: Dataset, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("ops") / "artifacts"
    shutil.copytree(artifacts.root, root)
    # Reloads here are driven by the Admin RPC; the directory watcher has its own test.
    retrieval = start_retrieval_server(
        RetrievalSettings(artifacts=root, port=0, metrics_port=None, text_queries=False, reload_poll_s=0),
        EmbeddingSettings(),
    )
    ranking = start_ranking_server(
        RankingSettings(
            artifacts=root,
            port=0,
            metrics_port=0,
            retrieval_target=f"127.0.0.1:{retrieval.port}",
            reload_poll_s=0,
            compiled_trees=False,
            max_concurrent_rpcs=16,
            workers=16,
        )
    )
    with (
        grpc.insecure_channel(f"127.0.0.1:{ranking.port}") as k,
        grpc.insecure_channel(f"127.0.0.1:{retrieval.port}") as r,
    ):
        yield Deployment(
            root=root,
            retrieval=retrieval,
            ranking=ranking,
            ranking_stub=ranking_pb2_grpc.RankingStub(k),
            ranking_admin=admin_pb2_grpc.AdminStub(k),
            retrieval_admin=admin_pb2_grpc.AdminStub(r),
            now=int(dataset.events.timestamp.max()) + 60,
            users=users_by_activity(dataset)[:50],
        )
    ranking.stop()
    retrieval.stop()


def _request(deployment: Deployment, index: int, k: int = 10) -> ranking_pb2.RecommendRequest:
    return ranking_pb2.RecommendRequest(
        user_id=deployment.users[index % len(deployment.users)],
        k=k,
        context=ranking_pb2.RequestContext(timestamp=deployment.now),
    )


class LoadGenerator:
    """Client threads sending Recommend back to back until stopped; records every outcome."""

    def __init__(self, call: Callable[[int], ranking_pb2.RecommendResponse], threads: int) -> None:
        self._call = call
        self._stop = threading.Event()
        self.outcomes: Counter[str] = Counter()
        # (monotonic start time, outcome) of every failed call
        self.failures: list[tuple[float, str]] = []
        self.versions: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def _run(self, worker: int) -> None:
        sent = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = self._call(worker * 1000 + sent)
                outcome = "OK"
                with self._lock:
                    self.versions.add((response.model_version, response.index_version))
            except grpc.RpcError as error:
                outcome = error.code().name
                with self._lock:
                    self.failures.append((started, outcome))
            with self._lock:
                self.outcomes[outcome] += 1
            sent += 1

    def __enter__(self) -> LoadGenerator:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


# -- operability ---------------------------------------------------------------------------


def test_grpcurl_lists_describes_and_calls_through_reflection(deployment: Deployment) -> None:
    grpcurl = shutil.which("grpcurl") or str(Path(vitrine_command()[0]).parent / "grpcurl")
    address = f"127.0.0.1:{deployment.ranking.port}"

    def run(*args: str) -> str:
        completed = subprocess.run(
            [grpcurl, "-plaintext", "-max-time", "20", *args], capture_output=True, text=True, timeout=30, check=False
        )
        assert completed.returncode == 0, completed.stderr
        return completed.stdout

    services = run(address, "list").split()
    assert {"vitrine.v1.Ranking", "vitrine.v1.Admin", "grpc.health.v1.Health"} <= set(services)
    assert "rpc Recommend ( .vitrine.v1.RecommendRequest )" in run(address, "describe", "vitrine.v1.Ranking")
    assert "int32 k = 2;" in run(address, "describe", "vitrine.v1.RecommendRequest")
    body = json.dumps({"user_id": deployment.users[0], "k": 3, "context": {"timestamp": deployment.now}})
    answer = json.loads(run("-d", body, address, "vitrine.v1.Ranking/Recommend"))
    assert len(answer["items"]) == 3
    health = json.loads(run("-d", '{"service": "vitrine.v1.Ranking"}', address, "grpc.health.v1.Health/Check"))
    assert health["status"] == "SERVING"


def test_prometheus_metrics_cover_rpcs_stages_and_versions(deployment: Deployment) -> None:
    deployment.ranking_stub.Recommend(_request(deployment, 0), timeout=10)
    with pytest.raises(grpc.RpcError):
        deployment.ranking_stub.Recommend(ranking_pb2.RecommendRequest(user_id="u", k=0), timeout=10)
    port = deployment.ranking.metrics_port
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'vitrine_grpc_requests_total{code="OK",method="Recommend",service="vitrine.v1.Ranking"}' in text
    assert 'code="INVALID_ARGUMENT",method="Recommend"' in text
    assert 'vitrine_grpc_request_seconds_bucket{le="0.05",method="Recommend"' in text
    for stage in ("retrieve", "features", "predict", "rules"):
        assert f'stage="{stage}"' in text
    assert "vitrine_candidates_per_request_count" in text
    version = admin_status(deployment.ranking_admin).serving.version
    assert f'vitrine_artifact_info{{artifact="ranker",service="vitrine.v1.Ranking",version="{version}"}} 1.0' in text


def test_invalid_argument_carries_bad_request_field_violations(servers: Servers) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        servers.ranking.Recommend(ranking_pb2.RecommendRequest(user_id="u", k=0), timeout=5)
    # The raised RpcError is also the grpc.Call that carries the trailing metadata.
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "k"
    assert "between 1 and" in bad_request.field_violations[0].description


# -- hot reload ------------------------------------------------------------------------------


def admin_status(stub: admin_pb2_grpc.AdminStub) -> admin_pb2.ServerStatus:
    return stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)


def test_reload_index_and_ranker_under_load_fails_no_request(deployment: Deployment) -> None:
    root = deployment.root
    original = {
        "ranker": admin_status(deployment.ranking_admin).serving.version,
        "index": admin_status(deployment.retrieval_admin).serving.version,
    }
    alternates = {
        "ranker": copy_version(root, "ranker", RANKER_KIND).version,
        "index": copy_version(root, "index", INDEX_KIND).version,
    }
    reloads = 0
    with LoadGenerator(lambda n: deployment.ranking_stub.Recommend(_request(deployment, n), timeout=10), 4) as load:
        for round_ in range(6):
            target = alternates if round_ % 2 == 0 else original
            for stub, name in ((deployment.ranking_admin, "ranker"), (deployment.retrieval_admin, "index")):
                response = stub.ReloadArtifacts(admin_pb2.ReloadArtifactsRequest(version=target[name]), timeout=60)
                assert response.reloaded
                assert response.serving.version == target[name]
                reloads += 1
            time.sleep(0.2)
    assert reloads == 12
    assert load.outcomes["OK"] > 50
    assert set(load.outcomes) == {"OK"}, load.outcomes
    served_models = {model for model, _ in load.versions}
    served_indexes = {index for _, index in load.versions}
    assert served_models == {original["ranker"], alternates["ranker"]}
    assert served_indexes == {original["index"], alternates["index"]}
    print(f"\nreload under load: {reloads} swaps, {load.outcomes['OK']} requests, 0 failed")


def _truncate(name: str) -> Callable[[Path], None]:
    def mutate(staging: Path) -> None:
        path = staging / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return mutate


def _wrong_dimension(staging: Path) -> None:
    vectors = np.load(staging / "item_vectors.npy")
    np.save(staging / "item_vectors.npy", vectors[:, :-8], allow_pickle=False)


def _tamper_after_manifest(version_dir: Path) -> None:
    path = version_dir / "item_ids.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["checksum", "truncated index", "wrong dimension", "missing file"])
def test_corrupt_index_is_refused_and_old_version_keeps_serving(deployment: Deployment, damage: str) -> None:
    serving = admin_status(deployment.retrieval_admin).serving.version
    if damage == "truncated index":
        bad = copy_version(deployment.root, "index", INDEX_KIND, _truncate("index.faiss"))
    elif damage == "wrong dimension":
        bad = copy_version(deployment.root, "index", INDEX_KIND, _wrong_dimension)
    else:
        bad = copy_version(deployment.root, "index", INDEX_KIND)
        if damage == "checksum":
            _tamper_after_manifest(bad.path)
        else:
            (bad.path / "user_vectors.npy").unlink()
    with pytest.raises(grpc.RpcError) as caught:
        deployment.retrieval_admin.ReloadArtifacts(admin_pb2.ReloadArtifactsRequest(version=bad.version), timeout=60)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"{serving} keeps serving" in str(caught.value.details())
    status = admin_status(deployment.retrieval_admin)
    assert status.serving.version == serving
    assert status.refused_reloads >= 1
    response = deployment.ranking_stub.Recommend(_request(deployment, 1), timeout=10)
    assert response.index_version == serving
    assert not response.degraded


def test_corrupt_ranker_is_refused(deployment: Deployment) -> None:
    serving = admin_status(deployment.ranking_admin).serving.version
    bad = copy_version(deployment.root, "ranker", RANKER_KIND, _truncate("model.txt"))
    with pytest.raises(grpc.RpcError) as caught:
        deployment.ranking_admin.ReloadArtifacts(admin_pb2.ReloadArtifactsRequest(version=bad.version), timeout=60)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert deployment.ranking_stub.Recommend(_request(deployment, 2), timeout=10).model_version == serving


@pytest.mark.parametrize("version", ["../../etc", ".staging-x", "no-such-version", "x" * 500])
def test_reload_never_trusts_a_path(deployment: Deployment, version: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        deployment.ranking_admin.ReloadArtifacts(admin_pb2.ReloadArtifactsRequest(version=version), timeout=30)
    assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


def test_directory_watcher_swaps_new_current_and_skips_a_bad_one(artifacts: BuiltArtifacts, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    shutil.copytree(artifacts.root, root)
    retrieval = start_retrieval_server(
        RetrievalSettings(artifacts=root, port=0, metrics_port=None, text_queries=False, reload_poll_s=0.1),
        EmbeddingSettings(),
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{retrieval.port}") as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            good = copy_version(root, "index", INDEX_KIND, make_current=True)
            deadline = time.monotonic() + 20
            while admin_status(admin).serving.version != good.version and time.monotonic() < deadline:
                time.sleep(0.1)
            assert admin_status(admin).serving.version == good.version
            bad = copy_version(root, "index", INDEX_KIND)
            (bad.path / MANIFEST).write_text("{broken")
            set_current(root, "index", bad.version)
            deadline = time.monotonic() + 20
            while admin_status(admin).refused_reloads < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            status = admin_status(admin)
            assert status.refused_reloads == 1
            assert status.serving.version == good.version
            time.sleep(0.5)  # the watcher does not retry the same bad version
            assert admin_status(admin).refused_reloads == 1
    finally:
        retrieval.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_killed_retrieval_degrades_then_recovers_without_restarting_ranking(
    artifacts: BuiltArtifacts, dataset: Dataset, tmp_path: Path
) -> None:
    port = _free_port()
    argv = [
        *vitrine_command("serve", "retrieval", "--artifacts", str(artifacts.root)),
        "--port",
        str(port),
        "--metrics-port",
        "0",
    ]
    env = {**os.environ, "VITRINE_RETRIEVAL__TEXT_QUERIES": "false"}

    def start_retrieval() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
        return process

    retrieval = start_retrieval()
    ranking = start_ranking_server(
        RankingSettings(
            artifacts=artifacts.root,
            port=0,
            metrics_port=None,
            retrieval_target=f"127.0.0.1:{port}",
            reload_poll_s=0,
            compiled_trees=False,
        )
    )
    now = int(dataset.events.timestamp.max())
    users = users_by_activity(dataset)
    phases: dict[str, Counter[str]] = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ranking.port}") as channel:
            stub = ranking_pb2_grpc.RankingStub(channel)

            def run_phase(name: str, seconds: float) -> None:
                outcomes: Counter[str] = Counter()
                end = time.monotonic() + seconds
                n = 0
                while time.monotonic() < end:
                    request = ranking_pb2.RecommendRequest(
                        user_id=users[n % 40], k=10, context=ranking_pb2.RequestContext(timestamp=now)
                    )
                    try:
                        response = stub.Recommend(request, timeout=5)
                        outcomes["degraded" if response.degraded else "normal"] += 1
                    except grpc.RpcError as error:
                        outcomes[error.code().name] += 1
                    n += 1
                phases[name] = outcomes

            run_phase("before", 1.0)
            retrieval.kill()
            retrieval.wait(timeout=10)
            run_phase("retrieval killed", 2.0)
            retrieval = start_retrieval()
            time.sleep(1.5)  # reconnect backoff is at most 1 s
            run_phase("restarted", 1.0)
    finally:
        ranking.stop()
        retrieval.kill()
        retrieval.wait(timeout=10)
    assert set(phases["before"]) == {"normal"}, phases
    assert set(phases["retrieval killed"]) == {"degraded"}, phases
    assert set(phases["restarted"]) == {"normal"}, phases
    print(f"\nretrieval killed under load: {phases}")


# -- limits ------------------------------------------------------------------------------------


def test_overload_is_shed_with_resource_exhausted(
    artifacts: BuiltArtifacts, servers: Servers, dataset: Dataset
) -> None:
    ranking = start_ranking_server(
        RankingSettings(
            artifacts=artifacts.root,
            port=0,
            metrics_port=None,
            retrieval_target=f"127.0.0.1:{servers.retrieval_server.port}",
            max_concurrent_rpcs=2,
            compiled_trees=False,
            workers=2,
            reload_poll_s=0,
        )
    )
    now = int(dataset.events.timestamp.max())
    users = users_by_activity(dataset)
    latencies: list[float] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ranking.port}") as channel:
            stub = ranking_pb2_grpc.RankingStub(channel)

            def call(n: int) -> str:
                request = ranking_pb2.RecommendRequest(
                    user_id=users[n % 50], k=20, context=ranking_pb2.RequestContext(timestamp=now)
                )
                started = time.perf_counter()
                try:
                    stub.Recommend(request, timeout=10)
                except grpc.RpcError as error:
                    return str(error.code().name)
                latencies.append(time.perf_counter() - started)
                return "OK"

            with ThreadPoolExecutor(max_workers=10) as pool:  # 5x the admitted concurrency
                outcomes = Counter(pool.map(call, range(200)))
    finally:
        ranking.stop()
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}, outcomes
    assert outcomes["RESOURCE_EXHAUSTED"] > 0
    assert outcomes["OK"] > 0
    p99 = float(np.percentile(latencies, 99))
    assert p99 < 2.0, f"admitted requests' p99 {p99:.3f}s"
    print(f"\noverload 5x: {dict(outcomes)}, admitted p99 {p99 * 1000:.1f} ms")


# -- shutdown ----------------------------------------------------------------------------------


def test_sigterm_under_load_drains_in_flight_requests(
    artifacts: BuiltArtifacts, servers: Servers, dataset: Dataset, tmp_path: Path
) -> None:
    port_file = tmp_path / "ranking.port"
    with (tmp_path / "ranking.log").open("wb") as log:
        process = subprocess.Popen(
            [
                *vitrine_command("serve", "ranking", "--artifacts", str(artifacts.root)),
                "--retrieval",
                f"127.0.0.1:{servers.retrieval_server.port}",
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--port-file",
                str(port_file),
            ],
            stdout=log,
            stderr=log,
            # A compile of the trees may run when SIGTERM comes: the exit must wait for it.
            env={**os.environ, "VITRINE_RANKING__COMPILED_TREES": "true"},
        )
        try:
            deadline = time.monotonic() + 120
            while not port_file.exists() and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.1)
            assert port_file.exists(), (tmp_path / "ranking.log").read_text()[-2000:]
            now = int(dataset.events.timestamp.max())
            users = users_by_activity(dataset)
            with grpc.insecure_channel(f"127.0.0.1:{int(port_file.read_text())}") as channel:
                stub = ranking_pb2_grpc.RankingStub(channel)
                request = ranking_pb2.RecommendRequest(
                    user_id=users[0], k=20, context=ranking_pb2.RequestContext(timestamp=now)
                )
                with LoadGenerator(lambda n: stub.Recommend(request, timeout=10), 4) as load:
                    time.sleep(1.0)
                    signalled_at = time.monotonic()
                    process.send_signal(signal.SIGTERM)
                    exit_code = process.wait(timeout=30)
                    time.sleep(0.2)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert exit_code == 0
    assert load.outcomes["OK"] > 10
    # Every call sent before the signal completed: in-flight work is drained, not dropped.
    # Calls sent after it are refused (UNAVAILABLE, or CANCELLED when one races the
    # server's GOAWAY); 50 ms of slack covers a call still in the client's send path.
    dropped = [outcome for started, outcome in load.failures if started < signalled_at - 0.05]
    assert not dropped, dropped
    assert set(load.outcomes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, load.outcomes
    print(f"\nSIGTERM under load: {dict(load.outcomes)}, 0 calls sent before the signal failed")


def test_a_signal_received_by_another_thread_still_stops_the_server() -> None:
    """The kernel may hand SIGTERM to any thread of the process (gRPC's, a compile's); the
    main thread, waiting for it, must still notice within a moment and stop the server."""
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    health_servicer = health.HealthServicer()
    running = RunningServer(server, health_servicer, "signal-test", port, grace_period_s=0.1)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}

    main_thread = threading.get_ident()

    def signal_this_thread() -> None:
        time.sleep(0.3)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        if not running.stopping.wait(10):  # unnoticed: wake the main thread so the test fails, not hangs
            signal.pthread_kill(main_thread, signal.SIGTERM)

    other = threading.Thread(target=signal_this_thread)
    started = time.monotonic()
    other.start()
    try:
        serve_until_signalled(running)  # returns once the handler ran and the server stopped
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        other.join()
        server.stop(None)
    assert time.monotonic() - started < 5
    assert running.stopping.is_set()


# -- start-up ------------------------------------------------------------------------------------


class _LoadedVersion:
    """A served object holding a reference cycle, as loaded artifacts often do."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.itself = self


def _collector_sees(target: object) -> bool:
    return any(tracked is target for tracked in gc.get_objects())


# A stand-in "server" for the supervisor: writes its port file, then sleeps, SIGTERM ignored.
STUBBORN_SERVER = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if sys.argv[1] == "serve":
    port_file = sys.argv[sys.argv.index("--port-file") + 1]
    open(port_file, "w").write("12345")
time.sleep(60)
"""


def test_the_supervisor_waits_as_its_settings_say(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """server_process (build, demo, evaluate) waits supervisor.start_timeout_s for a server to
    serve, and its stop budget plus supervisor.stop_margin_s after SIGTERM before SIGKILL."""
    monkeypatch.setenv("VITRINE_SUPERVISOR__START_TIMEOUT_S", "1")
    monkeypatch.setenv("VITRINE_SUPERVISOR__STOP_MARGIN_S", "0.5")
    monkeypatch.setenv("VITRINE_RETRIEVAL__GRACE_PERIOD_S", "0.5")
    monkeypatch.setenv("VITRINE_RANKING__GRACE_PERIOD_S", "0.5")
    monkeypatch.setenv("VITRINE_RANKING__EXIT_COMPILE_WAIT_S", "1")
    monkeypatch.setenv("VITRINE_RANKING__COMPILED_TREES", "true")  # conftest turns it off
    settings = load_settings()
    assert settings.server_stop_budget_s == 1.5  # ranking: grace + compile wait
    assert (
        settings.model_copy(
            update={"ranking": settings.ranking.model_copy(update={"compiled_trees": False})}
        ).server_stop_budget_s
        == 0.5
    )

    left_at: list[float] = []

    def serve_and_leave(mode: str) -> None:
        argv = [sys.executable, "-c", STUBBORN_SERVER, mode]
        with server_process(argv, tmp_path / f"{mode}.port", tmp_path / f"{mode}.log") as port:
            assert port == 12345
            left_at.append(time.monotonic())

    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"not serving after 1\.0s"):
        serve_and_leave("never")
    assert time.monotonic() - started < 10
    with pytest.raises(RuntimeError, match="exited with -9 on SIGTERM"):
        serve_and_leave("serve")
    assert 1.9 < time.monotonic() - left_at[0] < 10  # SIGKILL after 1.5 + 0.5 s, not 30 s as before


def test_loaded_artifacts_are_frozen_and_a_swap_frees_the_replaced_version() -> None:
    """After the initial load the served objects leave the collector's generations
    (gc.freeze). A swap forces no collection: it unfreezes, the next full collection frees
    a replaced version held only by a cycle, and the heap is frozen again right after."""
    pointer = {"version": "v1"}
    loaded: list[weakref.ref[_LoadedVersion]] = []

    def load(version: str | None) -> _LoadedVersion:
        served_object = _LoadedVersion(version or pointer["version"])
        loaded.append(weakref.ref(served_object))
        return served_object

    served: Reloadable[_LoadedVersion] = Reloadable(
        "test.Heap", "thing", load, lambda value: value.version, lambda: pointer["version"]
    )
    running = start_server("test.Heap", lambda server: None, ServerSettings(port=0, reload_poll_s=0), served)
    try:
        assert not _collector_sees(served.get())
        assert gc.get_freeze_count() > 0
        pointer["version"] = "v2"
        collections: list[int] = []
        gc.callbacks.append(lambda phase, info: collections.append(info["generation"]) if phase == "stop" else None)
        gc.disable()  # no automatic collection may run in between: only the swap's own
        try:
            assert served.reload().reloaded
            assert not collections  # the swap itself collected nothing
            assert gc.get_freeze_count() == 0
            assert loaded[0]() is not None  # a cycle: only a collection frees it
        finally:
            gc.enable()
            gc.callbacks.pop()
        gc.collect()  # the collector's next full collection, whenever it comes
        assert loaded[0]() is None
        assert served.get().version == "v2"
        assert gc.get_freeze_count() > 0
        assert not _collector_sees(served.get())
    finally:
        running.stop()
    assert gc.get_freeze_count() == 0  # a stopped server leaves nothing frozen


def test_heap_freezing_can_be_turned_off() -> None:
    served: Reloadable[_LoadedVersion] = Reloadable(
        "test.Heap", "thing", lambda version: _LoadedVersion("v1"), lambda value: value.version, lambda: "v1"
    )
    settings = ServerSettings(port=0, reload_poll_s=0, freeze_heap_after_load=False)
    running = start_server("test.Heap", lambda server: None, settings, served)
    try:
        assert _collector_sees(served.get())
        assert gc.get_freeze_count() == 0
    finally:
        running.stop()


def test_health_is_not_serving_while_artifacts_load(tmp_path: Path) -> None:
    """The server listens before loading: probes see NOT_SERVING, then SERVING once loaded."""
    release = threading.Event()

    def load(version: str | None) -> str:
        assert release.wait(timeout=30)
        return version or "v1"

    served: Reloadable[str] = Reloadable("test.Loading", "thing", load, lambda value: value, lambda: "v1")
    port = _free_port()
    started: list[RunningServer] = []
    starter = threading.Thread(
        target=lambda: started.append(
            start_server("test.Loading", lambda server: None, ServerSettings(port=port, reload_poll_s=0), served)
        )
    )
    starter.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="test.Loading")
            assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert admin_status(admin_pb2_grpc.AdminStub(channel)).serving.version == ""
            release.set()
            starter.join(timeout=30)
            assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            assert admin_status(admin_pb2_grpc.AdminStub(channel)).serving.version == "v1"
    finally:
        release.set()
        starter.join(timeout=30)
        for running in started:
            running.stop()


def test_failed_initial_load_stops_the_server(tmp_path: Path) -> None:
    def load(version: str | None) -> str:
        raise FileNotFoundError("no artifacts here")

    served: Reloadable[str] = Reloadable("test.Broken", "thing", load, lambda value: value, lambda: "v1")
    port = _free_port()
    with pytest.raises(FileNotFoundError):
        start_server("test.Broken", lambda server: None, ServerSettings(port=port, reload_poll_s=0), served)
    with socket.socket() as probe:  # the port is free again: nothing half-alive is left listening
        probe.bind(("127.0.0.1", port))


# -- security ------------------------------------------------------------------------------------


def test_mutual_tls_and_tokens_across_both_services(
    artifacts: BuiltArtifacts, dataset: Dataset, tmp_path: Path
) -> None:
    """Retrieval: mTLS + token on every call. Ranking: TLS to clients, mTLS + token to
    retrieval, token on Admin. A correct client gets real (not degraded) answers."""
    pki = make_pki(tmp_path)
    retrieval_token, admin_token = "retrieval-token-0123456789", "admin-token-0123456789"
    retrieval = start_retrieval_server(
        RetrievalSettings(
            artifacts=artifacts.root,
            port=0,
            metrics_port=None,
            text_queries=False,
            reload_poll_s=0,
            tls=TlsSettings(cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca),
            auth=AuthSettings(token=SecretStr(retrieval_token), require_for_all=True),
        ),
        EmbeddingSettings(),
    )
    ranking = start_ranking_server(
        RankingSettings(
            artifacts=artifacts.root,
            port=0,
            metrics_port=None,
            reload_poll_s=0,
            retrieval_target=f"localhost:{retrieval.port}",
            compiled_trees=False,
            retrieval_tls=ClientTlsSettings(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key),
            retrieval_token=SecretStr(retrieval_token),
            tls=TlsSettings(cert_file=pki.server_cert, key_file=pki.server_key),
            auth=AuthSettings(token=SecretStr(admin_token)),
        )
    )
    request = ranking_pb2.RecommendRequest(
        user_id=users_by_activity(dataset)[0],
        k=5,
        context=ranking_pb2.RequestContext(timestamp=int(dataset.events.timestamp.max())),
    )
    try:
        with open_channel(f"localhost:{ranking.port}", ClientTlsSettings(ca_file=pki.ca)) as channel:
            response = ranking_pb2_grpc.RankingStub(channel).Recommend(request, timeout=10)
            assert len(response.items) == 5
            assert not response.degraded  # ranking -> retrieval over mTLS with the token worked
            admin = admin_pb2_grpc.AdminStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as caught:
                admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10, metadata=call_credentials_metadata("x" * 20))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "x" * 20 not in str(caught.value.details())
            status = admin.GetStatus(
                admin_pb2.GetStatusRequest(), timeout=10, metadata=call_credentials_metadata(admin_token)
            )
            assert status.serving.version
        with grpc.insecure_channel(f"127.0.0.1:{ranking.port}") as plaintext:
            with pytest.raises(grpc.RpcError) as caught:
                ranking_pb2_grpc.RankingStub(plaintext).Recommend(request, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # Retrieval refuses a client with the right CA but no client certificate.
        with open_channel(f"localhost:{retrieval.port}", ClientTlsSettings(ca_file=pki.ca)) as no_cert:
            with pytest.raises(grpc.RpcError) as caught:
                admin_pb2_grpc.AdminStub(no_cert).GetStatus(
                    admin_pb2.GetStatusRequest(), timeout=5, metadata=call_credentials_metadata(retrieval_token)
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        ranking.stop()
        retrieval.stop()
