"""Provider HTTP calls in traces: a signed output URL must not carry its token into a span."""

import httpx
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aiprod_kit.redaction import REDACTED, forget_secrets, register_secret
from aiprod_kit.telemetry import RedactingSpanExporter, output_download, without_query


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


def test_an_output_url_reaches_the_trace_with_its_host_only():
    """Replicate's file URLs (and the sandbox's) carry their token in the path: inside
    output_download the whole path goes, whatever the instrumentation recorded."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200)))
    HTTPXClientInstrumentor.instrument_client(
        client, tracer_provider=provider, request_hook=lambda span, request: without_query(span)
    )
    with output_download():
        client.get("https://replicate.delivery/xezq/Capability-Token-123/out.mp4")
    client.get("https://api.replicate.com/v1/predictions/task-1")
    download, poll = exporter.get_finished_spans()
    urls = [value for key, value in download.attributes.items() if key in ("http.url", "url.full")]
    assert urls == [f"https://replicate.delivery/{REDACTED}"]
    assert "Capability-Token-123" not in repr(dict(download.attributes))
    # Outside a download, the path (a task id) stays: it is what a trace reader looks for.
    assert "task-1" in repr(dict(poll.attributes))


def test_exported_spans_lose_secrets_in_attributes_events_and_status():
    register_secret("rk_registered_secret_1")
    try:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(RedactingSpanExporter(exporter)))
        tracer = provider.get_tracer("test")
        try:
            with tracer.start_as_current_span("create") as span:
                span.set_attribute("aiprod.note", "sent rk_registered_secret_1")
                span.set_attribute("aiprod.list", ["Bearer tok_unregistered_9", "ok"])
                raise RuntimeError("401: invalid credentials 'Bearer tok_unregistered_9'")
        except RuntimeError:
            pass
    finally:
        forget_secrets()
    (span,) = exporter.get_finished_spans()
    text = repr(
        (span.name, dict(span.attributes), [(e.name, dict(e.attributes)) for e in span.events], span.status)
    )
    assert "rk_registered_secret_1" not in text and "tok_unregistered_9" not in text
    assert span.attributes["aiprod.list"] == (f"Bearer {REDACTED}", "ok")
    assert span.events[0].attributes["exception.type"] == "RuntimeError"
    assert REDACTED in span.status.description
