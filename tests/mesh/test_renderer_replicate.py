"""The Replicate renderer: its adapter against a fake transport, then the real process against the
provider sandbox (the official replicate client, unmodified, pointed at it), through the gRPC stubs."""

import email.utils
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import av
import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.mesh import eventually
from PIL import Image

from aiprod.common.v1 import render_pb2
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.failures import SAFETY_REASONS, Reason
from aiprod_kit.mesh import SANDBOX_API_KEY, Mesh
from aiprod_kit.rendering.provider import (
    ErrorKind,
    ProviderError,
    TaskState,
    VideoSource,
    retry_after_seconds,
)
from aiprod_kit.settings import ConfigurationError, ReplicateSettings
from aiprod_renderers.replicate.provider import ReplicateProvider

# A model the sandbox renders at any length; the default one (minimax/video-01) only makes 6 s.
MODEL = "aiprod/sandbox-video"
FULL_MAPPING = json.dumps(
    {
        "prompt": "prompt",
        "first_frame": "first_frame_image",
        "duration_seconds": "duration",
        "aspect_ratio": "aspect_ratio",
        "seed": "seed",
    }
)
PRICE_PER_SECOND_USD = 0.05
BREAKER_COOLDOWN_SECONDS = 1.0


def settings(api_token: str = "token", **values: object) -> ReplicateSettings:
    """Settings as the environment would give them (the credentials under the client's own names)."""
    aliases = {"REPLICATE_API_TOKEN": api_token, "REPLICATE_BASE_URL": "http://replicate.test"}
    return ReplicateSettings(**aliases, **values)  # type: ignore[arg-type]


def a_shot(
    prompt: str = "A fox running through snow", seconds: float = 2, **fields: object
) -> render_pb2.Shot:
    return render_pb2.Shot(
        prompt=prompt, duration_seconds=seconds, aspect_ratio=render_pb2.ASPECT_RATIO_16_9, seed=7, **fields
    )


def png(width: int = 320, height: int = 180) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def prediction(status: str, **fields: object) -> dict[str, object]:
    return {
        "id": "p1",
        "model": MODEL,
        "version": "v1",
        "status": status,
        "input": {},
        "output": None,
        "logs": "",
        "error": None,
        "metrics": {},
        "created_at": "2025-01-01T00:00:00Z",
        "urls": {"get": "http://replicate.test/v1/predictions/p1"},
        **fields,
    }


def faked(handler: Callable[[httpx.Request], httpx.Response], **values: object) -> ReplicateProvider:
    """A provider of the sandbox's generic model whose replicate client talks to handler."""
    values.setdefault("model", MODEL)
    values.setdefault("input_mapping", FULL_MAPPING)
    return ReplicateProvider(settings(**values), transport=httpx.MockTransport(handler))


# The adapter alone -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"model": "video-01"}, "AIPROD_REPLICATE_MODEL"),
        ({"model": "minimax/video-01/extra"}, "AIPROD_REPLICATE_MODEL"),
        ({"input_mapping": "{not json"}, "AIPROD_REPLICATE_INPUT_MAPPING"),
        ({"input_mapping": "[]"}, "AIPROD_REPLICATE_INPUT_MAPPING"),
        ({"input_mapping": '{"prompt": "prompt", "fps": "fps"}'}, "AIPROD_REPLICATE_INPUT_MAPPING"),
        ({"input_mapping": '{"first_frame": "image"}'}, "AIPROD_REPLICATE_INPUT_MAPPING"),
        ({"input_mapping": '{"prompt": ""}'}, "AIPROD_REPLICATE_INPUT_MAPPING"),
        ({"input_mapping": '{"prompt": "text", "seed": "text"}'}, "AIPROD_REPLICATE_INPUT_MAPPING"),
    ],
)
def test_bad_settings_name_their_variable(values: dict[str, object], variable: str) -> None:
    with pytest.raises(ConfigurationError, match=variable):
        ReplicateProvider(settings(**values))


