"""The Veo renderer end to end: the real renderer process against the provider sandbox's Vertex AI, spoken
to through the generated stubs; faults are injected through the sandbox's control API.

Every test that creates checks the sandbox's counters: exactly one create per idempotency key, however
many requests the faults made the renderer send.
"""

import asyncio
import hashlib
import io
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import grpc
import httpx
import pytest
from google.genai import errors, types
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.failures import Reason
from aiprod_kit.mesh import Mesh, sandbox_environment
from aiprod_kit.rendering.provider import ErrorKind, TaskState
from aiprod_renderers.veo.provider import provider_error, task_of

# Generous: the machine has two cores and the suite may share them with other processes.
TIMEOUT = 60.0
RENDERER_SERVICE = "aiprod.renderer.v1.RendererService"
MODEL = "veo-3.0-generate-001"
OPERATIONS = f"projects/aiprod-sandbox/locations/us-central1/publishers/google/models/{MODEL}/operations/"
BREAKER_COOLDOWN_SECONDS = 1.5
ENVIRONMENT = {
    "AIPROD_SANDBOX_RENDER_SECONDS": "1",
    "AIPROD_VEO_POLL_SECONDS": "0.2",
    "AIPROD_VEO_REQUEST_TIMEOUT_SECONDS": "1",
    # Veo's default (10 a minute, as Vertex's quota) would pace the polls of these short renders.
    "AIPROD_VEO_REQUESTS_PER_MINUTE": "6000",
    "AIPROD_VEO_BREAKER_COOLDOWN_SECONDS": str(BREAKER_COOLDOWN_SECONDS),
}

Stub = renderer_pb2_grpc.RendererServiceStub
PENDING = renderer_pb2.RENDER_STATE_PENDING
RUNNING = renderer_pb2.RENDER_STATE_RUNNING
SUCCEEDED = renderer_pb2.RENDER_STATE_SUCCEEDED
FAILED = renderer_pb2.RENDER_STATE_FAILED
CANCELLED = renderer_pb2.RENDER_STATE_CANCELLED
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Sandbox:
    """The sandbox's control API."""

    client: httpx.AsyncClient

    async def reset(self) -> None:
        (await self.client.post("/_sandbox/reset")).raise_for_status()

    async def fault(self, kind: str, operation: str, **rule: Any) -> None:
        payload = {"provider": "veo", "operation": operation, "kind": kind, **rule}
        (await self.client.post("/_sandbox/faults", json=payload)).raise_for_status()

    async def configure(self, **values: Any) -> None:
        (await self.client.post("/_sandbox/config", json={"provider": "veo", **values})).raise_for_status()

    async def counters(self) -> dict[str, Any]:
        response = await self.client.get("/_sandbox/counters")
        response.raise_for_status()
        return response.json()

    async def creates(self) -> dict[str, int]:
        """Operations created per idempotency key."""
        return (await self.counters())["creates"].get("veo", {})

    async def create_requests(self) -> dict[str, int]:
        """Create requests received per idempotency key, refused or not."""
        return (await self.counters())["create_requests"].get("veo", {})

    async def gets(self, operation_name: str) -> int:
        tasks = (await self.counters())["tasks"].get("veo", {})
        return tasks[operation_name.rpartition("/")[2]]["gets"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = Mesh(
        tmp_path_factory.mktemp("veo"),
        free_ports=True,
        only=("sandbox", "renderer-veo"),
        environment=ENVIRONMENT,
    )
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
async def channel(mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(mesh.address("renderer-veo")) as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Stub:
    return Stub(channel)


@pytest.fixture
async def sandbox(mesh: Mesh, channel: grpc.aio.Channel) -> AsyncIterator[Sandbox]:
    """The sandbox, reset; and the renderer serving (a test before may have opened its breaker)."""
    async with httpx.AsyncClient(base_url=f"http://{mesh.address('sandbox')}", timeout=TIMEOUT) as client:
        control = Sandbox(client)
        await control.reset()
        await _health_until(channel, lambda seen: seen[-1] == SERVING)
        yield control


def _request(
    key: str,
    prompt: str,
    seconds: float = 4,
    aspect: int = render_pb2.ASPECT_RATIO_16_9,
    first_frame: render_pb2.Image | None = None,
) -> renderer_pb2.StartRenderRequest:
    shot = render_pb2.Shot(prompt=prompt, duration_seconds=seconds, aspect_ratio=aspect, seed=7)
    if first_frame is not None:
        shot.first_frame.CopyFrom(first_frame)
    return renderer_pb2.StartRenderRequest(idempotency_key=key, shot=shot)


async def _start(stub: Stub, request: renderer_pb2.StartRenderRequest) -> renderer_pb2.Render:
    return (await stub.StartRender(request, timeout=TIMEOUT)).render


async def _watch(
    stub: Stub, task_id: str, on_message: Callable[[renderer_pb2.Render], None] = lambda render: None
) -> list[renderer_pb2.Render]:
    """Every status WatchRender sends until the render ends; on_message sees each as it arrives."""
    renders = []
    async with asyncio.timeout(TIMEOUT):
        async for message in stub.WatchRender(renderer_pb2.WatchRenderRequest(task_id=task_id)):
            on_message(message.render)
            renders.append(message.render)
    return renders


async def _render(stub: Stub, request: renderer_pb2.StartRenderRequest) -> renderer_pb2.Render:
    """Starts the render and follows it to its end."""
    started = await _start(stub, request)
    assert started.handle.task_id.startswith(OPERATIONS), started
    return (await _watch(stub, started.handle.task_id))[-1]


async def _health_until(
    channel: grpc.aio.Channel, done: Callable[[list[int]], bool], service: str = RENDERER_SERVICE
) -> list[int]:
    """The statuses health Watch sends for the service until done(statuses) holds."""
    call = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=service), wait_for_ready=True
    )
    seen: list[int] = []
    try:
        async with asyncio.timeout(TIMEOUT):
            async for response in call:
                seen.append(response.status)
                if done(seen):
                    return seen
    finally:
        call.cancel()
    raise AssertionError(f"the health stream ended after {seen}")


