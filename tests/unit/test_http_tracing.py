"""Provider HTTP calls in traces: a signed output URL must not carry its token into a span."""

import httpx
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aiprod_kit.telemetry import without_query


def test_a_signed_url_reaches_the_trace_without_its_query():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200)))
    HTTPXClientInstrumentor.instrument_client(
        client, tracer_provider=provider, request_hook=lambda span, request: without_query(span)
    )
    client.get("https://outputs.example/task/video.mp4?_jwt=secret-token&expires=1")
    (span,) = exporter.get_finished_spans()
    urls = [value for key, value in span.attributes.items() if key in ("http.url", "url.full")]
    assert urls == ["https://outputs.example/task/video.mp4"]
    assert "secret-token" not in repr(dict(span.attributes))
