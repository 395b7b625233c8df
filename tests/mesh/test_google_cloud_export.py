"""The direct path (AIPROD_OTEL_EXPORTER=gcp): the services' real exporters write to fake
google.monitoring.v3.MetricService and google.devtools.cloudtrace.v2.TraceService on loopback. What
arrives must be named as the scheme says (workload.googleapis.com/<name>), carry the documented labels
with their dots made underscores, include every metric the alert policies and SLOs of
k8s/monitoring/direct read, and a job's spans from every service in one trace."""

from collections.abc import Iterator

import grpc
import pytest
from helpers.mesh import eventually, wait_terminal
from helpers.monitoring import metric_types
from helpers.sandbox import sandbox_mesh
from helpers.telemetry import FakeGoogleCloud, documented_metrics

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod_kit.apikeys import with_api_key
from aiprod_kit.mesh import Mesh

PROJECT = "aiprod-test"
PREFIX = "workload.googleapis.com/"


@pytest.fixture(scope="module")
def google_cloud() -> Iterator[FakeGoogleCloud]:
    with FakeGoogleCloud() as running:
        yield running


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, google_cloud: FakeGoogleCloud) -> Iterator[Mesh]:
    environment = {
        "AIPROD_OTEL_EXPORTER": "gcp",
        "AIPROD_OTEL_GCP_PROJECT": PROJECT,
        "AIPROD_OTEL_GCP_EMULATOR_HOST": google_cloud.address,
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "AIPROD_METRICS_ALERT_INTERVAL_SECONDS": "0.5",
    }
    with sandbox_mesh(tmp_path_factory.mktemp("gcp"), environment) as running:
        yield running


@pytest.fixture(scope="module")
def jobs(mesh: Mesh) -> list[gateway_pb2.RenderJob]:
    """A job that succeeds on Runway, one that fails everywhere it is tried."""
    stub = gateway_pb2_grpc.GatewayServiceStub(
        with_api_key(grpc.insecure_channel(mesh.address("gateway")), mesh.api_key)
    )
    ended = []
    for prompt, state in (("A red kite", job_pb2.JOB_STATE_SUCCEEDED), ("A storm [sandbox:fail]", None)):
        spec = render_pb2.RenderSpec(
            prompt=prompt,
            duration_seconds=4,
            constraints=render_pb2.RenderConstraints(preferred_backend=backend_pb2.BACKEND_RUNWAY),
        )
        job = stub.CreateRenderJob(gateway_pb2.CreateRenderJobRequest(spec=spec)).job
        ended.append(wait_terminal(stub, job.job_id))
        assert state is None or ended[-1].state == state, ended[-1].error
    return ended


def test_what_the_alert_policies_and_slos_read_arrives_under_their_names(google_cloud, jobs):
    wanted = {name for name in metric_types("direct") if _paging(name)}
    assert wanted, "k8s/monitoring/direct names no alert or SLO metric"

    def missing() -> set[str]:
        return wanted - google_cloud.metric_types()

    assert eventually(lambda: not missing(), timeout=30), f"never written: {sorted(missing())}"
    assert google_cloud.project_names == {f"projects/{PROJECT}"}


def test_every_series_is_named_and_labelled_as_the_scheme_says(google_cloud, jobs):
    scheme = documented_metrics()
    assert eventually(lambda: len(google_cloud.metric_types()) >= 15, timeout=30)
    for series in google_cloud.series():
        name = series.metric.type.removeprefix(PREFIX)
        assert series.metric.type.startswith(PREFIX) and name in scheme, series.metric.type
        expected = {label.replace(".", "_") for label in scheme[name].labels}
        assert set(series.metric.labels) == expected, (name, dict(series.metric.labels))
        # One series per process: the monitored resource names the service and its instance.
        assert series.resource.type == "generic_task", series.resource
        assert series.resource.labels["job"].startswith("aiprod-"), series.resource
        assert series.resource.labels["task_id"], series.resource
    descriptor = google_cloud.descriptors[PREFIX + "aiprod.gateway.job_duration"]
    assert descriptor.unit == "s"


def test_a_jobs_spans_reach_cloud_trace_in_one_trace(google_cloud, jobs):
    succeeded = jobs[0]

    def job_spans() -> list:
        spans = google_cloud.spans()
        first = [span for span in spans if _attribute(span, "aiprod.job_id") == succeeded.job_id]
        trace_ids = {_trace_id(span) for span in first}
        return [span for span in spans if _trace_id(span) in trace_ids]

    def services(spans: list) -> set[str]:
        return {_attribute(span, "service.name") for span in spans}

    wanted = {"aiprod-gateway", "aiprod-router", "aiprod-renderer-runway"}
    assert eventually(lambda: wanted <= services(job_spans()), timeout=30), services(job_spans())
    spans = job_spans()
    assert len({_trace_id(span) for span in spans}) == 1
    assert all(span.name.startswith(f"projects/{PROJECT}/traces/") for span in spans)


def _trace_id(span) -> str:
    return span.name.split("/")[3]


def _attribute(span, key: str) -> str:
    value = span.attributes.attribute_map.get(key)
    return value.string_value.value if value is not None else ""


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
