"""Locust users that call Vitrine's real gRPC stubs (Ranking.Recommend and LogEvents, Retrieval.SimilarItems).

Run by ``python -m deploy.loadtest`` (headless, one locust process per scenario), or by
hand with locust's web UI::

    VITRINE_LOADTEST_TARGET=ranking.example:443 VITRINE_LOADTEST_IDS_FILE=ids.json \\
        locust -f deploy/loadtest/locustfile.py

Settings come from ``deploy.loadtest.settings`` (environment / YAML file); the scenario
(``VITRINE_LOADTEST_SCENARIO``, default the first selected one) drives the load shape:
constant users at a target rate, or closed-loop users in growing stages.

gRPC under gevent: ``init_gevent`` must run before any channel exists (NOTES.md), and
locust knows nothing about gRPC, so every call fires locust's ``request`` event itself.
Each call is also recorded with a microsecond clock (locust's own percentiles are
rounded to whole milliseconds, too coarse for a service answering in a few); the
records go to ``VITRINE_LOADTEST_RECORDS`` when the run ends.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # `locust -f deploy/loadtest/locustfile.py` from anywhere
    sys.path.insert(0, str(_ROOT))

import grpc  # noqa: E402
import grpc.experimental.gevent as grpc_gevent  # noqa: E402

grpc_gevent.init_gevent()

from locust import LoadTestShape, User, constant, constant_throughput, events  # noqa: E402
from locust.env import Environment  # noqa: E402

from deploy.loadtest.channels import open_target_channel, token_metadata  # noqa: E402
from deploy.loadtest.ids import LoadIds, ids_from_artifacts, read_ids  # noqa: E402
from deploy.loadtest.results import FLAG_COLD_START, FLAG_DEGRADED, FLAG_PARTIAL  # noqa: E402
from deploy.loadtest.settings import (  # noqa: E402
    RECORDS_ENV,
    RESOLVED_ENV,
    SCENARIO_ENV,
    LoadTestSettings,
    Scenario,
    load_loadtest_settings,
)
from shared.proto.vitrine.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc  # noqa: E402
from shared.security import ClientTlsSettings  # noqa: E402

# Without it gRPC shares one connection among channels to the same target, and a load
# balancer in front of several pods would see a single client.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
_DEVICES = (ranking_pb2.DEVICE_WEB, ranking_pb2.DEVICE_IOS, ranking_pb2.DEVICE_ANDROID)
# What a shop's event stream looks like: mostly views, some carts, few purchases.
_EVENT_TYPES = (ranking_pb2.EVENT_TYPE_VIEW, ranking_pb2.EVENT_TYPE_CART, ranking_pb2.EVENT_TYPE_PURCHASE)
_EVENT_TYPE_WEIGHTS = (0.85, 0.1, 0.05)


def _settings() -> LoadTestSettings:
    resolved = os.environ.get(RESOLVED_ENV)
    return LoadTestSettings.from_resolved(resolved) if resolved else load_loadtest_settings()


SETTINGS = _settings()
SCENARIO: Scenario = (
    SETTINGS.scenario(os.environ[SCENARIO_ENV]) if os.environ.get(SCENARIO_ENV) else SETTINGS.selected()[0]
)


def _ids() -> LoadIds:
    if SETTINGS.ids_file is not None:
        return read_ids(SETTINGS.ids_file)
    if SETTINGS.artifacts is not None:
        return ids_from_artifacts(SETTINGS.artifacts)
    raise SystemExit("load test: set ids_file or artifacts (VITRINE_LOADTEST_IDS_FILE / _ARTIFACTS)")


IDS = _ids()
MIX = SCENARIO.rpcs.weights()
if "SimilarItems" in MIX and SETTINGS.retrieval_target is None:
    raise SystemExit(f"scenario {SCENARIO.name} calls SimilarItems: set retrieval_target")


class Recorder:
    """Every call of this process: (start s since the run began, rpc, ms, status, users, flags)."""

    def __init__(self) -> None:
        self.rpcs: list[str] = list(MIX)
        self.records: list[tuple[float, int, float, str, int, int]] = []
        self.started = time.perf_counter()
        self.cpu_started = time.process_time()
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self.running = False

    def start(self) -> None:
        self.running = True
        self.records.clear()
        self.started = time.perf_counter()
        self.cpu_started = time.process_time()

    def stop(self) -> None:
        self.running = False
        self.wall_s = time.perf_counter() - self.started
        self.cpu_s = time.process_time() - self.cpu_started

    def add(self, started: float, rpc: str, latency_ms: float, status: str, users: int, flags: int) -> None:
        # Calls still finishing while locust stops its users are not in its statistics either.
        if not self.running:
            return
        self.records.append((started - self.started, self.rpcs.index(rpc), latency_ms, status, users, flags))

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "scenario": SCENARIO.name,
            "rpcs": self.rpcs,
            "columns": ["t_s", "rpc", "latency_ms", "status", "users", "flags"],
            "records": [
                [round(t, 6), rpc, round(ms, 4), status, users, flags]
                for t, rpc, ms, status, users, flags in self.records
            ],
            "wall_s": self.wall_s,
            "client_cpu_s": self.cpu_s,
        }
        path.write_text(json.dumps(payload))


RECORDER = Recorder()
_CLIENTS = itertools.count()


class RpcFailure(Exception):
    """What locust's failure table shows: the gRPC status name (details vary per call)."""