def test_default_model_capabilities() -> None:
    provider = ReplicateProvider(settings())
    capabilities = provider.capabilities()
    assert list(capabilities.models) == ["minimax/video-01"]
    assert list(capabilities.allowed_durations_seconds) == [6]
    assert list(capabilities.aspect_ratios) == [render_pb2.ASPECT_RATIO_16_9]
    assert capabilities.image_input
    assert capabilities.price_per_second.amount_micros == 50_000
    assert capabilities.nominal_quality == pytest.approx(0.75)
    assert provider.frame_rate == 25.0
    assert provider.frame_size(a_shot(seconds=6)) == (1280, 720)
    assert provider.missing_configuration() == []
    assert ReplicateProvider(settings(api_token="")).missing_configuration() == ["REPLICATE_API_TOKEN"]


def test_generic_model_capabilities_follow_the_mapping() -> None:
    mapped = ReplicateProvider(settings(model=MODEL, input_mapping=FULL_MAPPING)).capabilities()
    assert (mapped.min_duration_seconds, mapped.max_duration_seconds) == (2, 10)
    assert set(mapped.aspect_ratios) == {
        render_pb2.ASPECT_RATIO_16_9,
        render_pb2.ASPECT_RATIO_9_16,
        render_pb2.ASPECT_RATIO_1_1,
    }
    assert mapped.image_input
    bare = ReplicateProvider(settings(model=MODEL, input_mapping='{"prompt": "text"}')).capabilities()
    assert list(bare.aspect_ratios) == [render_pb2.ASPECT_RATIO_16_9]
    assert not bare.image_input


def test_only_mapped_fields_are_sent() -> None:
    provider = ReplicateProvider(settings(model=MODEL, input_mapping=FULL_MAPPING))
    image = png()
    shot = a_shot(
        seconds=4,
        first_frame=render_pb2.Image(data=image, mime_type="image/png"),
    )
    shot.aspect_ratio = render_pb2.ASPECT_RATIO_9_16
    shot.seed = 2**40 + 5
    sent = provider.model_input(shot)
    assert sent["prompt"] == shot.prompt
    assert sent["duration"] == 4
    assert sent["aspect_ratio"] == "9:16"
    assert 0 <= sent["seed"] < 2**31
    assert sent["first_frame_image"].startswith("data:image/png;base64,")

    text_only = ReplicateProvider(settings(model=MODEL, input_mapping='{"prompt": "text"}'))
    assert text_only.model_input(a_shot()) == {"text": "A fox running through snow"}
    with pytest.raises(ProviderError) as refused:
        text_only.model_input(a_shot(first_frame=render_pb2.Image(data=image)))
    assert refused.value.kind == ErrorKind.REFUSED
    url = a_shot(first_frame=render_pb2.Image(uri="https://example.com/a.png"))
    assert provider.model_input(url)["first_frame_image"] == "https://example.com/a.png"
    with pytest.raises(ProviderError):
        provider.model_input(a_shot(first_frame=render_pb2.Image(uri="gs://bucket/a.png")))


async def test_create_sends_the_idempotency_key_and_is_never_retried_by_the_client() -> None:
    requests: list[httpx.Request] = []
    answers = [httpx.Response(503, json={"detail": "busy"}), httpx.Response(201, json=prediction("starting"))]

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return answers.pop(0)

    provider = faked(handler)
    with pytest.raises(ProviderError) as unavailable:
        await provider.create(a_shot(), MODEL, "key-1")
    assert unavailable.value.kind == ErrorKind.UNAVAILABLE
    assert len(requests) == 1  # the client did not send the POST again by itself
    assert await provider.create(a_shot(), MODEL, "key-1") == "p1"
    assert [r.headers["Idempotency-Key"] for r in requests] == ["key-1", "key-1"]
    assert requests[-1].url.path == f"/v1/models/{MODEL}/predictions"
    assert requests[-1].headers["Authorization"] == "Bearer token"
    assert json.loads(requests[-1].content)["input"]["duration"] == 2
    # Other requests carry no key.
    answers.append(httpx.Response(200, json=prediction("processing")))
    await provider.get("p1")
    assert "Idempotency-Key" not in requests[-1].headers