def _local_path(uri: str) -> Path:
    assert uri.startswith("file:///"), uri
    return Path(uri.removeprefix("file://"))


def _decode(path: Path) -> tuple[int, int, int, float]:
    """(frames, width, height, frame rate) found by decoding every frame."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.codec_context.width, stream.codec_context.height, float(stream.average_rate)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def _assert_succeeded(render: renderer_pb2.Render, mesh: Mesh, size: tuple[int, int] = (1280, 720)) -> None:
    assert render.state == SUCCEEDED, render.failure
    assert render.progress == 1.0
    output = render.output
    assert output.backend == backend_pb2.BACKEND_VEO
    # 4 s at Vertex's list price without audio, 0.20 USD a second: Vertex reports no cost.
    assert (output.cost.currency_code, output.cost.amount_micros) == ("USD", 800_000)
    video = output.video
    path = _local_path(video.uri)
    assert path.is_relative_to((mesh.data_dir / "videos").resolve())
    content = path.read_bytes()
    assert (hashlib.sha256(content).hexdigest(), len(content)) == (video.sha256, video.size_bytes)
    assert (video.width, video.height, video.frame_rate, video.frame_count) == (*size, 24, 96)
    assert _decode(path) == (96, *size, 24.0)
    assert 0 < output.qc.score <= 1
    assert {check.name for check in output.qc.checks} >= {"duration", "resolution", "frame_rate"}


# Rendering ---------------------------------------------------------------------------------------


async def test_capabilities(stub: Stub) -> None:
    capabilities = (await stub.GetCapabilities(renderer_pb2.GetCapabilitiesRequest())).capabilities
    assert capabilities.backend == backend_pb2.BACKEND_VEO
    assert list(capabilities.models) == [MODEL]
    assert list(capabilities.allowed_durations_seconds) == [4, 6, 8]
    assert (capabilities.min_duration_seconds, capabilities.max_duration_seconds) == (4, 8)
    assert set(capabilities.aspect_ratios) == {render_pb2.ASPECT_RATIO_16_9, render_pb2.ASPECT_RATIO_9_16}
    assert list(capabilities.resolutions) == ["720p"]
    assert capabilities.image_input and not capabilities.audio
    assert (capabilities.price_per_second.currency_code, capabilities.price_per_second.amount_micros) == (
        "USD",
        200_000,
    )


async def test_text_to_video(stub: Stub, sandbox: Sandbox, mesh: Mesh) -> None:
    request = _request("t2v-1", "A lighthouse in a storm, waves crashing")
    first, second = await asyncio.gather(_start(stub, request), _start(stub, request))
    task_id = first.handle.task_id
    assert task_id.startswith(OPERATIONS)
    assert second.handle.task_id == task_id
    assert first.handle == backend_pb2.RenderHandle(
        backend=backend_pb2.BACKEND_VEO, task_id=task_id, idempotency_key="t2v-1"
    )

    def stored_before_success(render: renderer_pb2.Render) -> None:
        if render.state == SUCCEEDED:
            assert _local_path(render.output.video.uri).is_file()

    events = await _watch(stub, task_id, stored_before_success)
    states = [event.state for event in events]
    # Each state once, in order: Vertex says only "not done" until it is done.
    assert [state for n, state in enumerate(states) if n == 0 or states[n - 1] != state] in (
        [PENDING, RUNNING, SUCCEEDED],
        [RUNNING, SUCCEEDED],
    )
    progress = [event.progress for event in events]
    assert progress == sorted(progress)
    _assert_succeeded(events[-1], mesh)

    # Ended: GetRender and a new watch tell the same; the same key still names the same render.
    got = (await stub.GetRender(renderer_pb2.GetRenderRequest(task_id=task_id))).render
    assert got == events[-1]
    assert await _watch(stub, task_id) == [events[-1]]
    assert (await _start(stub, request)).handle.task_id == task_id
    assert await sandbox.creates() == {"t2v-1": 1}
    assert await sandbox.create_requests() == {"t2v-1": 1}


@pytest.mark.parametrize(
    "first_frame",
    [
        render_pb2.Image(data=_png(720, 1280), mime_type="image/png"),
        render_pb2.Image(data=_png(720, 1280)),  # the media type is read from the bytes
        render_pb2.Image(uri="gs://aiprod-inputs/first-frame.png"),  # Vertex reads it itself
    ],
    ids=["png", "png-untyped", "gcs"],
)
async def test_image_to_video(
    stub: Stub, sandbox: Sandbox, mesh: Mesh, first_frame: render_pb2.Image
) -> None:
    key = f"i2v-{hashlib.sha256(first_frame.SerializeToString()).hexdigest()[:12]}"
    request = _request(
        key, "The scene comes to life", aspect=render_pb2.ASPECT_RATIO_9_16, first_frame=first_frame
    )
    _assert_succeeded(await _render(stub, request), mesh, size=(720, 1280))
    assert await sandbox.creates() == {key: 1}


async def test_an_image_vertex_cannot_read_is_refused(stub: Stub, sandbox: Sandbox) -> None:
    first_frame = render_pb2.Image(data=b"\x89PNG but not an image", mime_type="image/png")
    render = await _start(stub, _request("i2v-bad", "The scene comes to life", first_frame=first_frame))
    assert render.state == FAILED
    assert render.failure.reason == Reason.PROVIDER_REFUSED and not render.failure.retryable
    assert "not a valid image" in render.failure.message
    assert await sandbox.creates() == {}
    assert await sandbox.create_requests() == {"i2v-bad": 1}


async def test_output_is_copied_before_it_expires(stub: Stub, sandbox: Sandbox, mesh: Mesh) -> None:
    # Veo hands the bytes over in the operation itself; an output that expires fast changes nothing.
    await sandbox.configure(output_ttl_seconds=0.1)
    _assert_succeeded(await _render(stub, _request("ttl-1", "A short-lived output")), mesh)
    assert await sandbox.creates() == {"ttl-1": 1}


async def test_cancel_stops_following_as_vertex_has_no_cancel(stub: Stub, sandbox: Sandbox) -> None:
    task_id = (
        await _start(stub, _request("cancel-1", "A render that runs forever [sandbox:never]"))
    ).handle.task_id
    async with asyncio.timeout(TIMEOUT):
        stream = stub.WatchRender(renderer_pb2.WatchRenderRequest(task_id=task_id))
        async for message in stream:
            if message.render.state == RUNNING:
                break
        cancelled = (await stub.CancelRender(renderer_pb2.CancelRenderRequest(task_id=task_id))).render
        rest = [message.render async for message in stream]
    assert cancelled.state == CANCELLED
    assert cancelled.failure.reason == Reason.CANCELLED
    assert "veo has no cancel" in cancelled.failure.message
    # The operation runs on and bills if it succeeds: the full list price, 4 s at 0.20 USD.
    assert cancelled.charge.amount_micros == 4 * 200_000
    assert rest[-1] == cancelled
    assert (await stub.GetRender(renderer_pb2.GetRenderRequest(task_id=task_id))).render == cancelled
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CancelRender(renderer_pb2.CancelRenderRequest(task_id=task_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    counters = await sandbox.counters()
    assert "cancel" not in counters["requests"]["veo"]  # nothing was sent: there is nothing to send
    assert counters["creates"]["veo"] == {"cancel-1": 1}


async def test_safety_refusal(stub: Stub, sandbox: Sandbox) -> None:
    render = await _render(stub, _request("safety-1", "Something Vertex will not render [sandbox:safety]"))
    assert render.state == FAILED
    failure = render.failure
    # Vertex's Responsible AI filter blames the prompt; its support code is kept.
    assert failure.reason == Reason.PROVIDER_SAFETY_INPUT
    assert failure.provider_code == "SAFETY.INPUT.58061214"
    assert "Responsible AI" in failure.message
    assert not failure.retryable
    assert render.HasField("charge") and render.charge.amount_micros == 0  # no video, no bill
    assert await sandbox.creates() == {"safety-1": 1}


async def test_failed_operation(stub: Stub, sandbox: Sandbox) -> None:
    render = await _render(stub, _request("fail-1", "A render that breaks halfway [sandbox:fail]"))
    assert render.state == FAILED
    assert (render.failure.reason, render.failure.provider_code) == (Reason.PROVIDER_FAILED, "INTERNAL")
    assert render.failure.retryable
    assert await sandbox.creates() == {"fail-1": 1}


async def test_unknown_operations(stub: Stub, sandbox: Sandbox) -> None:
    for task_id in (f"{OPERATIONS}00000000-0000-0000-0000-000000000001", "not-an-operation"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetRender(renderer_pb2.GetRenderRequest(task_id=task_id))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_restarted_renderer_reattaches_to_the_operation(
    stub: Stub, sandbox: Sandbox, mesh: Mesh, channel: grpc.aio.Channel
) -> None:
    await sandbox.configure(render_seconds=3)
    task_id = (await _start(stub, _request("restart-1", "Outlives its renderer"))).handle.task_id
    mesh.kill("renderer-veo")
    await asyncio.to_thread(mesh.start_service, "renderer-veo")
    await _health_until(channel, lambda seen: seen[-1] == SERVING)
    final = (await _watch(stub, task_id))[-1]
    assert final.state == SUCCEEDED, final.failure
    assert _decode(_local_path(final.output.video.uri)) == (96, 1280, 720, 24.0)
    assert await sandbox.creates() == {"restart-1": 1}


# Faults ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", [None, 1], ids=["no-retry-after", "retry-after-1"])
async def test_rate_limited_create_is_sent_again(
    stub: Stub, sandbox: Sandbox, mesh: Mesh, retry_after: int | None
) -> None:
    await sandbox.fault("429", "create", retry_after=retry_after)
    began = time.monotonic()
    key = f"429-{retry_after}"
    started = await _start(stub, _request(key, "Sent twice, created once"))
    if retry_after is not None:
        assert time.monotonic() - began >= retry_after * 0.9
    _assert_succeeded((await _watch(stub, started.handle.task_id))[-1], mesh)
    assert await sandbox.create_requests() == {key: 2}
    assert await sandbox.creates() == {key: 1}


async def test_unavailable_create_is_sent_again(stub: Stub, sandbox: Sandbox, mesh: Mesh) -> None:
    await sandbox.fault("5xx", "create", status=503)
    _assert_succeeded(await _render(stub, _request("503-1", "Refused once, then created")), mesh)
    assert await sandbox.create_requests() == {"503-1": 2}
    assert await sandbox.creates() == {"503-1": 1}


async def test_internal_error_on_create_is_not_sent_again(stub: Stub, sandbox: Sandbox) -> None:
    # A 500 does not say whether the operation was started: sending again could pay twice.
    await sandbox.fault("5xx", "create", status=500)
    render = await _start(stub, _request("500-1", "Uncertain"))
    assert render.state == FAILED
    assert render.failure.reason == Reason.PROVIDER_UNCERTAIN and not render.failure.retryable
    assert await sandbox.create_requests() == {"500-1": 1}
    assert await sandbox.creates() == {}


async def test_lost_create_answer_is_not_sent_again(stub: Stub, sandbox: Sandbox) -> None:
    # The operation is started but the connection drops before the answer: neither the kit nor the
    # client (whose implicit resend after a broken aiohttp connection is off) sends it again.
    await sandbox.fault("drop", "create", phase="after")
    render = await _start(stub, _request("drop-create-1", "Started, answer lost"))
    assert render.state == FAILED
    assert render.failure.reason == Reason.PROVIDER_UNCERTAIN
    assert await sandbox.create_requests() == {"drop-create-1": 1}
    assert await sandbox.creates() == {"drop-create-1": 1}


@pytest.mark.parametrize(
    "rule",
    [
        {"kind": "5xx", "status": 503},
        {"kind": "5xx", "status": 500},
        {"kind": "hang", "hang_seconds": 5},  # longer than AIPROD_VEO_REQUEST_TIMEOUT_SECONDS
        {"kind": "drop"},
    ],
    ids=["503", "500", "hang", "drop"],
)
async def test_get_faults_are_ridden_out(
    stub: Stub, sandbox: Sandbox, mesh: Mesh, rule: dict[str, Any]
) -> None:
    await sandbox.fault(operation="get", times=2, **rule)
    key = f"get-{rule['kind']}-{rule.get('status', '')}"
    render = await _render(stub, _request(key, "Polled through trouble"))
    _assert_succeeded(render, mesh)
    fired = (await sandbox.client.get("/_sandbox/faults")).json()
    assert [f["fired"] for f in fired] == [2]
    assert await sandbox.creates() == {key: 1}


@pytest.mark.parametrize("kind", ["401", "403"])
async def test_rejected_credentials_stop_serving_until_a_probe_passes(
    stub: Stub, sandbox: Sandbox, channel: grpc.aio.Channel, kind: str
) -> None:
    health = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=RENDERER_SERVICE)
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            statuses = aiter(health)
            assert (await anext(statuses)).status == SERVING
            await sandbox.fault(kind, "create")
            # Before the breaker opens (in the call), so that its cooldown is all inside what is timed.
            began = time.monotonic()
            render = await _start(stub, _request(f"auth-{kind}", "Refused credentials"))
            assert render.state == FAILED
            assert render.failure.reason == Reason.PROVIDER_AUTH and render.failure.retryable
            assert (await anext(statuses)).status == NOT_SERVING
            # While the breaker is open nothing is sent.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.StartRender(_request(f"auth-{kind}-2", "Not even tried"))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "circuit breaker is open" in (caught.value.details() or "")
            # After the cooldown a probe (an authenticated read) passes: serving again.
            assert (await anext(statuses)).status == SERVING
            assert time.monotonic() - began >= BREAKER_COOLDOWN_SECONDS * 0.9
    finally:
        health.cancel()
    assert await sandbox.create_requests() == {f"auth-{kind}": 1}
    assert await sandbox.creates() == {}


# Configuration -----------------------------------------------------------------------------------


async def test_missing_credentials_is_not_serving(mesh: Mesh, sandbox: Sandbox, tmp_path: Path) -> None:
    environment = {
        **sandbox_environment(mesh.address("sandbox")),
        **ENVIRONMENT,
        "AIPROD_VEO_ACCESS_TOKEN": "",
        # No Application Default Credentials either.
        "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "missing.json"),
    }
    unconfigured = Mesh(tmp_path, free_ports=True, only=("renderer-veo",), environment=environment)
    await asyncio.to_thread(unconfigured.start)
    try:
        async with grpc.aio.insecure_channel(unconfigured.address("renderer-veo")) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service, status in (("", SERVING), (RENDERER_SERVICE, NOT_SERVING)):
                response = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert response.status == status, service
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await Stub(channel).StartRender(_request("no-credentials-1", "Never sent"))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "GOOGLE_APPLICATION_CREDENTIALS" in (caught.value.details() or "")
    finally:
        await asyncio.to_thread(unconfigured.stop)
    counters = await sandbox.counters()
    assert "veo" not in counters["requests"]  # not even a probe
    assert counters["creates"].get("veo", {}) == {}


@pytest.mark.parametrize(
    ("variable", "value"),
    [("AIPROD_VEO_MODEL", "nope"), ("GOOGLE_CLOUD_PROJECT", "")],
    ids=["unknown-model", "no-project"],
)
def test_bad_configuration_stops_the_process(tmp_path: Path, variable: str, value: str) -> None:
    environment = {
        **os.environ,
        **sandbox_environment("127.0.0.1:9"),
        "AIPROD_VEO_PORT": "0",
        "AIPROD_DATA_DIR": str(tmp_path),
        "AIPROD_LOG_FORMAT": "json",
        variable: value,
    }
    finished = subprocess.run(
        [sys.executable, "-m", "aiprod_renderers.veo"],
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert finished.returncode != 0
    log = finished.stderr.decode(errors="replace")
    assert "configuration error" in log and variable in log
    assert '"serving"' not in log


# The adapter's reading of Vertex's answers -------------------------------------------------------


def test_reading_operations() -> None:
    def operation(**fields: Any) -> types.GenerateVideosOperation:
        return types.GenerateVideosOperation.from_api_response({"name": f"{OPERATIONS}x", **fields}, True)

    running = task_of(operation(metadata={"progressPercent": 40}))
    assert (running.state, running.progress) == (TaskState.RUNNING, 0.4)
    assert task_of(operation(done=False)).progress == 0.0

    prompt_refused = task_of(
        operation(
            done=True,
            error={
                "code": 3,
                "message": "The prompt contains sensitive words that violate Google's Responsible AI "
                "practices. Support codes: 17301594",
            },
        )
    )
    assert (prompt_refused.state, prompt_refused.failure_code) == (TaskState.FAILED, "SAFETY.INPUT.17301594")
    output_filtered = task_of(
        operation(
            done=True,
            response={
                "raiMediaFilteredCount": 1,
                "raiMediaFilteredReasons": ["The generated video was filtered by Responsible AI filters."],
            },
        )
    )
    assert output_filtered.failure_code == "SAFETY.OUTPUT"
    assert task_of(operation(done=True, error={"code": 4, "message": "late"})).failure_code == (
        "DEADLINE_EXCEEDED"
    )
    stored = task_of(operation(done=True, response={"videos": [{"gcsUri": "gs://b/o.mp4"}]}))
    assert stored.state == TaskState.SUCCEEDED
    assert stored.outputs[0].gcs_uri == "gs://b/o.mp4"


def test_reading_errors() -> None:
    class Response:
        headers = {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}

    limited = provider_error(errors.ClientError(429, {"error": {"message": "quota"}}, Response()))  # type: ignore[arg-type]
    assert (limited.kind, limited.retry_after) == (ErrorKind.RATE_LIMITED, 0.0)
    for code, kind in ((400, ErrorKind.REFUSED), (403, ErrorKind.AUTH), (404, ErrorKind.NOT_FOUND)):
        assert provider_error(errors.ClientError(code, {}, None)).kind == kind
    for code, kind in (
        (500, ErrorKind.AMBIGUOUS),
        (503, ErrorKind.UNAVAILABLE),
        (504, ErrorKind.UNAVAILABLE),
    ):
        assert provider_error(errors.ServerError(code, {}, None)).kind == kind
