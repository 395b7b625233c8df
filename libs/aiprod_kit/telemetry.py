"""OpenTelemetry set-up: one tracer and meter provider per process, every served call's span and duration
(CallTelemetry), calls made traced by the gRPC instrumentation's client interceptors, the provider HTTP
clients traced, and the exporters of each path.

docs/TELEMETRY.md is the metric scheme; the histogram buckets below are part of it (the SLOs cut the
job duration at 900 s and the quality at 0.6, so both are bucket bounds).
"""

import functools
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import wrapt
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.metrics import CallbackOptions, NoOpMeterProvider, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Status

from aiprod_kit.errors import ServiceError
from aiprod_kit.handlers import AnsweredByStream, AnsweredOnce, Behavior, Responses, rewrap
from aiprod_kit.redaction import REDACTED, redact, redact_value
from aiprod_kit.settings import CommonSettings, ConfigurationError

_UNOBSERVED_METHODS = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    # Shared streams, open as long as their caller runs and carrying thousands of renders: not one call
    # to time or trace. Each render on them joins its own caller's trace, and a render run over
    # ExecuteRenders is observed as its own ExecuteRender call would be (`as_call`).
    "/aiprod.renderer.v1.RendererService/WatchRenders",
    "/aiprod.router.v1.RouterService/ExecuteRenders",
)


def _observed_method(method: str | bytes) -> bool:
    """Health checks and reflection would drown every trace and the RPC metrics; they are left out, as
    are the shared streams (aiprod_kit.multiplexing)."""
    if isinstance(method, bytes):  # grpc.aio clients' call details hold bytes
        method = method.decode()
    return not method.startswith(_UNOBSERVED_METHODS)


def _traced(details: Any) -> bool:
    """The client instrumentation's filter: a prefix test on the method rather than its `filters`, whose
    isinstance checks against typing protocols cost about 6% of a create's time at the gateway."""
    return _observed_method(details.method)


_BUCKETS = {
    "rpc.server.call.duration": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60),
    "aiprod.renderer.provider_request_duration": (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    "aiprod.gateway.job_duration": (5, 10, 30, 60, 120, 180, 300, 600, 900, 1200, 1800, 3600),
    "aiprod.router.render_duration": (5, 10, 30, 60, 120, 180, 300, 600, 900, 1200, 1800, 3600),
    "aiprod.gateway.job_quality": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
    "aiprod.router.qc_score": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
    "aiprod.gateway.job_cost": (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50),
    "aiprod.gateway.cost_per_minute": (0.1, 0.25, 0.5, 0.95, 1.5, 2.5, 5, 10, 25, 50),
    # Actual over estimated (or quoted) cost: within ±20% was "on budget" in the first version.
    "aiprod.gateway.quote_variance": (0.5, 0.8, 0.9, 1.0, 1.1, 1.2, 1.5, 2),
    "aiprod.metrics.cost_variance": (0.5, 0.8, 0.9, 1.0, 1.1, 1.2, 1.5, 2),
}

# Which resource attributes Cloud Trace spans carry: the service and its instance.
_TRACE_RESOURCE = r"service\.(name|namespace|instance\.id)"

_providers: tuple[TracerProvider, MeterProvider] | None = None


class Tally:
    """A count per set of attributes, kept in plain numbers and reported as an asynchronous counter when
    metrics are collected: for counts on hot paths, where a counter's add through the metric SDK costs
    8 to 18 µs once a reader is attached (docs/performance.md), and this well under one. Callers pass
    each metric's attributes in one order (they are the count's key as given)."""

    def __init__(self, meter: metrics.Meter, name: str, unit: str = "", description: str = "") -> None:
        self._counts: dict[tuple[tuple[str, Any], ...], float] = {}
        self._lock = threading.Lock()  # the stores count from their own threads too
        meter.create_observable_counter(name, callbacks=[self._observe], unit=unit, description=description)

    def add(self, amount: float, attributes: Mapping[str, Any]) -> None:
        key = tuple(attributes.items())
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + amount

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            counts = list(self._counts.items())
        for key, count in counts:
            yield Observation(count, dict(key))


