"""The router's metrics, read with the OpenTelemetry SDK's in-memory reader."""

from dataclasses import dataclass, field

from helpers.telemetry import collected
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from aiprod.common.v1 import backend_pb2
from aiprod_kit.breaker import CircuitBreaker
from aiprod_kit.failures import Reason
from aiprod_router.stats import BackendStats, Outcome
from aiprod_router.telemetry import RouterMetrics


@dataclass
class FakeRenderer:
    backend: int
    serving: bool
    breaker: CircuitBreaker = field(default_factory=lambda: CircuitBreaker(1, 60))
    stats: BackendStats = field(default_factory=BackendStats)


def test_every_router_metric_with_low_cardinality_labels():
    reader = InMemoryMetricReader()
    runway = FakeRenderer(backend_pb2.BACKEND_RUNWAY, serving=True)
    runway.stats.record(Outcome(True, 40.0, 0.97, cost_micros=480_000, video_seconds=4))
    veo = FakeRenderer(backend_pb2.BACKEND_VEO, serving=False)
    veo.breaker.record_failure()
    telemetry = RouterMetrics(lambda: [runway, veo], MeterProvider(metric_readers=[reader]).get_meter("test"))

    telemetry.attempt_ended(backend_pb2.BACKEND_RUNWAY, "succeeded", 40.0, 0.97)
    telemetry.attempt_ended(backend_pb2.BACKEND_VEO, "failed", 3.0, None)
    telemetry.fell_back(backend_pb2.BACKEND_VEO, backend_pb2.BACKEND_RUNWAY, Reason.PROVIDER_UNAVAILABLE)
    telemetry.uncertain(backend_pb2.BACKEND_VEO)
    points = collected(reader)

    assert ({"backend": "runway", "outcome": "succeeded"}, 1) in points["aiprod.router.attempts"]
    assert ({"backend": "veo", "outcome": "failed"}, 1) in points["aiprod.router.attempts"]
    assert points["aiprod.router.fallbacks"] == [
        ({"from_backend": "veo", "to_backend": "runway", "reason": "PROVIDER_UNAVAILABLE"}, 1)
    ]
    assert points["aiprod.router.uncertain_attempts"] == [({"backend": "veo"}, 1)]
    assert ({"backend": "runway", "outcome": "succeeded"}, 40.0) in points["aiprod.router.render_duration"]
    assert points["aiprod.router.qc_score"] == [({"backend": "runway"}, 0.97)]
    assert sorted(points["aiprod.router.backend_health"], key=str) == [
        ({"backend": "runway"}, 1),
        ({"backend": "veo"}, 0),
    ]
    assert ({"backend": "veo"}, 2) in points["aiprod.router.breaker_state"]
    assert points["aiprod.router.cost_per_second"] == [({"backend": "runway"}, 0.12)]
