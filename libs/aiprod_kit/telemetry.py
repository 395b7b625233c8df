"""OpenTelemetry set-up: one tracer and meter provider per process, gRPC interceptors from the SDK."""

import grpc
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

# Health checks and reflection would drown every trace; they are left out.
_UNTRACED = filters.negate(
    filters.any_of(
        filters.service_name("grpc.health.v1.Health"),
        filters.service_prefix("grpc.reflection."),
    )
)


def configure_telemetry(service: str, exporter: str) -> None:
    """Installs the process's providers; with exporter "none" spans and metrics stay in process."""
    resource = Resource.create({"service.name": f"aiprod-{service}", "service.namespace": "aiprod"})
    tracer_provider = TracerProvider(resource=resource)
    readers = []
    if exporter == "console":
        tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    return [aio_server_interceptor(filter_=_UNTRACED)]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    return list(aio_client_interceptors(filter_=_UNTRACED))