@pytest.mark.parametrize(
    ("response", "kind", "retry_after"),
    [
        (
            httpx.Response(429, json={"detail": "Request was throttled."}, headers={"Retry-After": "7"}),
            "rate",
            7,
        ),
        (httpx.Response(429, json={"detail": "Request was throttled."}), "rate", None),
        (httpx.Response(401, json={"title": "Unauthenticated", "status": 401}), "auth", None),
        (httpx.Response(403, json={"detail": "forbidden"}), "auth", None),
        (httpx.Response(404, json={"detail": "Not found."}), "not_found", None),
        (httpx.Response(422, json={"detail": "Invalid input"}), "refused", None),
        (httpx.Response(500, json={"detail": "oops"}), "ambiguous", None),
        (httpx.Response(502, text="Bad Gateway"), "unavailable", None),
        (httpx.Response(201, text="<html>"), "ambiguous", None),
    ],
)
async def test_create_errors_are_mapped(
    response: httpx.Response, kind: str, retry_after: float | None
) -> None:
    provider = faked(lambda request: response)
    with pytest.raises(ProviderError) as error:
        await provider.create(a_shot(), MODEL, "key-1")
    assert error.value.kind.value.startswith(kind)
    assert error.value.retry_after == retry_after


async def test_probe_reads_the_account() -> None:
    seen: list[str] = []
    answers = [
        httpx.Response(
            200, json={"type": "user", "username": "aiprod", "name": "AIPROD", "github_url": None}
        ),
        httpx.Response(401, json={"detail": "You did not pass a valid authentication token"}),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        return answers.pop(0)

    provider = faked(handler)
    await provider.probe()
    with pytest.raises(ProviderError) as rejected:
        await provider.probe()
    assert rejected.value.kind == ErrorKind.AUTH
    assert seen == ["GET /v1/account", "GET /v1/account"]
    await provider.aclose()


def test_retry_after_in_both_forms() -> None:
    read = retry_after_seconds
    assert read("3") == 3.0
    assert read("0.5") == 0.5
    later = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= (read(later) or 0) <= 31
    assert read("soon") is None
    assert read(None) is None


@pytest.mark.parametrize(
    ("exception", "kind"),
    [
        (httpx.ConnectError("refused"), ErrorKind.UNAVAILABLE),
        (httpx.ReadTimeout("slow"), ErrorKind.AMBIGUOUS),
        (httpx.RemoteProtocolError("closed"), ErrorKind.AMBIGUOUS),
    ],
)
async def test_transport_errors_are_mapped(exception: Exception, kind: ErrorKind) -> None:

    def handler(request: httpx.Request) -> httpx.Response:
        raise exception

    provider = faked(handler)
    with pytest.raises(ProviderError) as error:
        await provider.create(a_shot(), MODEL, "key-1")
    assert error.value.kind == kind


@pytest.mark.parametrize(
    ("answer", "state", "check"),
    [
        (prediction("starting"), TaskState.PENDING, lambda task: task.progress == 0),
        (prediction("processing", logs="loading\n"), TaskState.RUNNING, lambda task: task.progress == 0),
        (
            prediction("processing", logs=" 45%|####      | 45/100 [00:01<00:02]\n"),
            TaskState.RUNNING,
            lambda task: task.progress == pytest.approx(0.45),
        ),
        (
            prediction("processing", logs="progress: 30%\nprogress: 62.5%\n"),
            TaskState.RUNNING,
            lambda task: task.progress == pytest.approx(0.625),
        ),
        (
            prediction("processing", logs="100%|##########| 10/10\n"),
            TaskState.RUNNING,
            lambda task: task.progress < 1,
        ),
        (
            prediction("succeeded", output="https://replicate.delivery/a.mp4"),
            TaskState.SUCCEEDED,
            lambda task: task.outputs == (VideoSource(url="https://replicate.delivery/a.mp4"),),
        ),
        (
            prediction("succeeded", output=["https://replicate.delivery/b.mp4"]),
            TaskState.SUCCEEDED,
            lambda task: task.outputs == (VideoSource(url="https://replicate.delivery/b.mp4"),),
        ),
        (
            prediction("failed", error="NSFW content detected in the input prompt"),
            TaskState.FAILED,
            lambda task: task.failure_code == "SAFETY.INPUT",
        ),
        (
            prediction("failed", error="The input or output was flagged as sensitive. (E005)"),
            TaskState.FAILED,
            lambda task: task.failure_code == "SAFETY.INPUT" and "E005" in task.failure_message,
        ),
        (
            prediction("failed", error="NSFW content detected in the output video"),
            TaskState.FAILED,
            lambda task: task.failure_code == "SAFETY.OUTPUT",
        ),
        (
            prediction("failed", error="Prediction interrupted; please retry (code: PA)"),
            TaskState.FAILED,
            lambda task: task.failure_code == "" and "interrupted" in task.failure_message,
        ),
        (prediction("canceled"), TaskState.CANCELLED, lambda task: True),
        (prediction("aborted"), TaskState.FAILED, lambda task: task.failure_code == "ABORTED"),
    ],
)
async def test_predictions_are_read(answer: dict[str, object], state: TaskState, check: Callable) -> None:  # type: ignore[type-arg]
    provider = faked(lambda request: httpx.Response(200, json=answer))
    task = await provider.get("p1")
    assert task.state == state
    assert check(task), task


# The sandbox's control API and the waits on streams ------------------------------------------------

RENDERER_SERVICE = "aiprod.renderer.v1.RendererService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Sandbox:
    def __init__(self, address: str) -> None:
        self.root = f"http://{address}"
        self.http = httpx.Client(base_url=self.root, timeout=10)

    def reset(self, **config: object) -> None:
        self.http.post("/_sandbox/reset").raise_for_status()
        if config:
            self.http.post("/_sandbox/config", json={"provider": "replicate", **config}).raise_for_status()

    def fault(self, operation: str, kind: str, **options: object) -> None:
        rule = {"provider": "replicate", "operation": operation, "kind": kind, **options}
        self.http.post("/_sandbox/faults", json=rule).raise_for_status()

    def counters(self, family: str) -> dict:  # type: ignore[type-arg]
        return self.http.get("/_sandbox/counters").json()[family].get("replicate", {})

    def creates(self) -> dict[str, int]:
        return self.counters("creates")

    def prediction(self, task_id: str) -> dict:  # type: ignore[type-arg]
        response = self.http.get(
            f"/replicate/v1/predictions/{task_id}", headers={"Authorization": f"Bearer {SANDBOX_API_KEY}"}
        )
        response.raise_for_status()
        return response.json()


def unique(prefix: str) -> str:
    """An idempotency key never used before: the renderer remembers every key for its lifetime."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@contextmanager
def health_watch(channel: grpc.Channel) -> Iterator[Iterator[int]]:
    """The renderer service's health statuses as grpc.health.v1 Watch pushes them."""
    stream = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=RENDERER_SERVICE), timeout=60
    )
    try:
        yield (response.status for response in stream)
    finally:
        stream.cancel()