def configure_telemetry(service: str, settings: CommonSettings) -> None:
    """Installs the process's providers and exporters (once); `shutdown_telemetry` flushes them."""
    global _providers
    resource = Resource.create(
        {
            "service.name": f"aiprod-{service}",
            "service.namespace": "aiprod",
            # One series per process: replicas must not overwrite each other's points.
            "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
        }
    )
    tracer_provider = TracerProvider(resource=resource)
    readers: list[MetricReader] = []
    match settings.otel_exporter:
        case "console":
            tracer_provider.add_span_processor(
                BatchSpanProcessor(RedactingSpanExporter(ConsoleSpanExporter()))
            )
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        case "otlp":
            # Imported here: the exporter loads its protobuf modules, which only this path needs.
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            tracer_provider.add_span_processor(BatchSpanProcessor(RedactingSpanExporter(OTLPSpanExporter())))
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        case "gcp":
            span_exporter, metric_exporter = _google_cloud_exporters(settings)
            tracer_provider.add_span_processor(BatchSpanProcessor(RedactingSpanExporter(span_exporter)))
            readers.append(PeriodicExportingMetricReader(metric_exporter))
    views = [
        View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(boundaries))
        for name, boundaries in _BUCKETS.items()
    ]
    meter_provider = MeterProvider(resource=resource, metric_readers=readers, views=views)
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    _providers = (tracer_provider, meter_provider)
    # The provider clients' HTTP calls join the trace of the render that made them. Each HTTP library is
    # instrumented when the process imports it (at once if it has): a service that never talks HTTP
    # loads neither the library nor its instrumentation (aiohttp and its: about 10 MB a process).
    wrapt.when_imported("httpx")(_instrument_httpx)
    wrapt.when_imported("aiohttp")(_instrument_aiohttp)


# The HTTP clients' metrics stay out: aiprod.renderer.provider_* measure the same calls in the scheme's words.
def _instrument_httpx(module: object) -> None:
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    HTTPXClientInstrumentor().instrument(
        meter_provider=NoOpMeterProvider(),
        request_hook=lambda span, request: without_query(span),
        async_request_hook=_without_query_async,
    )


def _instrument_aiohttp(module: object) -> None:
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor

    AioHttpClientInstrumentor().instrument(
        meter_provider=NoOpMeterProvider(), request_hook=lambda span, params: without_query(span)
    )


# Where the HTTP instrumentations put the URL (old and stable semantic conventions).
_URL_ATTRIBUTES = ("http.url", "url.full")
# Set while an output is fetched from its provider URL (`output_download`).
_output_download: ContextVar[bool] = ContextVar("aiprod_output_download", default=False)


@contextmanager
def output_download() -> Iterator[None]:
    """Marks the HTTP requests made inside as fetches of a provider's output URL. Such a URL is a
    credential as a whole: Runway signs it in its query (`_jwt`), Replicate's file URLs (and the
    sandbox's) carry an unguessable token in their path. Their spans keep the scheme and host only."""
    token = _output_download.set(True)
    try:
        yield
    finally:
        _output_download.reset(token)


def without_query(span: trace.Span) -> None:
    """Drops a provider URL's query from its span: signed output URLs carry their token there (Runway's
    `_jwt`, for one), and the instrumentations redact only a few well-known parameter names. Inside
    `output_download`, the path goes too."""
    attributes = getattr(span, "attributes", None) or {}
    for key in _URL_ATTRIBUTES:
        url = attributes.get(key)
        if not isinstance(url, str):
            continue
        if _output_download.get():
            parts = urlsplit(url)
            span.set_attribute(key, f"{parts.scheme}://{parts.hostname or ''}{_port(parts)}/{REDACTED}")
        elif "?" in url:
            span.set_attribute(key, url.split("?", 1)[0])
    if _output_download.get():
        for key in ("http.target", "url.path", "url.query"):
            if key in attributes:
                span.set_attribute(key, REDACTED)


def _port(parts: Any) -> str:
    try:
        return f":{parts.port}" if parts.port else ""
    except ValueError:
        return ""


async def _without_query_async(span: trace.Span, request: object) -> None:
    without_query(span)


