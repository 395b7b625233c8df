"""Alert policies and SLOs of the metrics service: the real service as a process, through its stub."""

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from helpers.cli import aiprod
from helpers.mesh import connect_metrics, eventually
from helpers.postgres import assert_runs_on_its_store

from aiprod.common.v1 import backend_pb2, job_pb2
from aiprod.metrics.v1 import metrics_pb2
from aiprod_kit.failures import Reason
from aiprod_kit.mesh import Mesh
from aiprod_kit.money import usd

USD = 1_000_000
RUNWAY, VEO = backend_pb2.BACKEND_RUNWAY, backend_pb2.BACKEND_VEO
SUCCEEDED, FAILED, RUNNING = job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_RUNNING
DEADLINE_SECONDS = 20

StartMetrics = Callable[..., Mesh]


@pytest.fixture
def start_metrics(tmp_path, database_environment) -> Iterator[StartMetrics]:
    """Starts a metrics service of its own, evaluating every 0.2 s. Every test runs twice: on SQLite, and
    on PostgreSQL (database_environment)."""
    started: list[Mesh] = []

    def start(**environment: str) -> Mesh:
        mesh = Mesh(
            tmp_path / f"mesh-{len(started)}",
            free_ports=True,
            only=("metrics",),
            environment={
                "AIPROD_METRICS_ALERT_INTERVAL_SECONDS": "0.2",
                **database_environment,
                **environment,
            },
        )
        started.append(mesh)
        mesh.start()
        assert_runs_on_its_store(mesh, "metrics", database_environment)
        return mesh

    yield start
    for mesh in started:
        mesh.stop()


def job(
    state: int,
    backend: int = RUNWAY,
    qc: float = 0.0,
    seconds: float | None = None,
    reason: int = Reason.UNSPECIFIED,
):
    event = metrics_pb2.JobEventRecord(
        job_id=f"job-{uuid.uuid4().hex}", state=state, backend=backend, qc_score=qc, failure_reason=reason
    )
    event.time.GetCurrentTime()
    if seconds is not None:
        event.job_duration.FromSeconds(round(seconds))
    return event


async def record(stub, *events: metrics_pb2.JobEventRecord) -> None:
    await stub.RecordJobEvent(metrics_pb2.RecordJobEventRequest(events=events))


async def alerts(stub) -> dict[tuple[str, int], metrics_pb2.Alert]:
    response = await stub.ListAlerts(metrics_pb2.ListAlertsRequest())
    return {(alert.policy, alert.backend): alert for alert in response.alerts}


async def wait_for(stub, policy: str, firing: bool, backend: int = 0) -> metrics_pb2.Alert:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        alert = (await alerts(stub)).get((policy, backend))
        if alert is not None and alert.firing == firing:
            return alert
        assert time.monotonic() < deadline, f"{policy} never became firing={firing}: {alert}"
        await asyncio.sleep(0.1)


async def test_a_fresh_service_lists_every_policy_resolved(start_metrics):
    async with connect_metrics(start_metrics()) as stub:
        listed = await alerts(stub)
    assert set(listed) == {
        ("daily_spend_warning", 0),
        ("daily_spend_critical", 0),
        ("mean_quality_low", 0),
        ("job_latency_p95_high", 0),
        # About no backend in particular while none has had an error.
        ("backend_errors_high", 0),
    }
    assert not any(alert.firing for alert in listed.values())
    assert listed["daily_spend_warning", 0].threshold == 90
    assert listed["daily_spend_critical", 0].severity == "critical"
    assert listed["mean_quality_low", 0].value == 0


async def test_spend_fires_warning_then_critical(start_metrics):
    # Committed spend never goes down within a day: resolution comes with the next budget day, which
    # is out of scope here.
    mesh = start_metrics(
        AIPROD_METRICS_ALERT_SPEND_WARNING_USD="0.5", AIPROD_METRICS_ALERT_SPEND_CRITICAL_USD="1"
    )
    async with connect_metrics(mesh) as stub:
        for key, micros in (("first", 600_000), ("second", 500_000)):
            await stub.ReserveBudget(
                metrics_pb2.ReserveBudgetRequest(reservation_key=key, amount=usd(micros), job_id=key)
            )
            await stub.CommitSpend(metrics_pb2.CommitSpendRequest(reservation_key=key, actual=usd(micros)))
            if key == "first":
                warning = await wait_for(stub, "daily_spend_warning", True)
                assert warning.value == pytest.approx(0.6)
                assert warning.severity == "warning"
                assert not (await alerts(stub))["daily_spend_critical", 0].firing
        critical = await wait_for(stub, "daily_spend_critical", True)
    assert critical.value == pytest.approx(1.1)
    assert critical.threshold == 1


async def test_mean_quality_fires_then_resolves(start_metrics):
    mesh = start_metrics()
    async with connect_metrics(mesh) as stub:
        await record(stub, *(job(SUCCEEDED, qc=0.3, seconds=60) for _ in range(2)))
        firing = await wait_for(stub, "mean_quality_low", True)
        assert firing.value == pytest.approx(0.3)
        await record(stub, *(job(SUCCEEDED, qc=0.9, seconds=60) for _ in range(10)))
        resolved = await wait_for(stub, "mean_quality_low", False)
    assert resolved.value == pytest.approx(0.8)
    assert resolved.since_time.ToNanoseconds() >= firing.since_time.ToNanoseconds()
    # The service's output reaches its log file through the test's pump thread: read until it has.
    metrics = mesh.services["metrics"]
    assert eventually(lambda: '"alert resolved"' in metrics.log_text())
    assert '"alert firing"' in metrics.log_text()