def wait_for_status(statuses: Iterator[int], wanted: int) -> None:
    for status in statuses:
        if status == wanted:
            return
    raise AssertionError("the health stream ended first")


def follow(
    stub: renderer_pb2_grpc.RendererServiceStub, task_id: str, timeout: float = 60
) -> list[renderer_pb2.Render]:
    """Every status WatchRender sends, up to the final one."""
    request = renderer_pb2.WatchRenderRequest(task_id=task_id)
    return [message.render for message in stub.WatchRender(request, timeout=timeout)]


# The renderer process against the sandbox --------------------------------------------------------

RENDERER_ENVIRONMENT = {
    "AIPROD_SANDBOX_RENDER_SECONDS": "1",
    "AIPROD_REPLICATE_MODEL": MODEL,
    "AIPROD_REPLICATE_INPUT_MAPPING": FULL_MAPPING,
    "AIPROD_REPLICATE_POLL_SECONDS": "0.2",
    "AIPROD_REPLICATE_REQUEST_TIMEOUT_SECONDS": "2",
    "AIPROD_REPLICATE_BREAKER_COOLDOWN_SECONDS": str(BREAKER_COOLDOWN_SECONDS),
    "AIPROD_REPLICATE_PRICE_PER_SECOND_USD": str(PRICE_PER_SECOND_USD),
}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = Mesh(
        tmp_path_factory.mktemp("replicate"),
        free_ports=True,
        only=("sandbox", "renderer-replicate"),
        environment=RENDERER_ENVIRONMENT,
    )
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(mesh: Mesh) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(mesh.address("renderer-replicate")) as opened:
        yield opened