def _channel(target: str, tls: ClientTlsSettings) -> grpc.Channel:
    return open_target_channel(
        target, tls, SETTINGS.system_roots, _CHANNEL_OPTIONS if SETTINGS.channel_per_user else []
    )


class _Channels:
    def __init__(self) -> None:
        self.ranking_channel = _channel(SETTINGS.target, SETTINGS.tls)
        self.ranking = ranking_pb2_grpc.RankingStub(self.ranking_channel)
        self.retrieval_channel: grpc.Channel | None = None
        self.retrieval: retrieval_pb2_grpc.RetrievalStub | None = None
        if SETTINGS.retrieval_target is not None and "SimilarItems" in MIX:
            self.retrieval_channel = _channel(SETTINGS.retrieval_target, SETTINGS.retrieval_tls or SETTINGS.tls)
            self.retrieval = retrieval_pb2_grpc.RetrievalStub(self.retrieval_channel)

    def close(self) -> None:
        self.ranking_channel.close()
        if self.retrieval_channel is not None:
            self.retrieval_channel.close()


_SHARED: _Channels | None = None


RANKING_METADATA = token_metadata(SETTINGS.token)
RETRIEVAL_METADATA = token_metadata(SETTINGS.retrieval_token or SETTINGS.token)


def _wait_time() -> Callable[[User], float]:
    if SCENARIO.kind == "steady" and SCENARIO.rate is not None:
        return constant_throughput(SCENARIO.rate / SCENARIO.users)
    return constant(0)


