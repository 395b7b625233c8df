"""Telemetry through the real mesh: every service exports over OTLP to a local receiver (what the
collector gets on GKE). Jobs that succeed, fail over, fail, are cancelled and lose their renderer must
produce every metric of the documented scheme with exactly its labels, and one job one connected trace
from CreateRenderJob down to the provider's HTTP calls, also when the gateway is killed mid-render."""

import re
from collections.abc import Iterator

import grpc
import pytest
from helpers import monitoring
from helpers.mesh import eventually, wait_terminal, watch_until
from helpers.sandbox import Sandbox, sandbox_mesh
from helpers.telemetry import (
    OtlpReceiver,
    ReceivedSpan,
    ancestors,
    documented_metrics,
    roots,
)

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod_kit.apikeys import with_api_key
from aiprod_kit.capabilities import backend_name
from aiprod_kit.failures import Reason
from aiprod_kit.mesh import Mesh

RUNWAY = backend_pb2.BACKEND_RUNWAY
JOB_ID = re.compile(r"job_[0-9a-f]{32}")


ENVIRONMENT = {
    # Export often, so that tests wait seconds, not the default minute.
    "OTEL_METRIC_EXPORT_INTERVAL": "300",
    "OTEL_BSP_SCHEDULE_DELAY": "100",
    "AIPROD_METRICS_ALERT_INTERVAL_SECONDS": "0.5",
    # A vanished renderer is given up quickly: its attempt becomes uncertain.
    "AIPROD_ROUTER_REATTACH_SECONDS": "1",
}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver) -> Iterator[Mesh]:
    exporter = {"AIPROD_OTEL_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    with sandbox_mesh(tmp_path_factory.mktemp("telemetry"), {**ENVIRONMENT, **exporter}) as running:
        yield running


def gateway(mesh: Mesh, key: str | None = None) -> gateway_pb2_grpc.GatewayServiceStub:
    channel = with_api_key(grpc.insecure_channel(mesh.address("gateway")), key or mesh.api_key)
    return gateway_pb2_grpc.GatewayServiceStub(channel)


def create(mesh: Mesh, prompt: str, preferred: int = RUNWAY, preset: str = "") -> gateway_pb2.RenderJob:
    spec = render_pb2.RenderSpec(
        prompt=prompt,
        duration_seconds=4,
        preset=preset,
        constraints=render_pb2.RenderConstraints(preferred_backend=preferred),
    )
    return gateway(mesh).CreateRenderJob(gateway_pb2.CreateRenderJobRequest(spec=spec)).job


def run_jobs(mesh: Mesh) -> gateway_pb2.RenderJob:
    """A job of every kind; returns the one that succeeded on Runway."""
    stub = gateway(mesh)
    succeeded = wait_terminal(stub, create(mesh, "A red kite over green hills").job_id)
    assert succeeded.state == job_pb2.JOB_STATE_SUCCEEDED, succeeded.error
    # Fails at every provider it is tried on: backend errors, fallbacks, a failed job.
    failed = wait_terminal(stub, create(mesh, "A storm at sea [sandbox:fail]").job_id)
    assert failed.state == job_pb2.JOB_STATE_FAILED
    # Waits for approval; cancelled before it renders.
    waiting = create(mesh, "A brand film", preset="brand_campaign")
    stub.CancelRenderJob(gateway_pb2.CancelRenderJobRequest(job_id=waiting.job_id, reason="test"))
    # Its renderer vanishes mid-render and stays away: the attempt is uncertain, never resent.
    Sandbox(mesh.address("sandbox")).reset(render_seconds=30)
    lost = create(mesh, "A lighthouse at dusk")
    watch_until(stub, lost.job_id, lambda event: event.render.WhichOneof("kind") == "submitted")
    mesh.kill("renderer-runway")
    try:
        assert wait_terminal(stub, lost.job_id).error.reason == Reason.RENDER_UNCERTAIN
    finally:
        mesh.start_service("renderer-runway")
        Sandbox(mesh.address("sandbox")).reset(render_seconds=1)
    return succeeded


@pytest.fixture(scope="module")
def runway_job(mesh: Mesh) -> gateway_pb2.RenderJob:
    return run_jobs(mesh)


def test_every_documented_metric_is_exported_with_exactly_its_labels(mesh, receiver, runway_job):
    scheme = documented_metrics()
    assert len(scheme) >= 25, "the scheme table of docs/TELEMETRY.md was not read"
    # A call refused for its key (aiprod.gateway.auth_failures).
    with pytest.raises(grpc.RpcError) as refused:
        gateway(mesh, key="not-a-key").ListRenderJobs(gateway_pb2.ListRenderJobsRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    def missing() -> set[str]:
        return set(scheme) - set(receiver.metrics())

    assert eventually(lambda: not missing(), timeout=30), f"never exported: {sorted(missing())}"
    received = receiver.metrics()
    assert set(received) == set(scheme), f"exported, not documented: {sorted(set(received) - set(scheme))}"
    for name, documented in scheme.items():
        metric = received[name]
        assert metric.kind == documented.kind, (name, metric.kind)
        assert metric.unit == documented.unit, (name, metric.unit)
        for service, attributes in metric.points:
            assert set(attributes) == documented.labels, (name, service, attributes)
            for value in attributes.values():
                # Never a job id or a prompt: labels stay low-cardinality.
                assert not JOB_ID.search(str(value)), (name, attributes)
                assert " " not in str(value), (name, attributes)


def test_metrics_carry_what_happened(mesh, receiver, runway_job):
    def carry_it(received: dict) -> None:
        completed = received["aiprod.gateway.jobs_completed"].points
        assert {"preset": "quick_social", "backend": "runway"} in [attributes for _, attributes in completed]
        failed_reasons = {
            attributes["reason"] for _, attributes in received["aiprod.gateway.jobs_failed"].points
        }
        assert {"PROVIDER_FAILED", "RENDER_UNCERTAIN"} <= failed_reasons
        errors = {(a["backend"], a["reason"]) for _, a in received["aiprod.router.backend_errors"].points}
        assert ("runway", "PROVIDER_FAILED") in errors
        uncertain = {a["backend"] for _, a in received["aiprod.router.uncertain_attempts"].points}
        assert uncertain == {"runway"}
        operations = {
            (a["operation"], a["outcome"]) for _, a in received["aiprod.renderer.provider_requests"].points
        }
        assert {("create", "ok"), ("get", "ok"), ("download", "ok")} <= operations
        outcomes = {a["outcome"] for _, a in received["aiprod.metrics.reservations"].points}
        assert {"reserved", "committed", "released"} <= outcomes
        methods = {(service, a["rpc.method"]) for service, a in received["rpc.server.call.duration"].points}
        assert {
            ("aiprod-gateway", "CreateRenderJob"),
            ("aiprod-router", "ExecuteRender"),
            ("aiprod-renderer-runway", "StartRender"),
            ("aiprod-metrics", "ReserveBudget"),
        } <= methods
        assert not any(
            a["rpc.service"].startswith("grpc.") for _, a in received["rpc.server.call.duration"].points
        )

    def carried() -> bool:
        try:
            carry_it(receiver.metrics())
        except (AssertionError, KeyError):
            return False
        return True

    # Each point arrives with the export after it was recorded: waited for, then asserted, saying what lacks.
    eventually(carried, timeout=30)
    carry_it(receiver.metrics())


def test_rpc_errors_are_counted_per_method_and_status_code(mesh, receiver, runway_job):
    with pytest.raises(grpc.RpcError) as refused:
        create(mesh, "")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def codes() -> set[int]:
        points = receiver.metrics()["rpc.server.call.duration"].points
        return {a["rpc.grpc.status_code"] for _, a in points if a["rpc.method"] == "CreateRenderJob"}

    assert eventually(lambda: grpc.StatusCode.INVALID_ARGUMENT.value[0] in codes(), timeout=30)
    assert grpc.StatusCode.OK.value[0] in codes()


def job_trace(receiver: OtlpReceiver, job_id: str) -> list[ReceivedSpan]:
    """The spans of the trace the job's CreateRenderJob started."""
    spans = receiver.spans()
    created = [span for span in spans if span.name.endswith("/CreateRenderJob")]
    trace_ids = {span.trace_id for span in created if span.attributes.get("aiprod.job_id") == job_id}
    return [span for span in spans if span.trace_id in trace_ids]


def test_one_job_is_one_connected_trace_down_to_the_providers_http_calls(mesh, receiver, runway_job):
    def complete() -> bool:
        spans = job_trace(receiver, runway_job.job_id)
        return len(roots(spans)) == 1 and any(span.is_http_client for span in spans)

    assert eventually(complete, timeout=30)
    spans = job_trace(receiver, runway_job.job_id)
    (root,) = roots(spans)
    assert (root.service, root.name) == (
        "aiprod-gateway",
        "/aiprod.gateway.v1.GatewayService/CreateRenderJob",
    )
    assert {"aiprod-gateway", "aiprod-router", "aiprod-renderer-runway", "aiprod-metrics"} <= {
        span.service for span in spans
    }
    attempt = next(span for span in spans if span.name == "render attempt")
    assert (attempt.attributes["aiprod.backend"], attempt.attributes["aiprod.attempt"]) == ("runway", 1)
    # The provider's HTTP calls sit under the attempt: create under StartRender, polls and the download
    # under the render the attempt started.
    http = [span for span in spans if span.service == "aiprod-renderer-runway" and span.is_http_client]
    assert len(http) >= 3
    for call in http:
        assert attempt in list(ancestors(call, spans)), call.name
    operations = {span.attributes.get("aiprod.operation") for span in spans}
    assert {"create", "get", "download"} <= operations


def test_a_job_resumed_after_a_gateway_restart_stays_in_its_trace(mesh, receiver, runway_job):
    sandbox = Sandbox(mesh.address("sandbox"))
    sandbox.reset(render_seconds=4)
    job = create(mesh, "A tram crossing a bridge")
    watch_until(gateway(mesh), job.job_id, lambda event: event.render.WhichOneof("kind") == "submitted")
    # A SIGKILL loses the spans not exported yet; the job's first one must be out before.
    assert eventually(lambda: bool(job_trace(receiver, job.job_id)), timeout=30)
    mesh.kill("gateway")
    mesh.start_service("gateway")
    try:
        done = wait_terminal(gateway(mesh), job.job_id)
        assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
        # Paid once: the restarted gateway re-attached to the render, it did not start another.
        provider = backend_name(done.backend)
        assert sandbox.creates(provider) == {f"{job.job_id}.shot0:1": 1}
    finally:
        sandbox.reset(render_seconds=1)

    def resumed_render() -> list[ReceivedSpan]:
        return [
            span
            for span in job_trace(receiver, job.job_id)
            if span.name == "render attempt" and span.attributes.get("aiprod.resumed")
        ]

    def dispatched() -> list[ReceivedSpan]:
        return [span for span in job_trace(receiver, job.job_id) if span.name == "dispatch job"]

    assert eventually(lambda: bool(resumed_render()) and bool(dispatched()), timeout=30)
    spans = job_trace(receiver, job.job_id)
    creates = [span for span in spans if span.name.endswith("/CreateRenderJob")]
    assert len(creates) == 1
    assert {span.attributes["aiprod.job_id"] for span in spans if "aiprod.job_id" in span.attributes} == {
        job.job_id
    }
    # The killed gateway never exported its first dispatch span; the resumed one hangs off the job's
    # CreateRenderJob, and the resumed attempt (the same task re-attached, not a new render) off it.
    (resumed_dispatch,) = dispatched()
    assert resumed_dispatch.parent_span_id == creates[0].span_id
    assert creates[0] in list(ancestors(resumed_render()[0], spans))


@pytest.mark.parametrize("variant", ["collector", "direct"])
def test_every_metric_k8s_monitoring_names_is_exported_under_that_name(receiver, runway_job, variant):
    """The first version's alert policies named metrics its code never sent: here each name in the
    alert policies, SLOs and dashboard is what an exported metric arrives as on that path."""
    named = monitoring.metric_types(variant)
    assert named, f"k8s/monitoring ({variant}) names no metric"
    exported = {
        monitoring.arriving_name(name, metric.kind, metric.unit, variant)
        for name, metric in receiver.metrics().items()
    }
    assert named <= exported, f"named but never exported: {sorted(named - exported)}"
