"""OpenTelemetry: one trace from the caller through ranking into retrieval."""

from __future__ import annotations

from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shared.data import Dataset
from shared.proto.vitrine.v1 import ranking_pb2
from tests.conftest import Servers, users_by_activity


def test_trace_context_propagates_ranking_to_retrieval(servers: Servers, dataset: Dataset) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # the process had only the API's no-op provider
    caller = provider.get_tracer("test-caller")
    with caller.start_as_current_span("shop-page", kind=SpanKind.CLIENT) as root:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        request = ranking_pb2.RecommendRequest(
            user_id=users_by_activity(dataset)[0],
            k=5,
            context=ranking_pb2.RequestContext(timestamp=int(dataset.events.timestamp.max())),
        )
        servers.ranking.Recommend(request, timeout=10, metadata=tuple(carrier.items()))
    ranking = next(s for s in exporter.get_finished_spans() if s.name == "vitrine.v1.Ranking/Recommend")
    retrieval_spans = [s for s in exporter.get_finished_spans() if s.name == "vitrine.v1.Retrieval/Retrieve"]
    server_side = next(s for s in retrieval_spans if s.kind == SpanKind.SERVER)
    client_side = next(s for s in retrieval_spans if s.kind == SpanKind.CLIENT)
    trace_id = root.get_span_context().trace_id
    assert {ranking.context.trace_id, client_side.context.trace_id, server_side.context.trace_id} == {trace_id}
    assert ranking.parent is not None
    assert ranking.parent.span_id == root.get_span_context().span_id
    assert client_side.parent is not None
    assert client_side.parent.span_id == ranking.context.span_id
    assert server_side.parent is not None
    assert server_side.parent.span_id == client_side.context.span_id
