"""Run scenarios headless: one locust process per scenario, against any reachable target.

Locust monkey-patches the interpreter with gevent on import, so it never runs inside
this process (nor inside a test process that hosts gRPC servers on threads): each
scenario is ``python -m locust -f deploy/loadtest/locustfile.py --headless`` with the
resolved settings in its environment, and its per-call records come back as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.loadtest.channels import open_target_channel, token_metadata
from deploy.loadtest.ids import ids_from_artifacts, read_ids, write_ids
from deploy.loadtest.results import LoadTestReport, ScenarioResult, describe_machine, summarise
from deploy.loadtest.settings import RECORDS_ENV, RESOLVED_ENV, SCENARIO_ENV, LoadTestSettings, Scenario
from shared.logs import event
from shared.proto.vitrine.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from shared.security import ClientTlsSettings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
RANKING_SERVICE = "vitrine.v1.Ranking"
RETRIEVAL_SERVICE = "vitrine.v1.Retrieval"
# Locust's own start-up (imports, spawning) and shut-down on top of the scenario's length.
LOCUST_OVERHEAD_S = 60.0


class LoadTestError(RuntimeError):
    pass


def wait_serving(
    target: str, service: str, tls: ClientTlsSettings, timeout_s: float, system_roots: bool = False
) -> None:
    """Poll gRPC health until ``service`` at ``target`` reports SERVING (health needs no token)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with open_target_channel(target, tls, system_roots) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as error:
                last = _describe(error)
            time.sleep(0.2)
    raise LoadTestError(f"{target} {service}: not SERVING after {timeout_s:.0f}s (last: {last})")


def check_targets(settings: LoadTestSettings, scenarios: list[Scenario], timeout_s: float = 30.0) -> None:
    wait_serving(settings.target, RANKING_SERVICE, settings.tls, timeout_s, settings.system_roots)
    if any("SimilarItems" in scenario.rpcs.weights() for scenario in scenarios):
        if settings.retrieval_target is None:
            raise LoadTestError("a scenario calls SimilarItems: set retrieval_target (--retrieval)")
        tls = settings.retrieval_tls or settings.tls
        wait_serving(settings.retrieval_target, RETRIEVAL_SERVICE, tls, timeout_s, settings.system_roots)


def warm_up(settings: LoadTestSettings, scenarios: list[Scenario]) -> None:
    """A few sequential calls of every RPC the scenarios use, before any is measured.

    Fresh processes answer their first calls slowly (lazy initialisation, cold caches);
    a wrong token, certificate or id source shows here as one clear error, not as a
    scenario full of failures.
    """
    ids = read_ids(settings.ids_file) if settings.ids_file is not None else None
    if ids is None or settings.warmup_calls == 0:
        return
    failures: Counter[str] = Counter()
    rpcs = {rpc for scenario in scenarios for rpc in scenario.rpcs.weights()}
    with open_target_channel(settings.target, settings.tls, settings.system_roots) as channel:
        stub = ranking_pb2_grpc.RankingStub(channel)
        metadata = token_metadata(settings.token)
        for user in ids.users[: settings.warmup_calls]:
            try:
                stub.Recommend(
                    ranking_pb2.RecommendRequest(user_id=user, k=settings.k),
                    timeout=settings.timeout_s,
                    metadata=metadata,
                )
            except grpc.RpcError as error:
                failures[f"Recommend {_describe(error)}"] += 1
    if "SimilarItems" in rpcs and settings.retrieval_target is not None:
        tls = settings.retrieval_tls or settings.tls
        with open_target_channel(settings.retrieval_target, tls, settings.system_roots) as channel:
            retrieval = retrieval_pb2_grpc.RetrievalStub(channel)
            metadata = token_metadata(settings.retrieval_token or settings.token)
            for item in ids.items[: settings.warmup_calls]:
                try:
                    retrieval.SimilarItems(
                        retrieval_pb2.SimilarItemsRequest(item_id=item, n=settings.similar_n),
                        timeout=settings.timeout_s,
                        metadata=metadata,
                    )
                except grpc.RpcError as error:
                    failures[f"SimilarItems {_describe(error)}"] += 1
    if failures:
        (reason, count), *_ = failures.most_common(1)
        raise LoadTestError(f"warm-up: {sum(failures.values())} calls failed, e.g. {count} x {reason}")


