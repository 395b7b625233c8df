"""Where the services' telemetry lands in tests: a local OTLP receiver (what an OpenTelemetry Collector
would get) and fake Cloud Monitoring and Cloud Trace services (what the direct exporters write), real
gRPC servers on loopback that keep what arrives. Also the documented metric scheme, read from
docs/TELEMETRY.md, so that tests hold the code to the page."""

import re
import threading
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.api import metric_pb2
from google.cloud.monitoring_v3 import types as monitoring
from google.cloud.trace_v2 import types as cloud_trace
from google.protobuf import empty_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

SCHEME_PAGE = Path(__file__).resolve().parents[2] / "docs" / "TELEMETRY.md"


@dataclass(frozen=True)
class SchemeMetric:
    name: str
    kind: str
    unit: str
    labels: frozenset[str]


def documented_metrics() -> dict[str, SchemeMetric]:
    """The "## Metrics" table of docs/TELEMETRY.md."""
    text = SCHEME_PAGE.read_text()
    table = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    scheme = {}
    for row in re.findall(r"^\| `([^`]+)` \|(.*)$", table, flags=re.MULTILINE):
        name, rest = row
        kind, unit, labels = (cell.strip() for cell in rest.split("|")[:3])
        scheme[name] = SchemeMetric(
            name, kind, unit, frozenset(label.strip() for label in labels.split(",") if label.strip())
        )
    return scheme


def _value(any_value: common_pb2.AnyValue) -> object:
    return getattr(any_value, any_value.WhichOneof("value")) if any_value.WhichOneof("value") else None


def _attributes(attributes: list[common_pb2.KeyValue]) -> dict[str, object]:
    return {attribute.key: _value(attribute.value) for attribute in attributes}


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, object]

    @property
    def is_http_client(self) -> bool:
        # Old or stable HTTP semantic conventions, whichever the instrumentation speaks.
        http = "http.method" in self.attributes or "http.request.method" in self.attributes
        return self.kind == trace_pb2.Span.SPAN_KIND_CLIENT and http


@dataclass
class ReceivedPoints:
    """Every point of one metric: the service that sent it, its kind and unit, its attributes."""

    kind: str = ""
    unit: str = ""
    points: list[tuple[str, dict[str, object]]] = field(default_factory=list)


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """TraceService and MetricsService of OTLP/gRPC, as a collector's otlp receiver serves them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self._metrics: dict[str, ReceivedPoints] = defaultdict(ReceivedPoints)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_OtlpMetrics(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "OtlpReceiver":
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop(grace=None)

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext):
        received = []
        for resource_spans in request.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name"))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes=_attributes(span.attributes),
                        )
                    )
        with self._lock:
            self._spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def export_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        with self._lock:
            for resource_metrics in request.resource_metrics:
                service = str(_attributes(resource_metrics.resource.attributes).get("service.name"))
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        data = metric.WhichOneof("data")
                        received = self._metrics[metric.name]
                        received.kind, received.unit = _kind(metric), metric.unit
                        for point in getattr(metric, data).data_points:
                            received.points.append((service, _attributes(point.attributes)))

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def metrics(self) -> dict[str, ReceivedPoints]:
        with self._lock:
            return {name: ReceivedPoints(r.kind, r.unit, list(r.points)) for name, r in self._metrics.items()}


class _OtlpMetrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: grpc.ServicerContext):
        self._receiver.export_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class FakeGoogleCloud:
    """The write methods of google.monitoring.v3.MetricService and google.devtools.cloudtrace.v2.
    TraceService, keeping every time series and span written."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.project_names: set[str] = set()
        self.descriptors: dict[str, metric_pb2.MetricDescriptor] = {}
        self._series: list[monitoring.TimeSeries] = []
        self._spans: list[cloud_trace.Span] = []
        metric_handlers = {
            "CreateTimeSeries": grpc.unary_unary_rpc_method_handler(
                self._create_time_series,
                request_deserializer=monitoring.CreateTimeSeriesRequest.deserialize,
                response_serializer=empty_pb2.Empty.SerializeToString,
            ),
            "CreateMetricDescriptor": grpc.unary_unary_rpc_method_handler(
                self._create_metric_descriptor,
                request_deserializer=monitoring.CreateMetricDescriptorRequest.deserialize,
                response_serializer=metric_pb2.MetricDescriptor.SerializeToString,
            ),
        }
        trace_handlers = {
            "BatchWriteSpans": grpc.unary_unary_rpc_method_handler(
                self._batch_write_spans,
                request_deserializer=cloud_trace.BatchWriteSpansRequest.deserialize,
                response_serializer=empty_pb2.Empty.SerializeToString,
            )
        }
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler("google.monitoring.v3.MetricService", metric_handlers),
                grpc.method_handlers_generic_handler(
                    "google.devtools.cloudtrace.v2.TraceService", trace_handlers
                ),
            ]
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "FakeGoogleCloud":
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop(grace=None)

    def _create_time_series(self, request: monitoring.CreateTimeSeriesRequest, context: grpc.ServicerContext):
        # The real service's limits, which the exporter must respect: at most 200 series a call.
        if len(request.time_series) > 200:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "at most 200 time series per request")
        with self._lock:
            self.project_names.add(request.name)
            self._series.extend(request.time_series)
        return empty_pb2.Empty()

    def _create_metric_descriptor(
        self, request: monitoring.CreateMetricDescriptorRequest, context: grpc.ServicerContext
    ):
        with self._lock:
            self.descriptors[request.metric_descriptor.type] = request.metric_descriptor
        return request.metric_descriptor

    def _batch_write_spans(self, request: cloud_trace.BatchWriteSpansRequest, context: grpc.ServicerContext):
        with self._lock:
            self.project_names.add(request.name)
            self._spans.extend(request.spans)
        return empty_pb2.Empty()

    def spans(self) -> list[cloud_trace.Span]:
        with self._lock:
            return list(self._spans)

    def series(self) -> list[monitoring.TimeSeries]:
        with self._lock:
            return list(self._series)

    def metric_types(self) -> set[str]:
        return {series.metric.type for series in self.series()}


def collected(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict, float]]]:
    """What an in-memory reader holds: each metric's points as (attributes, value or histogram sum)."""
    points: dict[str, list[tuple[dict, float]]] = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:
                        value = point.sum  # histograms
                    points.setdefault(metric.name, []).append((dict(point.attributes), value))
    return points


def roots(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    """Spans of one trace whose parent is not among them: one, in a connected trace."""
    ids = {span.span_id for span in spans}
    return [span for span in spans if span.parent_span_id not in ids]


def ancestors(span: ReceivedSpan, spans: list[ReceivedSpan]) -> Iterator[ReceivedSpan]:
    by_id = {candidate.span_id: candidate for candidate in spans}
    while span.parent_span_id in by_id:
        span = by_id[span.parent_span_id]
        yield span


def _kind(metric: metrics_pb2.Metric) -> str:
    """The instrument kind in the scheme's words: counter, updown, gauge or histogram."""
    data = metric.WhichOneof("data")
    if data == "sum":
        return "counter" if metric.sum.is_monotonic else "updown"
    return data