@pytest.fixture
def stub(channel: grpc.Channel) -> renderer_pb2_grpc.RendererServiceStub:
    return renderer_pb2_grpc.RendererServiceStub(channel)


@pytest.fixture(scope="module")
def control(mesh: Mesh) -> Iterator[Sandbox]:
    opened = Sandbox(mesh.address("sandbox"))
    yield opened
    opened.http.close()


@pytest.fixture
def sandbox(control: Sandbox, channel: grpc.Channel) -> Sandbox:
    """The sandbox, reset, with the renderer serving (an earlier test may have opened its breaker)."""
    control.reset(render_seconds=1)
    wait_serving(channel)
    return control


def wait_serving(channel: grpc.Channel) -> None:
    with health_watch(channel) as statuses:
        wait_for_status(statuses, SERVING)


def start(
    stub: renderer_pb2_grpc.RendererServiceStub, key: str, shot: render_pb2.Shot
) -> renderer_pb2.Render:
    request = renderer_pb2.StartRenderRequest(idempotency_key=key, shot=shot)
    return stub.StartRender(request, timeout=60).render


def render(
    stub: renderer_pb2_grpc.RendererServiceStub, key: str, shot: render_pb2.Shot
) -> list[renderer_pb2.Render]:
    """Starts a render and follows it to its end: every status WatchRender sent."""
    started = start(stub, key, shot)
    if started.state in (renderer_pb2.RENDER_STATE_FAILED, renderer_pb2.RENDER_STATE_CANCELLED):
        return [started]
    return follow(stub, started.handle.task_id, timeout=60)


def assert_one_create_per_key(sandbox: Sandbox, *keys: str) -> None:
    creates = sandbox.creates()
    assert {key: creates.get(key, 0) for key in keys} == dict.fromkeys(keys, 1), creates
    assert all(count == 1 for count in creates.values()), creates


def stored_file(mesh: Mesh, uri: str) -> Path:
    assert uri.startswith("file://"), uri
    path = Path(url2pathname(urlsplit(uri).path))
    assert path.is_relative_to(mesh.data_dir / "videos"), path
    assert path.is_file()
    return path


def decoded_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def assert_stored_video(mesh: Mesh, final: renderer_pb2.Render, seconds: float) -> None:
    assert final.state == renderer_pb2.RENDER_STATE_SUCCEEDED, final.failure
    output = final.output
    path = stored_file(mesh, output.video.uri)
    assert decoded_frames(path) == output.video.frame_count > 0
    assert output.video.duration_seconds == pytest.approx(seconds, abs=0.1)
    assert output.qc.checks and 0 < output.qc.score <= 1
    assert output.cost.amount_micros == round(PRICE_PER_SECOND_USD * 1_000_000 * seconds)
    assert final.progress == 1.0


def test_capabilities(stub: renderer_pb2_grpc.RendererServiceStub) -> None:
    capabilities = stub.GetCapabilities(renderer_pb2.GetCapabilitiesRequest(), timeout=10).capabilities
    assert list(capabilities.models) == [MODEL]
    assert capabilities.image_input
    assert capabilities.price_per_second.amount_micros == 50_000


def test_text_to_video(mesh: Mesh, sandbox: Sandbox, stub: renderer_pb2_grpc.RendererServiceStub) -> None:
    statuses = render(stub, "t2v-1", a_shot(seconds=2))
    assert_stored_video(mesh, statuses[-1], 2)
    assert_one_create_per_key(sandbox, "t2v-1")


