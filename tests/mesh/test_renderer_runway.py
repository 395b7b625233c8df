"""The Runway renderer through its gRPC API, with the official runwayml client talking to the sandbox."""

import io
from collections.abc import Iterator

import av
import grpc
import pytest
from helpers.sandbox import (
    NOT_SERVING,
    SERVING,
    Sandbox,
    follow,
    health_watch,
    renderer,
    shot,
    start,
    wait_for_status,
)
from PIL import Image

from aiprod.common.v1 import render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.failures import Reason
from aiprod_kit.mesh import Mesh

FAST = {
    "AIPROD_RUNWAY_POLL_SECONDS": "0.2",
    "AIPROD_RUNWAY_REQUEST_TIMEOUT_SECONDS": "2",
    "AIPROD_RUNWAY_BREAKER_FAILURES": "3",
    "AIPROD_RUNWAY_BREAKER_COOLDOWN_SECONDS": "1",
}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = Mesh(
        tmp_path_factory.mktemp("runway"),
        free_ports=True,
        only=("sandbox", "renderer-runway"),
        environment=FAST,
    )
    running.start()
    yield running
    running.stop()


@pytest.fixture
def sandbox(mesh: Mesh) -> Iterator[Sandbox]:
    control = Sandbox(mesh.address("sandbox"))
    control.reset(render_seconds=1)
    yield control
    # Whatever a test did, the renderer must be serving for the next one.
    with health_watch(mesh, "runway") as statuses:
        wait_for_status(statuses, SERVING)


def test_text_to_video_is_copied_checked_and_priced(mesh, sandbox):
    stub = renderer(mesh, "runway")
    started = start(stub, "t2v-1", shot(seconds=2))
    assert started.handle.task_id
    statuses = follow(stub, started.handle.task_id)
    final = statuses[-1]
    assert final.state == renderer_pb2.RENDER_STATE_SUCCEEDED, final.failure
    assert any(status.state == renderer_pb2.RENDER_STATE_RUNNING for status in statuses)
    video = final.output.video
    assert video.uri.startswith(f"file://{mesh.data_dir}/videos/")
    with av.open(video.uri.removeprefix("file://")) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == 48
    assert (video.width, video.height) == (1280, 720)
    assert final.output.qc.score > 0.9
    assert final.output.cost.amount_micros == 2 * 12 * 10_000  # gen4.5: 12 credits a second
    # What Runway bills for the task: its cost.credits.
    assert final.charge.amount_micros == 2 * 12 * 10_000 and final.charge.currency_code == "USD"
    assert final.model == "gen4.5"
    assert sandbox.creates("runway") == {"t2v-1": 1}


def test_image_to_video(mesh, sandbox):
    stub = renderer(mesh, "runway")
    image = render_pb2.Image(data=_png(), mime_type="image/png")
    final = follow(stub, start(stub, "i2v-1", shot(seconds=2, first_frame=image)).handle.task_id)[-1]
    assert final.state == renderer_pb2.RENDER_STATE_SUCCEEDED, final.failure
    assert sandbox.creates("runway") == {"i2v-1": 1}


def test_the_same_key_never_creates_twice(mesh, sandbox):
    stub = renderer(mesh, "runway")
    first = start(stub, "same-key", shot(seconds=2))
    again = start(stub, "same-key", shot(seconds=2))
    assert again.handle.task_id == first.handle.task_id
    follow(stub, first.handle.task_id)
    assert sandbox.creates("runway") == {"same-key": 1}


def test_cancel_cancels_the_task_at_runway(mesh, sandbox):
    stub = renderer(mesh, "runway")
    started = start(stub, "cancel-1", shot("[sandbox:never] a render that never ends", seconds=2))
    cancelled = stub.CancelRender(renderer_pb2.CancelRenderRequest(task_id=started.handle.task_id)).render
    assert cancelled.state == renderer_pb2.RENDER_STATE_CANCELLED
    # Runway takes the credits at creation and keeps them on a cancel: the full estimate.
    assert cancelled.charge.amount_micros == 2 * 12 * 10_000
    assert sandbox.counters()["tasks"]["runway"][started.handle.task_id]["cancels"] == 1
    with pytest.raises(grpc.RpcError) as again:
        stub.CancelRender(renderer_pb2.CancelRenderRequest(task_id=started.handle.task_id))
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # An ended render is answered as it ended, its charge included.
    assert stub.GetRender(renderer_pb2.GetRenderRequest(task_id=started.handle.task_id)).render == cancelled
    assert sandbox.creates("runway") == {"cancel-1": 1}


def test_the_output_is_copied_before_its_url_expires(mesh, sandbox):
    sandbox.reset(render_seconds=1, output_ttl_seconds=1)
    stub = renderer(mesh, "runway")
    final = follow(stub, start(stub, "expiry-1", shot(seconds=2)).handle.task_id)[-1]
    assert final.state == renderer_pb2.RENDER_STATE_SUCCEEDED, final.failure
    assert (mesh.data_dir / "videos").exists()
    assert sandbox.creates("runway") == {"expiry-1": 1}