async def test_a_firing_alert_keeps_its_since_time_across_a_restart(start_metrics):
    mesh = start_metrics()
    async with connect_metrics(mesh) as stub:
        await record(stub, *(job(SUCCEEDED, qc=0.3, seconds=60) for _ in range(2)))
        firing = await wait_for(stub, "mean_quality_low", True)
        resolved_before = (await alerts(stub))["job_latency_p95_high", 0]
    mesh.kill("metrics")
    await asyncio.sleep(0.5)  # a restart later: a reset since-time would be this much younger
    mesh.start_service("metrics")
    async with connect_metrics(mesh) as stub:
        after = await alerts(stub)
    assert after["mean_quality_low", 0].firing
    assert after["mean_quality_low", 0].since_time == firing.since_time
    # Resolved conditions keep theirs too.
    assert after["job_latency_p95_high", 0].since_time == resolved_before.since_time
    # Already told before the restart: not logged as firing again.
    assert mesh.services["metrics"].log_text().count('"alert firing"') == 1


async def test_p95_latency_fires_then_resolves(start_metrics):
    async with connect_metrics(start_metrics()) as stub:
        await record(stub, *(job(SUCCEEDED, qc=0.9, seconds=2000) for _ in range(3)))
        firing = await wait_for(stub, "job_latency_p95_high", True)
        assert firing.value == 2000
        # 3 slow jobs of 60: the 57th (95th percentile, nearest rank) is a fast one.
        await record(stub, *(job(FAILED, seconds=30) for _ in range(57)))
        resolved = await wait_for(stub, "job_latency_p95_high", False)
    assert resolved.value == 30


async def test_backend_errors_fire_per_backend_and_age_out(start_metrics):
    # Long enough for the records, the evaluation and the reads below to fall inside it on a loaded box;
    # short enough to age out within the deadline.
    mesh = start_metrics(AIPROD_METRICS_ALERT_BACKEND_ERRORS_WINDOW_SECONDS="5")
    async with connect_metrics(mesh) as stub:
        await record(
            stub,
            *(job(FAILED, RUNWAY, seconds=10, reason=Reason.PROVIDER_FAILED) for _ in range(3)),
            # Attempts given up for another backend.
            *(job(RUNNING, RUNWAY, reason=Reason.RENDERER_UNAVAILABLE) for _ in range(3)),
            *(job(FAILED, VEO, seconds=10, reason=Reason.PROVIDER_FAILED) for _ in range(2)),
            job(FAILED, RUNWAY, seconds=10),  # no reason: not a backend error
        )
        firing = await wait_for(stub, "backend_errors_high", True, RUNWAY)
        assert firing.value == 6
        assert firing.severity == "warning"
        veo = (await alerts(stub))["backend_errors_high", VEO]
        assert not veo.firing and veo.value == 2
        resolved = await wait_for(stub, "backend_errors_high", False, RUNWAY)
    assert resolved.value == 0


async def test_slo_report(start_metrics):
    async with connect_metrics(start_metrics()) as stub:
        empty = (await stub.GetSloReport(metrics_pb2.GetSloReportRequest())).slos
        assert [(slo.attainment, slo.error_budget_remaining) for slo in empty] == [(1.0, 1.0), (1.0, 1.0)]
        await record(
            stub,
            *(job(SUCCEEDED, qc=0.9, seconds=100) for _ in range(18)),
            job(SUCCEEDED, qc=0.3, seconds=100),
            job(SUCCEEDED, qc=0.6, seconds=1000),  # slow, and just good enough
        )
        report = {slo.name: slo for slo in (await stub.GetSloReport(metrics_pb2.GetSloReportRequest())).slos}
    latency, quality = report["job_latency"], report["job_quality"]
    assert (latency.goal, latency.window_days) == (pytest.approx(0.95), 7)
    assert latency.attainment == pytest.approx(0.95)
    assert latency.error_budget_remaining == pytest.approx(0, abs=1e-9)
    assert quality.goal == pytest.approx(0.9)
    assert quality.attainment == pytest.approx(0.95)
    assert quality.error_budget_remaining == pytest.approx(0.5)


async def test_a_repeated_batch_counts_once(start_metrics):
    async with connect_metrics(start_metrics()) as stub:
        batch = [job(SUCCEEDED, qc=0.9, seconds=100), job(SUCCEEDED, qc=0.9, seconds=1000)]
        await record(stub, *batch)
        await record(stub, *batch)
        report = (await stub.GetSloReport(metrics_pb2.GetSloReportRequest())).slos
    assert report[0].attainment == pytest.approx(0.5)


async def test_cli_alerts_and_slo_json(start_metrics):
    mesh = start_metrics()
    async with connect_metrics(mesh) as stub:
        await record(stub, *(job(FAILED, VEO, seconds=10, reason=Reason.PROVIDER_FAILED) for _ in range(6)))
    shown = aiprod("alerts", "--json", "--metrics", mesh.address("metrics"))
    assert shown.returncode == 0, shown.stderr
    listed = {(alert["policy"], alert["backend"]): alert for alert in json.loads(shown.stdout)["alerts"]}
    assert listed["backend_errors_high", "BACKEND_VEO"]["firing"] is True
    assert listed["daily_spend_warning", "BACKEND_UNSPECIFIED"]["firing"] is False
    table = aiprod("alerts", "--metrics", mesh.address("metrics"))
    assert table.returncode == 0, table.stderr
    assert "FIRING" in table.stdout

    shown = aiprod("slo", "--json", "--metrics", mesh.address("metrics"))
    assert shown.returncode == 0, shown.stderr
    slos = {slo["name"]: slo for slo in json.loads(shown.stdout)["slos"]}
    assert slos["job_latency"]["attainment"] == 1.0
    assert slos["job_quality"]["error_budget_remaining"] == 1.0
    assert aiprod("slo", "--metrics", "127.0.0.1:1").returncode == 2