def test_image_to_video(mesh: Mesh, sandbox: Sandbox, stub: renderer_pb2_grpc.RendererServiceStub) -> None:
    first_frame = render_pb2.Image(data=png(), mime_type="image/png")
    statuses = render(stub, "i2v-1", a_shot("The dunes at dusk", seconds=2, first_frame=first_frame))
    assert_stored_video(mesh, statuses[-1], 2)
    assert_one_create_per_key(sandbox, "i2v-1")
    sent = sandbox.prediction(statuses[-1].handle.task_id)["input"]
    assert sent["first_frame_image"].startswith("data:image/png;base64,")
    assert (sent["duration"], sent["aspect_ratio"], sent["seed"]) == (2, "16:9", 7)


def test_output_as_a_list(mesh: Mesh, sandbox: Sandbox, stub: renderer_pb2_grpc.RendererServiceStub) -> None:
    sandbox.reset(render_seconds=1, output_as_list=True)
    statuses = render(stub, "list-1", a_shot(seconds=2))
    assert_stored_video(mesh, statuses[-1], 2)
    assert_one_create_per_key(sandbox, "list-1")


def test_progress_is_watched(sandbox: Sandbox, stub: renderer_pb2_grpc.RendererServiceStub) -> None:
    sandbox.reset(render_seconds=3)
    statuses = render(stub, "progress-1", a_shot(seconds=2))
    assert statuses[-1].state == renderer_pb2.RENDER_STATE_SUCCEEDED
    running = [s.progress for s in statuses if s.state == renderer_pb2.RENDER_STATE_RUNNING]
    assert running, [renderer_pb2.RenderState.Name(s.state) for s in statuses]
    assert any(0 < progress < 1 for progress in running), running
    assert running == sorted(running)
    assert_one_create_per_key(sandbox, "progress-1")


def test_cancel(sandbox: Sandbox, stub: renderer_pb2_grpc.RendererServiceStub) -> None:
    started = start(stub, "cancel-1", a_shot("[sandbox:never] a long take"))
    task_id = started.handle.task_id
    for message in stub.WatchRender(renderer_pb2.WatchRenderRequest(task_id=task_id), timeout=30):
        if message.render.state == renderer_pb2.RENDER_STATE_RUNNING:
            break
    cancelled = stub.CancelRender(renderer_pb2.CancelRenderRequest(task_id=task_id), timeout=30).render
    assert cancelled.state == renderer_pb2.RENDER_STATE_CANCELLED
    assert follow(stub, task_id)[-1].state == renderer_pb2.RENDER_STATE_CANCELLED
    assert sandbox.counters("tasks")[task_id]["cancels"] == 1
    assert sandbox.prediction(task_id)["status"] == "canceled"
    assert_one_create_per_key(sandbox, "cancel-1")


def test_output_is_copied_before_its_url_expires(
    mesh: Mesh, sandbox: Sandbox, stub: renderer_pb2_grpc.RendererServiceStub
) -> None:
    sandbox.reset(render_seconds=1, output_ttl_seconds=3)
    final = render(stub, "ttl-1", a_shot(seconds=2))[-1]
    assert_stored_video(mesh, final, 2)
    output = sandbox.prediction(final.handle.task_id)["output"]
    url = output[0] if isinstance(output, list) else output

    def gone() -> bool:
        return httpx.get(url, timeout=10).status_code == 404

    assert eventually(gone, timeout=30, interval=0.2)
    # Replicate's copy is gone; ours stays.
    assert decoded_frames(stored_file(mesh, final.output.video.uri)) == final.output.video.frame_count
    assert_one_create_per_key(sandbox, "ttl-1")


def test_safety_refusal(sandbox: Sandbox, stub: renderer_pb2_grpc.RendererServiceStub) -> None:
    final = render(stub, "safety-1", a_shot("[sandbox:safety] something unsafe"))[-1]
    assert final.state == renderer_pb2.RENDER_STATE_FAILED
    assert final.failure.reason in SAFETY_REASONS
    assert final.failure.provider_code.startswith("SAFETY.")
    assert not final.failure.retryable
    assert final.failure.message
    assert_one_create_per_key(sandbox, "safety-1")


