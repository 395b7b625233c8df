"""Where the bench's mesh sends its telemetry: an OTLP/gRPC receiver, as a collector's, that keeps each
series' latest cumulative value (sums' values, histograms' counts) and drops the spans.

The services export cumulative points (the SDK's default temporality), so a figure over a window is
the difference of two readings; `settled` waits until every process has exported past a moment.
"""

import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

# Each process exports this often (OTEL_METRIC_EXPORT_INTERVAL, in ms, in the mesh's environment).
EXPORT_INTERVAL_MS = 500


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        return trace_service_pb2.ExportTraceServiceResponse()


class MetricTotals(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (process, metric, attributes) -> the latest cumulative value
        self._latest: dict[tuple[str, str, frozenset], float] = {}
        # process -> when its last export arrived
        self._seen: dict[str, float] = {}
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self._server)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def environment(self) -> dict[str, str]:
        """What a mesh's services need to export here, often enough for the bench to count with."""
        return {**self.deployed_environment, "OTEL_METRIC_EXPORT_INTERVAL": str(EXPORT_INTERVAL_MS)}

    @property
    def deployed_environment(self) -> dict[str, str]:
        """Exporting here as deployed: the SDK's own intervals (metrics every 60 s, spans in batches)."""
        return {
            "AIPROD_OTEL_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
        }

    def __enter__(self) -> "MetricTotals":
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop(grace=None)

    def Export(self, request, context):
        now = time.monotonic()
        with self._lock:
            for resource_metrics in request.resource_metrics:
                resource = {a.key: a.value.string_value for a in resource_metrics.resource.attributes}
                process = resource.get("service.instance.id", "")
                service = ("service.name", resource.get("service.name", ""))
                self._seen[process] = now
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        data = metric.WhichOneof("data")
                        for point in getattr(metric, data).data_points:
                            attributes = frozenset(
                                [
                                    service,
                                    *(
                                        (a.key, str(getattr(a.value, a.value.WhichOneof("value"))))
                                        for a in point.attributes
                                    ),
                                ]
                            )
                            if data == "histogram":
                                value = float(point.count)
                            elif data in ("sum", "gauge"):
                                value = (
                                    point.as_double
                                    if point.WhichOneof("value") == "as_double"
                                    else float(point.as_int)
                                )
                            else:
                                continue
                            self._latest[(process, metric.name, attributes)] = value
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def total(self, metric: str, **attributes: str) -> float:
        """The metric summed over every process and series whose attributes include these (the
        process's service.name among them)."""
        wanted = set(attributes.items())
        with self._lock:
            return sum(
                value
                for (_, name, labels), value in self._latest.items()
                if name == metric and wanted <= labels
            )

    def by_method(self, metric: str) -> dict[tuple[str, str], float]:
        """An RPC metric summed per (rpc.service, rpc.method)."""
        found: dict[tuple[str, str], float] = {}
        with self._lock:
            for (_, name, labels), value in self._latest.items():
                if name == metric:
                    attributes = dict(labels)
                    key = (attributes.get("rpc.service", ""), attributes.get("rpc.method", ""))
                    found[key] = found.get(key, 0.0) + value
        return found

    def settled(self) -> None:
        """Returns once every process has exported since the call: its figures then include all that
        happened before it."""
        since = time.monotonic()
        time.sleep(2 * EXPORT_INTERVAL_MS / 1000 + 0.3)
        with self._lock:
            stale = [process for process, seen in self._seen.items() if seen < since]
        if stale:
            raise RuntimeError(f"no metrics from {stale} since the figure's moment")
