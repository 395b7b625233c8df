"""The direct Cloud Monitoring path (AIPROD_OTEL_EXPORTER=gcp): the services' real exporter writes to a
fake google.monitoring.v3.MetricService on loopback. What arrives must be named as the scheme says
(workload.googleapis.com/<name>), carry the documented labels with their dots made underscores, and
include every metric the alert policies and SLOs of k8s/monitoring/direct read."""

from collections.abc import Iterator

import grpc
import pytest
from monitoring_support import metric_types
from support import eventually, wait_terminal
from telemetry_support import FakeMetricService, documented_metrics

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod_kit.mesh import Mesh

PROJECT = "aiprod-test"
PREFIX = "workload.googleapis.com/"


@pytest.fixture(scope="module")
def cloud_monitoring() -> Iterator[FakeMetricService]:
    with FakeMetricService() as running:
        yield running


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, cloud_monitoring: FakeMetricService) -> Iterator[Mesh]:
    environment = {
        "AIPROD_OTEL_EXPORTER": "gcp",
        "AIPROD_OTEL_GCP_PROJECT": PROJECT,
        "AIPROD_OTEL_GCP_EMULATOR_HOST": cloud_monitoring.address,
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "AIPROD_METRICS_ALERT_INTERVAL_SECONDS": "0.5",
        "AIPROD_SANDBOX_RENDER_SECONDS": "1",
        "AIPROD_RUNWAY_POLL_SECONDS": "0.2",
        "AIPROD_VEO_POLL_SECONDS": "0.2",
        "AIPROD_REPLICATE_POLL_SECONDS": "0.2",
    }
    running = Mesh(tmp_path_factory.mktemp("gcp"), free_ports=True, sandbox=True, environment=environment)
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def jobs(mesh: Mesh) -> None:
    stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(mesh.address("gateway")))
    for prompt, state in (("A red kite", job_pb2.JOB_STATE_SUCCEEDED), ("A storm [sandbox:fail]", None)):
        spec = render_pb2.RenderSpec(
            prompt=prompt,
            duration_seconds=4,
            constraints=render_pb2.RenderConstraints(preferred_backend=backend_pb2.BACKEND_RUNWAY),
        )
        job = stub.CreateRenderJob(gateway_pb2.CreateRenderJobRequest(spec=spec)).job
        ended = wait_terminal(stub, job.job_id)
        assert state is None or ended.state == state, ended.error


def test_what_the_alert_policies_and_slos_read_arrives_under_their_names(cloud_monitoring, jobs):
    wanted = {name for name in metric_types("direct") if _paging(name)}
    assert wanted, "k8s/monitoring/direct names no alert or SLO metric"

    def missing() -> set[str]:
        return wanted - cloud_monitoring.metric_types()

    assert eventually(lambda: not missing(), timeout=30), f"never written: {sorted(missing())}"
    assert cloud_monitoring.project_names == {f"projects/{PROJECT}"}


def test_every_series_is_named_and_labelled_as_the_scheme_says(cloud_monitoring, jobs):
    scheme = documented_metrics()
    assert eventually(lambda: len(cloud_monitoring.metric_types()) >= 15, timeout=30)
    for series in cloud_monitoring.series():
        name = series.metric.type.removeprefix(PREFIX)
        assert series.metric.type.startswith(PREFIX) and name in scheme, series.metric.type
        expected = {label.replace(".", "_") for label in scheme[name].labels}
        assert set(series.metric.labels) == expected, (name, dict(series.metric.labels))
        # One series per process: the monitored resource names the service and its instance.
        assert series.resource.type == "generic_task", series.resource
        assert series.resource.labels["job"].startswith("aiprod-"), series.resource
        assert series.resource.labels["task_id"], series.resource
    descriptor = cloud_monitoring.descriptors[PREFIX + "aiprod.gateway.job_duration"]
    assert descriptor.unit == "s"


def _paging(metric_type: str) -> bool:
    """The metrics the alert policies and SLOs read (the dashboard charts more)."""
    return any(
        metric_type.endswith(name)
        for name in (
            "aiprod.metrics.daily_spend",
            "aiprod.gateway.job_quality",
            "aiprod.gateway.job_duration",
            "aiprod.router.backend_errors",
            "rpc.server.call.duration",
        )
    )
