"""gRPC server bootstrap shared by both services.

Every Vitrine server registers the standard health service (reporting SERVING only
once its artifacts are loaded), binds to loopback or the configured host, and drains
on SIGTERM/SIGINT: health goes NOT_SERVING, new calls are refused, in-flight calls get
the grace period to finish.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shared.config import ServerSettings
from shared.logs import event

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    service_name: str
    port: int
    grace_period_s: float

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(self.service_name, status)
        self.health.set("", status)

    def stop(self) -> None:
        self.set_serving(False)
        self.server.stop(self.grace_period_s).wait()
        event(log, "server stopped", service=self.service_name, port=self.port)


def start_server(service_name: str, register: Callable[[grpc.Server], None], settings: ServerSettings) -> RunningServer:
    """Start a server with ``register`` adding the service; health starts NOT_SERVING."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix=service_name),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    register(server)
    address = f"{settings.host}:{settings.port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as error:  # grpcio raises instead of returning 0 on some failures
        raise OSError(f"{service_name}: cannot bind {address}: {error}") from error
    if bound == 0:
        raise OSError(f"{service_name}: cannot bind {address} (in use or not permitted)")
    server.start()
    running = RunningServer(server, health_servicer, service_name, bound, settings.grace_period_s)
    running.set_serving(False)
    event(log, "server listening", service=service_name, host=settings.host, port=bound)
    return running


def serve_until_signalled(running: RunningServer) -> None:
    """Block until SIGTERM/SIGINT, then drain and stop."""
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        event(log, "signal received, draining", signal=signal.Signals(signum).name, service=running.service_name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop_requested.wait()
    running.stop()


def write_port_file(path: Path | None, port: int) -> None:
    """Tell a supervising process which port was bound (port 0 picks a free one)."""
    if path is None:
        return
    temporary = path.with_suffix(".tmp")
    temporary.write_text(f"{port}\n")
    temporary.replace(path)