def test_model_failure(sandbox: Sandbox, stub: renderer_pb2_grpc.RendererServiceStub) -> None:
    final = render(stub, "fail-1", a_shot("[sandbox:fail] a broken take"))[-1]
    assert final.state == renderer_pb2.RENDER_STATE_FAILED
    assert final.failure.reason == Reason.PROVIDER_FAILED
    assert final.failure.retryable
    assert_one_create_per_key(sandbox, "fail-1")


@pytest.mark.parametrize("retry_after", [None, 2])
def test_rate_limited_create_is_sent_again(
    mesh: Mesh, sandbox: Sandbox, stub: renderer_pb2_grpc.RendererServiceStub, retry_after: int | None
) -> None:
    key = f"throttled-{retry_after}"
    sandbox.fault("create", "429", retry_after=retry_after)
    began = time.monotonic()
    started = start(stub, key, a_shot(seconds=2))
    if retry_after is not None:
        assert time.monotonic() - began >= retry_after - 0.1  # the pause Retry-After asked for
    assert_stored_video(mesh, follow(stub, started.handle.task_id)[-1], 2)
    assert sandbox.counters("create_requests")[key] == 2
    assert_one_create_per_key(sandbox, key)


def test_unavailable_create_is_sent_again(
    mesh: Mesh, sandbox: Sandbox, stub: renderer_pb2_grpc.RendererServiceStub
) -> None:
    sandbox.fault("create", "5xx", status=503)
    assert_stored_video(mesh, render(stub, "unavailable-1", a_shot(seconds=2))[-1], 2)
    assert sandbox.counters("create_requests")["unavailable-1"] == 2
    assert_one_create_per_key(sandbox, "unavailable-1")


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "5xx", "status": 500},
        {"kind": "5xx", "status": 500, "phase": "after"},
        {"kind": "drop", "phase": "after"},
    ],
    ids=["500", "500-after-creating", "drop-after-creating"],
)
def test_ambiguous_create_is_not_sent_again(
    sandbox: Sandbox, stub: renderer_pb2_grpc.RendererServiceStub, fault: dict[str, object]
) -> None:
    key = unique("ambiguous")
    sandbox.fault("create", **fault)  # type: ignore[arg-type]
    final = start(stub, key, a_shot(seconds=2))
    assert final.state == renderer_pb2.RENDER_STATE_FAILED
    assert final.failure.reason == Reason.PROVIDER_UNCERTAIN
    assert not final.failure.retryable
    assert sandbox.counters("create_requests")[key] == 1
    # Asked again under its key, the renderer answers with the same failed render: nothing is sent.
    assert start(stub, key, a_shot(seconds=2)).failure.reason == Reason.PROVIDER_UNCERTAIN
    assert sandbox.counters("create_requests")[key] == 1
    created = sandbox.creates().get(key, 0)
    assert created == (1 if fault.get("phase") == "after" else 0)


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "5xx", "status": 500},
        {"kind": "5xx", "status": 503},
        {"kind": "429", "retry_after": 1},
        {"kind": "hang"},
        {"kind": "drop"},
    ],
    ids=["500", "503", "429", "hang", "drop"],
)
def test_poll_faults_are_ridden_out(
    mesh: Mesh, sandbox: Sandbox, stub: renderer_pb2_grpc.RendererServiceStub, fault: dict[str, object]
) -> None:
    key = unique("poll")
    sandbox.fault("get", **fault)  # type: ignore[arg-type]
    final = render(stub, key, a_shot(seconds=2))[-1]
    assert_stored_video(mesh, final, 2)
    # The fault took one get away from the prediction: more gets came than reached it.
    assert sandbox.counters("requests")["get"] > sandbox.counters("tasks")[final.handle.task_id]["gets"]
    assert_one_create_per_key(sandbox, key)