def test_a_safety_refusal_ends_the_render_with_runways_reason(mesh, sandbox):
    stub = renderer(mesh, "runway")
    final = follow(
        stub, start(stub, "safety-1", shot("[sandbox:safety] something unsafe", seconds=2)).handle.task_id
    )[-1]
    assert final.state == renderer_pb2.RENDER_STATE_FAILED
    assert final.failure.reason == Reason.PROVIDER_SAFETY_INPUT
    assert final.failure.provider_code.startswith("SAFETY.INPUT")
    assert not final.failure.retryable
    # Runway refunds failed tasks, safety refusals included.
    assert final.HasField("charge") and final.charge.amount_micros == 0
    assert sandbox.creates("runway") == {"safety-1": 1}


@pytest.mark.parametrize("retry_after", [1, None])
def test_a_rate_limited_create_is_sent_again_after_the_wait(mesh, sandbox, retry_after):
    sandbox.fault("runway", "create", "429", times=2, retry_after=retry_after)
    stub = renderer(mesh, "runway")
    final = follow(stub, start(stub, f"429-{retry_after}", shot(seconds=2)).handle.task_id)[-1]
    assert final.state == renderer_pb2.RENDER_STATE_SUCCEEDED, final.failure
    assert sandbox.creates("runway") == {f"429-{retry_after}": 1}
    assert sandbox.counters()["create_requests"]["runway"][f"429-{retry_after}"] == 3


@pytest.mark.parametrize("operation", ["create", "get"])
def test_a_server_error_is_retried(mesh, sandbox, operation):
    sandbox.fault("runway", operation, "5xx", times=1, status=503)
    stub = renderer(mesh, "runway")
    final = follow(stub, start(stub, f"5xx-{operation}", shot(seconds=2)).handle.task_id)[-1]
    assert final.state == renderer_pb2.RENDER_STATE_SUCCEEDED, final.failure
    assert sandbox.creates("runway") == {f"5xx-{operation}": 1}


@pytest.mark.parametrize("kind", ["hang", "drop"])
def test_a_hung_or_dropped_poll_is_retried(mesh, sandbox, kind):
    sandbox.fault("runway", "get", kind, times=1, hang_seconds=30)
    stub = renderer(mesh, "runway")
    final = follow(stub, start(stub, f"{kind}-get", shot(seconds=2)).handle.task_id)[-1]
    assert final.state == renderer_pb2.RENDER_STATE_SUCCEEDED, final.failure
    assert sandbox.creates("runway") == {f"{kind}-get": 1}


def test_a_create_that_may_have_reached_runway_is_never_sent_again(mesh, sandbox):
    sandbox.fault("runway", "create", "hang", times=1, hang_seconds=30)
    stub = renderer(mesh, "runway")
    started = start(stub, "uncertain-1", shot(seconds=2))
    assert started.state == renderer_pb2.RENDER_STATE_FAILED
    assert started.failure.reason == Reason.PROVIDER_UNCERTAIN
    assert not started.HasField("charge")  # whether Runway created (and bills) it is not known
    assert start(stub, "uncertain-1", shot(seconds=2)).failure.reason == Reason.PROVIDER_UNCERTAIN
    assert sandbox.counters()["create_requests"]["runway"]["uncertain-1"] == 1


def test_rejected_credentials_turn_the_renderer_not_serving_until_a_probe_passes(mesh, sandbox):
    with health_watch(mesh, "runway") as statuses:
        wait_for_status(statuses, SERVING)
        sandbox.fault("runway", "*", "401", times=2)  # the create, then the first probe
        stub = renderer(mesh, "runway")
        refused = start(stub, "auth-1", shot(seconds=2))
        assert refused.failure.reason == Reason.PROVIDER_AUTH
        wait_for_status(statuses, NOT_SERVING)
        with pytest.raises(grpc.RpcError) as unavailable:
            start(stub, "auth-2", shot(seconds=2))
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
        wait_for_status(statuses, SERVING)  # a later half-open probe passes: the faults are used up
    assert sandbox.creates("runway") == {}


def test_missing_credentials_keep_the_renderer_not_serving(tmp_path):
    mesh = Mesh(
        tmp_path,
        free_ports=True,
        only=("sandbox", "renderer-runway"),
        environment={"RUNWAYML_API_SECRET": ""},
    )
    mesh.start()
    try:
        with health_watch(mesh, "runway") as statuses:
            assert next(statuses) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as unavailable:
            start(renderer(mesh, "runway"), "no-creds", shot(seconds=2))
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "RUNWAYML_API_SECRET" in unavailable.value.details()
    finally:
        mesh.stop()


def test_an_unknown_model_stops_the_renderer_at_start_naming_the_variable(tmp_path):
    mesh = Mesh(
        tmp_path, free_ports=True, only=("renderer-runway",), environment={"AIPROD_RUNWAY_MODEL": "gen99"}
    )
    with pytest.raises(Exception, match="did not start"):
        mesh.start()
    assert "AIPROD_RUNWAY_MODEL" in (tmp_path / "logs" / "renderer-runway.log").read_text()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 36), (200, 80, 40)).save(buffer, format="PNG")
    return buffer.getvalue()