class VitrineClient(User):
    """One backend calling Vitrine: picks an RPC by the scenario's mix for every request."""

    wait_time = _wait_time()

    def on_start(self) -> None:
        global _SHARED
        self.number = next(_CLIENTS)
        self.rng = random.Random(SETTINGS.seed * 1_000_003 + self.number)
        if SETTINGS.channel_per_user:
            self.channels = _Channels()
        else:
            _SHARED = _SHARED or _Channels()
            self.channels = _SHARED
        self.rpc_names = list(MIX)
        self.rpc_weights = list(MIX.values())
        self.unknown_users = 0
        if SCENARIO.kind == "steady" and SCENARIO.rate is not None:
            # Clients spawned together would stay in phase under constant_throughput and send
            # their requests in bursts; a random offset within one period spreads them out
            # (time.sleep is gevent's here: locust monkey-patches it).
            time.sleep(self.rng.uniform(0.0, SCENARIO.users / SCENARIO.rate))

    def on_stop(self) -> None:
        if SETTINGS.channel_per_user:
            self.channels.close()

    def _call(self, rpc: str, send: Callable[[], tuple[int, int]]) -> None:
        users = self.environment.runner.user_count if self.environment.runner is not None else 0
        started = time.perf_counter()
        status, flags, length, exception = "OK", 0, 0, None
        try:
            length, flags = send()
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            status = code.name if code is not None else "UNKNOWN"
            exception = RpcFailure(status)
        latency_ms = (time.perf_counter() - started) * 1000.0
        RECORDER.add(started, rpc, latency_ms, status, users, flags)
        self.environment.events.request.fire(
            request_type="grpc",
            name=rpc,
            response_time=latency_ms,
            response_length=length,
            exception=exception,
            context={"flags": flags},
        )

    def _recommend(self) -> tuple[int, int]:
        if self.rng.random() < SETTINGS.unknown_user_share:
            self.unknown_users += 1
            user, session = self._visitor(), []
        else:
            user = self.rng.choice(IDS.users)
            session = IDS.sessions.get(user, [])[: SETTINGS.session_items]
        request = ranking_pb2.RecommendRequest(
            user_id=user,
            k=SETTINGS.k,
            context=ranking_pb2.RequestContext(device=self.rng.choice(_DEVICES), session_item_ids=session),
        )
        response = self.channels.ranking.Recommend(request, timeout=SETTINGS.timeout_s, metadata=RANKING_METADATA)
        flags = (
            (FLAG_DEGRADED if response.degraded else 0)
            | (FLAG_PARTIAL if response.partial else 0)
            | (FLAG_COLD_START if response.cold_start else 0)
        )
        return response.ByteSize(), flags

    def _similar_items(self) -> tuple[int, int]:
        assert self.channels.retrieval is not None  # checked at import: retrieval_target is set
        request = retrieval_pb2.SimilarItemsRequest(item_id=self.rng.choice(IDS.items), n=SETTINGS.similar_n)
        response = self.channels.retrieval.SimilarItems(
            request, timeout=SETTINGS.timeout_s, metadata=RETRIEVAL_METADATA
        )
        return response.ByteSize(), 0

    def _visitor(self) -> str:
        """A visitor the service had no history for: LogEvents writes their events and
        Recommend reads them back (the online-state path), without touching the history of
        real users that other runs against the same servers may rely on."""
        return f"loadtest-new-{self.number}-{self.rng.randrange(SETTINGS.visitors_per_client)}"

    def _log_events(self) -> tuple[int, int]:
        user = self._visitor()
        session = f"loadtest-{self.number}-{self.rng.getrandbits(32):08x}"
        device = self.rng.choice(_DEVICES)
        request = ranking_pb2.LogEventsRequest(
            events=[
                ranking_pb2.UserEvent(
                    user_id=user,
                    item_id=self.rng.choice(IDS.items),
                    type=self.rng.choices(_EVENT_TYPES, weights=_EVENT_TYPE_WEIGHTS)[0],
                    device=device,
                    session_id=session,
                )
                for _ in range(SETTINGS.events_per_call)
            ]
        )
        response = self.channels.ranking.LogEvents(request, timeout=SETTINGS.timeout_s, metadata=RANKING_METADATA)
        return response.ByteSize(), 0

    def _task(self) -> None:
        rpc = self.rng.choices(self.rpc_names, weights=self.rpc_weights)[0]
        send = {"Recommend": self._recommend, "SimilarItems": self._similar_items, "LogEvents": self._log_events}[rpc]
        self._call(rpc, send)

    tasks = [_task]  # noqa: RUF012 (locust's own declaration)


class ScenarioShape(LoadTestShape):
    """Steady: ``users`` for ``duration_s``. Ramp: each of ``stages`` for ``stage_s``. Then stop."""

    def tick(self) -> tuple[int, float] | None:
        elapsed = self.get_run_time()
        if SCENARIO.kind == "steady":
            return (SCENARIO.users, SCENARIO.spawn_rate) if elapsed < SCENARIO.duration_s else None
        stage = int(elapsed // SCENARIO.stage_s)
        return (SCENARIO.stages[stage], SCENARIO.spawn_rate) if stage < len(SCENARIO.stages) else None


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    RECORDER.start()


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    RECORDER.stop()


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    path = os.environ.get(RECORDS_ENV)
    if path:
        RECORDER.write(Path(path))
