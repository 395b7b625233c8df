"""The gateway's job metrics, read with the OpenTelemetry SDK's in-memory reader: what one job's life
records, and with which labels."""

from helpers.telemetry import collected
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from aiprod.common.v1 import backend_pb2, job_pb2, money_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_gateway.telemetry import GatewayMetrics
from aiprod_kit.failures import Reason
from aiprod_kit.money import usd


def job(state: int, sequence: int, **fields: object) -> gateway_pb2.RenderJob:
    made = gateway_pb2.RenderJob(
        job_id="job_0123456789abcdef0123456789abcdef",
        state=state,
        last_sequence=sequence,
        spec=render_pb2.RenderSpec(prompt="A fox in the snow", preset="quick_social", duration_seconds=6),
        backend=backend_pb2.BACKEND_REPLICATE,
        **fields,
    )
    made.create_time.FromSeconds(1_000)
    made.update_time.FromSeconds(1_090)
    return made


def metrics_of(*jobs: gateway_pb2.RenderJob) -> dict[str, list[tuple[dict, float]]]:
    reader = InMemoryMetricReader()
    telemetry = GatewayMetrics(MeterProvider(metric_readers=[reader]).get_meter("test"))
    for changed in jobs:
        telemetry.job_changed(changed)
    return collected(reader)


def test_a_delivered_job_records_its_duration_quality_cost_savings_and_variance():
    result = render_pb2.RenderOutput(
        cost=money_pb2.Money(currency_code="USD", amount_micros=60_000),
        qc=render_pb2.QcReport(score=0.82),
        video=render_pb2.VideoArtifact(duration_seconds=6),
    )
    # Quoted 0.05 USD against Runway's 0.25; it cost its tenant 0.06.
    quote = gateway_pb2.Quote(
        price=usd(50_000), baseline_backend=backend_pb2.BACKEND_RUNWAY, baseline_cost=usd(250_000)
    )
    points = metrics_of(
        job(job_pb2.JOB_STATE_QUEUED, 1, quote=quote),
        job(job_pb2.JOB_STATE_RUNNING, 3, quote=quote),
        job(job_pb2.JOB_STATE_SUCCEEDED, 9, result=result, quote=quote, cost=usd(60_000)),
    )
    labels = {"preset": "quick_social", "backend": "replicate"}
    assert points["aiprod.gateway.jobs_created"] == [({"preset": "quick_social"}, 1)]
    assert points["aiprod.gateway.jobs_completed"] == [(labels, 1)]
    assert points["aiprod.gateway.job_duration"] == [({**labels, "state": "succeeded"}, 90.0)]
    assert points["aiprod.gateway.job_quality"] == [(labels, 0.82)]
    assert points["aiprod.gateway.job_cost"] == [(labels, 0.06)]
    assert points["aiprod.gateway.cost_per_minute"] == [(labels, 0.6)]
    ((_, saved),) = points["aiprod.gateway.savings"]
    assert round(saved, 6) == 0.19
    ((variance_labels, variance),) = points["aiprod.gateway.quote_variance"]
    assert variance_labels == {**labels, "state": "succeeded"}
    assert round(variance, 6) == 1.2  # 20% over
    assert "aiprod.gateway.jobs_failed" not in points


def test_actual_against_quoted_counts_every_attempt_a_failed_job_paid_and_no_baseline_claims_no_saving():
    quote = gateway_pb2.Quote(price=usd(400_000))
    failure = render_pb2.RenderFailure(reason=Reason.PROVIDER_FAILED, message="the provider failed")
    points = metrics_of(
        job(job_pb2.JOB_STATE_FAILED, 7, quote=quote, cost=usd(300_000), error=failure),
        job(job_pb2.JOB_STATE_SUCCEEDED, 9, quote=quote, cost=usd(400_000)),
        job(job_pb2.JOB_STATE_CANCELLED, 4, quote=quote, cost=usd(100_000)),
        job(job_pb2.JOB_STATE_SUCCEEDED, 9),  # no quote: nothing to compare with
    )
    variances = sorted((labels["state"], value) for labels, value in points["aiprod.gateway.quote_variance"])
    assert variances == [("failed", 0.75), ("succeeded", 1.0)]
    assert "aiprod.gateway.savings" not in points


def test_a_failed_job_counts_its_reason_and_a_cancelled_one_only_itself():
    failure = render_pb2.RenderFailure(reason=Reason.PROVIDER_FAILED, message="the provider failed the task")
    points = metrics_of(
        job(job_pb2.JOB_STATE_FAILED, 7, error=failure),
        job(job_pb2.JOB_STATE_CANCELLED, 4),
    )
    assert points["aiprod.gateway.jobs_failed"] == [
        ({"preset": "quick_social", "backend": "replicate", "reason": "PROVIDER_FAILED"}, 1)
    ]
    assert points["aiprod.gateway.jobs_cancelled"] == [({"preset": "quick_social"}, 1)]
    assert [labels["state"] for labels, _ in points["aiprod.gateway.job_duration"]] == ["failed"]
    assert "aiprod.gateway.job_quality" not in points
