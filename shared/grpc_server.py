"""gRPC server bootstrap shared by both services.

Every Vitrine server gets: the standard health service (SERVING only once its artifacts
are loaded, NOT_SERVING while draining), server reflection (so grpcurl can list,
describe and call every RPC), the Admin service, Prometheus metrics for every RPC, a
optional TLS / mutual TLS and bearer token (always
required for Admin when set), a hard limit on concurrent RPCs (beyond it gRPC answers RESOURCE_EXHAUSTED at once
instead of queueing), message size limits, and a drain on SIGTERM/SIGINT: health goes
NOT_SERVING, new calls are refused, in-flight calls get the grace period to finish.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.admin import ADMIN_METHODS, ADMIN_SERVICE_NAME, AdminServicer
from shared.config import ServerSettings
from shared.logs import event
from shared.proto.vitrine.v1 import admin_pb2_grpc
from shared.reloading import HeapFreezer, Reloadable
from shared.security import add_server_port, server_interceptors
from shared.telemetry import MetricsEndpoint, MetricsInterceptor
from shared.tracing import TracingInterceptor

log = logging.getLogger(__name__)


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    service_name: str
    port: int
    grace_period_s: float
    metrics: MetricsEndpoint | None = None
    # Set on stop: background threads (artifact watchers) end with the server.
    stopping: threading.Event = field(default_factory=threading.Event)
    # Run after the last in-flight call ended (flush logs, close clients), in order.
    on_stop: list[Callable[[], None]] = field(default_factory=list)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port if self.metrics is not None else None

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(self.service_name, status)
        self.health.set("", status)

    def stop(self) -> None:
        self.set_serving(False)
        self.stopping.set()
        self.server.stop(self.grace_period_s).wait()
        for hook in self.on_stop:
            hook()
        if self.metrics is not None:
            self.metrics.close()
        event(log, "server stopped", service=self.service_name, port=self.port)


def start_server(
    service_name: str,
    register: Callable[[grpc.Server], None],
    settings: ServerSettings,
    served: Reloadable[Any],
    interceptors: Sequence[grpc.ServerInterceptor[Any, Any]] = (),
) -> RunningServer:
    """Listen at once (health NOT_SERVING), load ``served``, then report SERVING.

    Binding before loading lets probes tell "loading" from "dead"; a failed initial
    load stops the server and raises, so a process never serves nothing forever.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix=service_name),
        interceptors=[
            MetricsInterceptor(service_name),
            TracingInterceptor(),
            *server_interceptors(settings.auth, always_protected=ADMIN_METHODS),
            *interceptors,
        ],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(service_name, served), server)
    register(server)
    reflection.enable_server_reflection(
        (service_name, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    try:
        bound = add_server_port(server, address, settings.tls, setting=f"{service_name}.tls")
    except RuntimeError as error:  # grpcio raises instead of returning 0 on some failures
        raise OSError(f"{service_name}: cannot bind {address}: {error}") from error
    if bound == 0:
        raise OSError(f"{service_name}: cannot bind {address} (in use or not permitted)")
    server.start()
    metrics = MetricsEndpoint(settings.host, settings.metrics_port) if settings.metrics_port is not None else None
    running = RunningServer(server, health_servicer, service_name, bound, settings.grace_period_s, metrics)
    running.set_serving(False)
    event(
        log, "server listening", service=service_name, host=settings.host, port=bound, metrics_port=running.metrics_port
    )
    if settings.freeze_heap_after_load:
        served.heap = HeapFreezer()
        running.on_stop.append(served.heap.close)
    try:
        served.load_initial()
    except BaseException:
        running.stop()
        raise
    if settings.reload_poll_s > 0:
        served.watch(settings.reload_poll_s, running.stopping)
    running.set_serving(True)
    event(log, "serving", service=service_name, port=bound, artifact=served.artifact, version=served.version)
    return running


# How often the main thread of a serving process wakes up to run pending signal handlers.
SIGNAL_CHECK_S = 0.2


def serve_until_signalled(running: RunningServer) -> None:
    """Block until SIGTERM/SIGINT, then drain and stop."""
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        event(log, "signal received, draining", signal=signal.Signals(signum).name, service=running.service_name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Python runs handlers in the main thread, and only when it executes bytecode: a signal
    # the kernel hands to another thread (gRPC's, a compile's) never wakes an untimed wait,
    # which then outlasts the supervisor's patience (a ranking server SIGKILLed 30 s after
    # its SIGTERM in `vitrine demo`; CPython gh-85300). Waking up now and then runs it.
    while not stop_requested.wait(SIGNAL_CHECK_S):
        pass
    running.stop()


def write_port_file(path: Path | None, port: int) -> None:
    """Tell a supervising process which port was bound (port 0 picks a free one)."""
    if path is None:
        return
    temporary = path.with_suffix(".tmp")
    temporary.write_text(f"{port}\n")
    temporary.replace(path)