def _redacted_attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The attributes with their text redacted; None when none of them had anything to redact."""
    redacted = None
    for key, value in (attributes or {}).items():
        clean = redact_value(value)
        if clean != value:
            if redacted is None:
                redacted = dict(attributes or {})
            redacted[key] = clean
    return redacted


def _redacted_event(event: Event) -> Event:
    """The event with its name and attributes redacted; the event itself when they had nothing to redact."""
    name, attributes = redact(event.name), _redacted_attributes(event.attributes)
    if name == event.name and attributes is None:
        return event
    return Event(name, event.attributes if attributes is None else attributes, event.timestamp)


def redacted_span(span: ReadableSpan) -> ReadableSpan:
    """The span with its name, attributes, events (recorded exceptions' messages and stack traces) and
    status description passed through aiprod_kit.redaction; the span itself when none of them had
    anything to redact (nearly every span: a copy costs a third of the span's encoding)."""
    name = redact(span.name)
    attributes = _redacted_attributes(span.attributes)
    status = span.status
    if status.description and (description := redact(status.description)) != status.description:
        status = Status(status.status_code, description)
    events = [_redacted_event(event) for event in span.events]
    if (
        name == span.name
        and attributes is None
        and status is span.status
        and all(clean is event for clean, event in zip(events, span.events, strict=True))
    ):
        return span
    return ReadableSpan(
        name=name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=span.attributes if attributes is None else attributes,
        events=events,
        links=span.links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class RedactingSpanExporter(SpanExporter):
    """Exports through another exporter the spans without secrets (`redacted_span`): every span of
    every path (console, OTLP, Cloud Trace) goes through it, whichever code set its attributes."""

    def __init__(self, exporter: SpanExporter) -> None:
        self._exporter = exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._exporter.export([redacted_span(span) for span in spans])

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


def shutdown_telemetry() -> None:
    """Exports what is pending (last spans, last metric points) before the process ends."""
    if _providers is not None:
        tracer_provider, meter_provider = _providers
        tracer_provider.shutdown()
        meter_provider.shutdown()


def _google_cloud_exporters(settings: CommonSettings) -> tuple[SpanExporter, MetricExporter]:
    """Cloud Trace and Cloud Monitoring, written directly (no collector)."""
    import google.auth
    from google.auth.credentials import AnonymousCredentials
    from google.cloud.monitoring_v3 import MetricServiceClient
    from google.cloud.monitoring_v3.services.metric_service.transports import MetricServiceGrpcTransport
    from google.cloud.trace_v2 import TraceServiceClient
    from google.cloud.trace_v2.services.trace_service.transports import TraceServiceGrpcTransport
    from opentelemetry.exporter.cloud_monitoring import CloudMonitoringMetricsExporter
    from opentelemetry.exporter.cloud_trace import CloudTraceSpanExporter

    project = settings.otel_gcp_project
    if settings.otel_gcp_emulator_host:
        if not project:
            raise ConfigurationError("AIPROD_OTEL_GCP_PROJECT must be set with AIPROD_OTEL_GCP_EMULATOR_HOST")
        channel = grpc.insecure_channel(settings.otel_gcp_emulator_host)
        anonymous = AnonymousCredentials()
        return (
            CloudTraceSpanExporter(
                project_id=project,
                resource_regex=_TRACE_RESOURCE,
                client=TraceServiceClient(
                    transport=TraceServiceGrpcTransport(channel=channel, credentials=anonymous)
                ),
            ),
            CloudMonitoringMetricsExporter(
                project_id=project,
                client=MetricServiceClient(
                    transport=MetricServiceGrpcTransport(channel=channel, credentials=anonymous)
                ),
            ),
        )
    if not project:
        try:
            _, project = google.auth.default()
        except google.auth.exceptions.DefaultCredentialsError as error:
            raise ConfigurationError(
                "AIPROD_OTEL_EXPORTER=gcp needs Application Default Credentials "
                f"(and AIPROD_OTEL_GCP_PROJECT when they name no project): {error}"
            ) from None
        if not project:
            raise ConfigurationError("AIPROD_OTEL_GCP_PROJECT: the credentials name no project; set it")
    return (
        CloudTraceSpanExporter(project_id=project, resource_regex=_TRACE_RESOURCE),
        CloudMonitoringMetricsExporter(project_id=project),
    )


@functools.cache
def _rpc_duration() -> metrics.Histogram:
    return metrics.get_meter("aiprod.rpc").create_histogram(
        "rpc.server.call.duration", unit="s", description="Duration of the RPCs this service answered"
    )


T = TypeVar("T")
_call_tracer = trace.get_tracer("aiprod.rpc")


class _ObservedCall:
    """One call's server span, current while it runs, and its rpc.server.call.duration once it ends."""

    __slots__ = ("_labels", "_span", "_started", "_token")

    def __init__(
        self,
        tracer: trace.Tracer,
        full_method: str,
        labels: dict[str, str],
        parent: otel_context.Context | None,
    ) -> None:
        self._labels = labels
        self._span = tracer.start_span(
            full_method, parent, kind=trace.SpanKind.SERVER, attributes=labels, record_exception=False
        )
        self._token = otel_context.attach(trace.set_span_in_context(self._span, parent))
        self._started = time.perf_counter()

    def end(self, code: grpc.StatusCode) -> None:
        elapsed = time.perf_counter() - self._started
        span = self._span
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_status(Status(trace.StatusCode.ERROR, code.name))
        span.end()
        otel_context.detach(self._token)
        _rpc_duration().record(elapsed, {**self._labels, "rpc.grpc.status_code": code.value[0]})


def _rpc_labels(full_method: str) -> dict[str, str]:
    service, _, method = full_method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


async def as_call(full_method: str, answer: AsyncIterator[T]) -> AsyncIterator[T]:
    """A call carried over a shared stream (aiprod_kit.multiplexing), observed as its own call would
    be: a server span named by its method, in the caller's trace, and rpc.server.call.duration with its
    status code."""
    call, code = _ObservedCall(_call_tracer, full_method, _rpc_labels(full_method), None), grpc.StatusCode.OK
    try:
        async for item in answer:
            yield item
    except ServiceError as error:
        code = error.code
        raise
    except Exception:
        code = grpc.StatusCode.INTERNAL
        raise
    except BaseException:
        code = grpc.StatusCode.CANCELLED  # stopped by its caller
        raise
    finally:
        call.end(code)


def _answered_with(context: grpc.aio.ServicerContext, failed: BaseException | None) -> grpc.StatusCode:
    """The status a call answered with, as its servicer context holds it once the handler returned or
    raised (the error statuses abort with it)."""
    if failed is not None and not isinstance(failed, Exception):
        return grpc.StatusCode.CANCELLED  # the caller went away (asyncio.CancelledError)
    code = context.code()
    if code is None:
        return grpc.StatusCode.UNKNOWN if failed is not None else grpc.StatusCode.OK
    return grpc.StatusCode(code) if isinstance(code, int) else code


class CallTelemetry:
    """Every call's server span, in its caller's trace (the W3C trace context in its metadata), and its
    rpc.server.call.duration by method and status code (semantic conventions): latency, error rate and
    traces per method. Health, reflection and the shared streams are left out (_UNOBSERVED_METHODS).

    A `MethodWrapper` (aiprod_kit.handlers), the outermost: it reads the status the error statuses set.
    Written here rather than taken from OpenTelemetry's gRPC instrumentation, whose server interceptor
    at every call read the metadata twice, parsed the peer's address, proxied the servicer context and
    built its wrapping anew: this span made the gateway's CreateRenderJob about 7% faster than that
    one (docs/performance.md, session 17). It leaves out the peer's address."""

    def __init__(self, tracer: trace.Tracer | None = None) -> None:
        self._tracer = tracer or _call_tracer

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if not _observed_method(method):
            return handler
        labels, tracer = _rpc_labels(method), self._tracer

        def observed(context: grpc.aio.ServicerContext) -> _ObservedCall:
            metadata = context.invocation_metadata()
            return _ObservedCall(
                tracer, method, labels, propagate.extract(dict(metadata)) if metadata else None
            )

        def answered_once(inner: AnsweredOnce) -> AnsweredOnce:
            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call, failed = observed(context), None
                try:
                    return await inner(request, context)
                except BaseException as error:
                    failed = error
                    raise
                finally:
                    call.end(_answered_with(context, failed))

            return unary

        def answered_by_stream(inner: Behavior) -> AnsweredByStream:
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Responses:
                call, failed = observed(context), None
                try:
                    async for response in inner(request, context):
                        yield response
                except BaseException as error:
                    failed = error
                    raise
                finally:
                    call.end(_answered_with(context, failed))

            return stream

        return rewrap(handler, answered_once, answered_by_stream)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    return list(aio_client_interceptors(filter_=_traced))