@pytest.mark.parametrize("kind", ["401", "403"])
def test_rejected_credentials_stop_serving_until_a_probe_passes(
    mesh: Mesh,
    sandbox: Sandbox,
    channel: grpc.Channel,
    stub: renderer_pb2_grpc.RendererServiceStub,
    kind: str,
) -> None:
    sandbox.fault("create", kind)
    with health_watch(channel) as statuses:
        wait_for_status(statuses, SERVING)
        refused = start(stub, f"auth-{kind}", a_shot(seconds=2))
        assert refused.state == renderer_pb2.RENDER_STATE_FAILED
        assert refused.failure.reason == Reason.PROVIDER_AUTH
        wait_for_status(statuses, NOT_SERVING)
        with pytest.raises(grpc.RpcError) as error:
            start(stub, f"auth-{kind}-while-open", a_shot(seconds=2))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        # After the cooldown a probe (GET /v1/account) passes: serving again.
        wait_for_status(statuses, SERVING)
    assert sandbox.creates().get(f"auth-{kind}", 0) == 0
    assert_stored_video(mesh, render(stub, f"after-auth-{kind}", a_shot(seconds=2))[-1], 2)
    assert_one_create_per_key(sandbox, f"after-auth-{kind}")


def test_default_model_renders(tmp_path: Path, mesh: Mesh, sandbox: Sandbox) -> None:
    """minimax/video-01 with the default input mapping: 6 s, text to video, against the same sandbox."""
    default = Mesh(
        tmp_path,
        free_ports=True,
        only=("renderer-replicate",),
        environment={
            "REPLICATE_BASE_URL": f"{sandbox.root}/replicate",
            "REPLICATE_API_TOKEN": SANDBOX_API_KEY,
            "AIPROD_REPLICATE_POLL_SECONDS": "0.2",
            "AIPROD_REPLICATE_PRICE_PER_SECOND_USD": str(PRICE_PER_SECOND_USD),
        },
    )
    default.start()
    try:
        with grpc.insecure_channel(default.address("renderer-replicate")) as channel:
            stub = renderer_pb2_grpc.RendererServiceStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                start(stub, unique("four-seconds"), a_shot(seconds=4))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            key = unique("video-01")
            final = render(stub, key, a_shot(seconds=6))[-1]
            assert_stored_video(default, final, 6)
            assert (final.output.video.width, final.output.video.height) == (1280, 720)
    finally:
        default.stop()
    sent = sandbox.prediction(final.handle.task_id)
    assert sent["model"] == "minimax/video-01"
    assert sent["input"] == {"prompt": "A fox running through snow", "duration": 6}
    assert_one_create_per_key(sandbox, key)


def test_missing_credentials(tmp_path: Path) -> None:
    alone = Mesh(
        tmp_path,
        free_ports=True,
        only=("renderer-replicate",),
        environment={**RENDERER_ENVIRONMENT, "REPLICATE_API_TOKEN": ""},
    )
    alone.start()
    try:
        with grpc.insecure_channel(alone.address("renderer-replicate")) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health.Check
            assert check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == SERVING
            assert (
                check(health_pb2.HealthCheckRequest(service=RENDERER_SERVICE), timeout=10).status
                == NOT_SERVING
            )
            with pytest.raises(grpc.RpcError) as error:
                start(renderer_pb2_grpc.RendererServiceStub(channel), "no-token-1", a_shot(seconds=2))
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "REPLICATE_API_TOKEN" in (error.value.details() or "")
    finally:
        alone.stop()
    assert "REPLICATE_API_TOKEN" in alone.services["renderer-replicate"].log_text()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AIPROD_REPLICATE_MODEL", "video-01"),
        ("AIPROD_REPLICATE_INPUT_MAPPING", "{not json"),
        ("AIPROD_REPLICATE_INPUT_MAPPING", '{"prompt": "prompt", "frames": "num_frames"}'),
    ],
)
def test_bad_configuration_stops_the_process(tmp_path: Path, variable: str, value: str) -> None:
    environment = {
        **os.environ,
        **RENDERER_ENVIRONMENT,
        "REPLICATE_API_TOKEN": "token",
        "AIPROD_DATA_DIR": str(tmp_path),
        "AIPROD_REPLICATE_PORT": "0",
        variable: value,
    }
    finished = subprocess.run(
        [sys.executable, "-m", "aiprod_renderers.replicate"],
        env=environment,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode != 0
    assert variable in finished.stderr.decode()
