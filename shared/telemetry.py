"""Prometheus metrics for both services, and the interceptor that records every RPC.

Metrics live in the process-wide default registry and carry a ``service`` label, so
two servers in one process (as in the tests) stay apart. They are exposed over HTTP
by :func:`start_metrics_server` on the port in ``<service>.metrics_port``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

REQUESTS = Counter(
    "vitrine_grpc_requests_total", "gRPC requests by method and status code", ["service", "method", "code"]
)
LATENCY = Histogram(
    "vitrine_grpc_request_seconds", "gRPC request latency by method", ["service", "method"], buckets=LATENCY_BUCKETS
)
IN_FLIGHT = Gauge("vitrine_grpc_in_flight_requests", "gRPC requests being handled", ["service"])
STAGE_LATENCY = Histogram(
    "vitrine_stage_seconds", "Latency of one stage of a request", ["service", "stage"], buckets=LATENCY_BUCKETS
)
CANDIDATES = Histogram(
    "vitrine_candidates_per_request",
    "Candidates scored per Recommend",
    ["service"],
    buckets=(0, 10, 50, 100, 200, 300, 500, 1000, 2000),
)
DEGRADED = Counter("vitrine_degraded_responses_total", "Answers served from a fallback", ["service", "reason"])
PARTIAL = Counter(
    "vitrine_partial_responses_total", "Answers merged from only some shards of the item index", ["service", "reason"]
)
SHARD_FAILURES = Counter(
    "vitrine_retrieval_shard_failures_total",
    "Calls to one retrieval shard that failed or missed their deadline (shard = position in retrieval_shards)",
    ["service", "shard", "step"],
)
ARTIFACT_INFO = Gauge(
    "vitrine_artifact_info", "Artifact version being served (value 1)", ["service", "artifact", "version"]
)
RELOADS = Counter("vitrine_artifact_reloads_total", "Artifact reload attempts", ["service", "artifact", "outcome"])
# Replicas sharing a catalogue-update log: compare their sequences to see how far one lags.
CATALOG_SEQUENCE = Gauge(
    "vitrine_catalog_updates_applied_sequence",
    "Last catalogue-update record applied to the served index (per index version)",
    ["artifact", "version"],
)
CATALOG_FOLLOW_FAILURES = Counter(
    "vitrine_catalog_log_follow_failures_total",
    "Failed reads of the shared catalogue-update log (unreachable) or records that could not be applied (broken)",
    ["artifact", "kind"],
)


def set_artifact_version(service: str, artifact: str, version: str, previous: str | None) -> None:
    if previous is not None and previous != version:
        ARTIFACT_INFO.remove(service, artifact, previous)
    ARTIFACT_INFO.labels(service, artifact, version).set(1)


class MetricsEndpoint:
    """The /metrics HTTP server of one gRPC server."""

    def __init__(self, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _status_code(context: grpc.ServicerContext) -> str:
    # grpcio records the code set by abort()/set_code(); its type stubs do not show code().
    code = getattr(context, "code", lambda: None)()
    return code.name if isinstance(code, grpc.StatusCode) else "OK"


# grpc-stubs make ServerInterceptor generic; at run time it is a plain ABC.
if TYPE_CHECKING:
    ServerInterceptorBase = grpc.ServerInterceptor[Any, Any]
else:
    ServerInterceptorBase = grpc.ServerInterceptor


UnaryBehaviour = Callable[[Any, grpc.ServicerContext], Any]
Around = Callable[[UnaryBehaviour, Any, grpc.ServicerContext], Any]


def wrap_unary(handler: Any, around: Around) -> Any:
    """Run ``around(inner, request, context)`` in place of a unary-unary handler's behaviour."""
    if handler is None or handler.unary_unary is None:
        return handler
    inner = handler.unary_unary
    return grpc.unary_unary_rpc_method_handler(
        lambda request, context: around(inner, request, context),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class MetricsInterceptor(ServerInterceptorBase):
    """Counts and times every unary RPC by method and final status code."""

    def __init__(self, service: str) -> None:
        self._service = service

    def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method.rsplit("/", 1)[-1]
        service = self._service

        def timed(inner: UnaryBehaviour, request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            IN_FLIGHT.labels(service).inc()
            code = "UNKNOWN"
            try:
                response = inner(request, context)
                code = _status_code(context)
                return response
            except BaseException:
                code = _status_code(context)
                if code == "OK":
                    code = "UNKNOWN"
                raise
            finally:
                IN_FLIGHT.labels(service).dec()
                REQUESTS.labels(service, method, code).inc()
                LATENCY.labels(service, method).observe(time.perf_counter() - started)

        return wrap_unary(continuation(handler_call_details), timed)