def _describe(error: grpc.RpcError) -> str:
    return f"{error.code().name}: {error.details()}" if isinstance(error, grpc.Call) else str(error)


def with_ids_file(settings: LoadTestSettings) -> LoadTestSettings:
    """Settings with ``ids_file`` set: read once here from ``artifacts`` if need be."""
    if settings.ids_file is not None:
        if not settings.ids_file.is_file():
            raise LoadTestError(f"ids_file {settings.ids_file}: no such file")
        return settings.model_copy(update={"ids_file": settings.ids_file.resolve()})
    if settings.artifacts is None:
        raise LoadTestError("no ids: set ids_file (--ids) or artifacts (--artifacts), see deploy/loadtest/README.md")
    path = settings.run_dir / "ids.json"
    write_ids(ids_from_artifacts(settings.artifacts, session_items=settings.session_items), path)
    return settings.model_copy(update={"ids_file": path.resolve()})


def run_scenario(settings: LoadTestSettings, scenario: Scenario) -> ScenarioResult:
    """One headless locust run of ``scenario``; raises :class:`LoadTestError` if locust fails."""
    run_dir = settings.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    records = run_dir / f"{scenario.name}.records.json"
    records.unlink(missing_ok=True)
    log_file = run_dir / f"{scenario.name}.locust.log"
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {
        **os.environ,
        RESOLVED_ENV: settings.resolved_json(),
        SCENARIO_ENV: scenario.name,
        RECORDS_ENV: str(records.resolve()),
        "PYTHONPATH": python_path,
    }
    argv = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--json-file", str(run_dir / f"{scenario.name}.locust"),  # locust adds .json
        "--html", str(run_dir / f"{scenario.name}.html"),
        "--exit-code-on-error", "0", "--loglevel", "WARNING",
    ]  # fmt: skip
    event(log, "load scenario starting", scenario=scenario.name, kind=scenario.kind, seconds=scenario.total_s)
    with log_file.open("wb") as output:
        try:
            completed = subprocess.run(
                argv, env=env, stdout=output, stderr=subprocess.STDOUT, timeout=scenario.total_s + LOCUST_OVERHEAD_S
            )
        except subprocess.TimeoutExpired as error:
            raise LoadTestError(f"scenario {scenario.name}: locust did not finish in time; see {log_file}") from error
    if completed.returncode != 0 or not records.is_file():
        raise LoadTestError(f"scenario {scenario.name}: locust exited with {completed.returncode}; see {log_file}")
    result = summarise(scenario, json.loads(records.read_text()))
    event(
        log,
        "load scenario done",
        scenario=scenario.name,
        requests=result.requests,
        errors=result.errors,
        throughput_rps=result.throughput_rps,
        p95_ms=result.latency.p95 if result.latency else None,
    )
    return result


def run_scenarios(
    settings: LoadTestSettings, command: str, setup: str, progress: Callable[[str], None] | None = None
) -> LoadTestReport:
    """Every selected scenario in turn, after checking the targets are SERVING."""
    machine = describe_machine()  # before our own load raises the load average
    scenarios = settings.selected()
    settings = with_ids_file(settings)
    check_targets(settings, scenarios)
    warm_up(settings, scenarios)
    results = []
    for scenario in scenarios:
        if progress is not None:
            progress(f"scenario {scenario.name}: {scenario.description or scenario.kind} ({scenario.total_s:g} s)")
        results.append(run_scenario(settings, scenario))
    return LoadTestReport(
        command=command,
        machine=machine,
        setup=setup,
        targets={"ranking": settings.target, "retrieval": settings.retrieval_target},
        scenarios=results,
    )
