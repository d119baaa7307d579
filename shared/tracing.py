"""OpenTelemetry tracing: a server span per RPC, context propagated ranking -> retrieval.

Without configuration nothing is exported (the OpenTelemetry API's no-op tracer); with
``tracing.otlp_endpoint`` set, spans go to that OTLP/gRPC collector. Context travels in
the W3C ``traceparent`` metadata, so the retrieval span of a Recommend is a child of
the ranking service's client span.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.config import TracingSettings
from shared.logs import event
from shared.telemetry import ServerInterceptorBase, UnaryBehaviour, wrap_unary

log = logging.getLogger(__name__)
TRACER_NAME = "vitrine"

_configured = False


def configure_tracing(settings: TracingSettings, service_name: str) -> None:
    """Install an exporting tracer provider once per process when an endpoint is configured."""
    global _configured
    if settings.otlp_endpoint is None or _configured:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=settings.otlp_insecure))
    )
    trace.set_tracer_provider(provider)
    _configured = True
    event(log, "tracing enabled", endpoint=settings.otlp_endpoint, sample_ratio=settings.sample_ratio)


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


class TracingInterceptor(ServerInterceptorBase):
    """Opens a SERVER span per RPC, continuing the caller's trace when it sent one."""

    def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        carrier = {
            key: value for key, value in handler_call_details.invocation_metadata or () if isinstance(value, str)
        }

        def traced(inner: UnaryBehaviour, request: Any, context: grpc.ServicerContext) -> Any:
            parent = propagate.extract(carrier)
            with tracer().start_as_current_span(
                method.lstrip("/"),
                context=parent,
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.method": method},
            ) as span:
                try:
                    return inner(request, context)
                except BaseException:
                    span.set_status(Status(StatusCode.ERROR))
                    raise

        return wrap_unary(continuation(handler_call_details), traced)


Metadata = tuple[tuple[str, str | bytes], ...]


def start_client_span(method: str) -> tuple[trace.Span, Metadata]:
    """A started CLIENT span (child of the current span, not made current) and the metadata
    that carries its context; the caller ends it. Several can be open side by side, one per
    call of a scatter-gather, without nesting in each other."""
    span = tracer().start_span(
        method, kind=SpanKind.CLIENT, attributes={"rpc.system": "grpc", "rpc.method": f"/{method}"}
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return span, tuple(carrier.items())


def end_client_span(span: trace.Span, error: BaseException | None = None) -> None:
    """End a span from :func:`start_client_span`, marked as failed when the call failed."""
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR))
    span.end()


@contextmanager
def client_span(method: str) -> Iterator[Metadata]:
    """A CLIENT span around an outgoing call; yields the metadata that carries its context."""
    span, metadata = start_client_span(method)
    with trace.use_span(span, end_on_exit=True):
        yield metadata
