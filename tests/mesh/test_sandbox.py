"""The provider sandbox as a real process, driven by the providers' official clients, unmodified.

Each client only gets the sandbox's base URL. Waiting is done the providers' way, by polling the API
until a state is reached or a deadline passes; the control API sets timings, faults and reads counters.
"""

import asyncio
import base64
import contextlib
import importlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import av
import google.oauth2.credentials
import httpx
import pytest
import replicate
import runwayml
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from helpers.sandbox import Bills, sandbox_bills
from PIL import Image
from replicate.exceptions import ReplicateError

from aiprod_kit.mesh import _await_serving_port
from aiprod_kit.settings import ReplicateSettings
from aiprod_renderers.replicate import provider as replicate_renderer
from aiprod_renderers.runway import provider as runway_renderer
from aiprod_renderers.veo import provider as veo_renderer
from aiprod_sandbox import vertex as sandbox_vertex
from aiprod_sandbox.config import default_configs

KEY = "test-key"
START_TIMEOUT = 30.0
# Generous: renders share two cores with the rest of the suite.
DEADLINE = 60.0
POLL_INTERVAL = 0.05
RENDER_SECONDS = 0.5

T = TypeVar("T")


@dataclass
class SandboxProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def control(self, method: str, path: str, payload: Any = None) -> Any:
        response = httpx.request(method, f"{self.root}/_sandbox/{path}", json=payload, timeout=30)
        response.raise_for_status()
        return response.json()

    def configure(self, **settings: Any) -> None:
        self.control("POST", "config", settings)

    def fault(self, **rule: Any) -> None:
        self.control("POST", "faults", rule)

    def counters(self) -> dict[str, Any]:
        return self.control("GET", "counters")


def start_sandbox(data_dir: Path, **environment: str) -> SandboxProcess:
    env = {
        **os.environ,
        "AIPROD_SANDBOX_PORT": "0",
        "AIPROD_DATA_DIR": str(data_dir),
        "AIPROD_LOG_FORMAT": "json",
        "AIPROD_SANDBOX_API_KEY": KEY,
        "AIPROD_SANDBOX_RENDER_SECONDS": str(RENDER_SECONDS),
        "PYTHONUNBUFFERED": "1",
        **environment,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "aiprod_sandbox"],
        env=env,
        stdin=subprocess.DEVNULL,
        # One stream, as the supervisor keeps it (aiprod_kit.mesh reads the "serving" line from it).
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log_path = data_dir / "sandbox.log"
    port, _ = _await_serving_port(process, log_path, START_TIMEOUT)
    if port is None:
        process.kill()
        process.wait()
        raise RuntimeError(f"the sandbox did not start: {log_path.read_text(errors='replace')[-2000:]}")
    return SandboxProcess(process, port, log_path)


def stop_sandbox(sandbox: SandboxProcess) -> int:
    sandbox.process.send_signal(signal.SIGTERM)
    try:
        return sandbox.process.wait(20)
    except subprocess.TimeoutExpired:
        sandbox.process.kill()
        sandbox.process.wait()
        raise


@pytest.fixture(scope="module")
def sandbox_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    running = start_sandbox(tmp_path_factory.mktemp("sandbox"))
    yield running
    assert stop_sandbox(running) == 0


@pytest.fixture
def sandbox(sandbox_process: SandboxProcess) -> SandboxProcess:
    sandbox_process.control("POST", "reset")
    return sandbox_process


def poll(fetch: Callable[[], T], until: Callable[[T], bool], timeout: float = DEADLINE) -> list[T]:
    """Every state read until one satisfies `until` (the last one); fails at the deadline."""
    deadline = time.monotonic() + timeout
    seen = [fetch()]
    while not until(seen[-1]):
        assert time.monotonic() < deadline, f"state not reached; last seen: {seen[-1]!r}"
        time.sleep(POLL_INTERVAL)
        seen.append(fetch())
    return seen


async def poll_async(
    fetch: Callable[[], Any], until: Callable[[Any], bool], timeout: float = DEADLINE
) -> Any:
    deadline = time.monotonic() + timeout
    state = await fetch()
    while not until(state):
        assert time.monotonic() < deadline, f"state not reached; last seen: {state!r}"
        await asyncio.sleep(POLL_INTERVAL)
        state = await fetch()
    return state


def probe(video: bytes) -> tuple[int, int, float]:
    """(width, height, seconds) of an MP4, by decoding every frame."""
    with av.open(io.BytesIO(video)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return stream.codec_context.width, stream.codec_context.height, frames / float(stream.average_rate)


def http_errors(*names: str) -> tuple[type[Exception], ...]:
    """httpx's exception classes of those names, and httpx2's, which google-genai uses when it is installed."""
    modules = [httpx]
    with contextlib.suppress(ImportError):
        modules.append(importlib.import_module("httpx2"))
    return tuple(getattr(module, name) for module in modules for name in names)


# A connection dropped under a request: closed before any response, or reset (as TCP has it when the
# close finds bytes unread); the renderers take either as a transport error.
DROPPED = ("RemoteProtocolError", "ReadError")


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 36), (200, 40, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_uri() -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes()).decode()


# --- Runway -------------------------------------------------------------------------------------------


def runway_client(sandbox: SandboxProcess, **options: Any) -> runwayml.RunwayML:
    return runwayml.RunwayML(api_key=KEY, base_url=f"{sandbox.root}/runway", **options)


def runway_headers(**extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}", "X-Runway-Version": "2024-11-06", **extra}


def runway_until(client: runwayml.RunwayML, task_id: str, statuses: set[str]) -> list[Any]:
    return poll(lambda: client.tasks.retrieve(task_id), lambda task: task.status in statuses)


def test_runway_text_to_video_reports_progress_and_serves_a_real_video(sandbox: SandboxProcess) -> None:
    sandbox.configure(provider="runway", render_seconds=1.0)
    client = runway_client(sandbox)
    created = client.text_to_video.create(
        model="gen4.5",
        prompt_text="a lighthouse at dusk",
        ratio="1280:720",
        duration=2,
        seed=7,
        extra_headers={"Idempotency-Key": "shot-1"},
    )
    seen = runway_until(client, created.id, {"SUCCEEDED", "FAILED"})

    task = seen[-1]
    assert task.status == "SUCCEEDED"
    assert task.cost.credits == 24  # gen4.5: 12 credits a second
    assert any(s.status == "RUNNING" and 0 < s.progress < 1 for s in seen)
    download = httpx.get(task.output[0])
    assert download.status_code == 200
    assert download.headers["Content-Type"] == "video/mp4"
    assert probe(download.content) == (1280, 720, 2.0)
    counters = sandbox.counters()
    assert counters["creates"]["runway"] == {"shot-1": 1}
    assert counters["tasks"]["runway"][created.id]["gets"] == len(seen)


def test_runway_image_to_video_with_the_async_client(sandbox: SandboxProcess) -> None:
    async def scenario() -> Any:
        async with runwayml.AsyncRunwayML(api_key=KEY, base_url=f"{sandbox.root}/runway") as client:
            created = await client.image_to_video.create(
                model="gen4_turbo", prompt_image=png_data_uri(), ratio="960:960", duration=2
            )
            return await poll_async(
                lambda: client.tasks.retrieve(created.id), lambda task: task.status in {"SUCCEEDED", "FAILED"}
            )

    task = asyncio.run(scenario())
    assert task.status == "SUCCEEDED"
    assert task.cost.credits == 10  # gen4_turbo: 5 credits a second
    assert probe(httpx.get(task.output[0]).content) == (960, 960, 2.0)


def test_runway_rejects_what_the_real_api_rejects(sandbox: SandboxProcess) -> None:
    client = runway_client(sandbox, max_retries=0)
    with pytest.raises(runwayml.BadRequestError) as unknown_model:
        client.text_to_video.create(model="gen9", prompt_text="x", ratio="1280:720", duration=4)  # type: ignore[call-overload]
    assert "model" in str(unknown_model.value.body)
    with pytest.raises(runwayml.BadRequestError):  # gen4_turbo takes an image
        client.text_to_video.create(model="gen4_turbo", prompt_text="x", ratio="1280:720", duration=4)  # type: ignore[call-overload]
    with pytest.raises(runwayml.BadRequestError):
        client.text_to_video.create(model="gen4.5", prompt_text="x", ratio="1280:720", duration=11)
    with pytest.raises(runwayml.BadRequestError):
        client.text_to_video.create(model="veo3.1", prompt_text="x", ratio="1280:720", duration=5)  # type: ignore[arg-type]
    with pytest.raises(runwayml.AuthenticationError):
        runwayml.RunwayML(api_key="wrong", base_url=f"{sandbox.root}/runway", max_retries=0).tasks.retrieve(
            "x"
        )

    body = {"model": "gen4.5", "promptText": "x", "ratio": "1280:720", "duration": 4}
    missing = httpx.post(
        f"{sandbox.root}/runway/v1/text_to_video", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert missing.status_code == 400
    assert "X-Runway-Version" in missing.json()["error"]
    wrong = httpx.post(
        f"{sandbox.root}/runway/v1/text_to_video",
        json=body,
        headers=runway_headers(**{"X-Runway-Version": "2023-01-01"}),
    )
    assert wrong.status_code == 400
    assert (
        httpx.get(f"{sandbox.root}/runway/v1/tasks/x", headers={"X-Runway-Version": "2024-11-06"}).status_code
        == 401
    )
    assert "runway" not in sandbox.counters()["creates"]


def test_runway_cancel_then_delete(sandbox: SandboxProcess) -> None:
    client = runway_client(sandbox)
    created = client.text_to_video.create(
        model="gen4.5", prompt_text="[sandbox:never] a slow one", ratio="720:1280", duration=5
    )
    runway_until(client, created.id, {"RUNNING"})

    client.tasks.delete(created.id)
    task = client.tasks.retrieve(created.id)
    assert task.status == "CANCELLED"
    assert task.cost.credits == 60  # cancelled while running: not refunded
    client.tasks.delete(created.id)  # a finished task is deleted
    with pytest.raises(runwayml.NotFoundError):
        client.tasks.retrieve(created.id)
    assert sandbox.counters()["tasks"]["runway"][created.id]["cancels"] == 2


def test_runway_safety_and_internal_failures(sandbox: SandboxProcess) -> None:
    client = runway_client(sandbox)
    safety = client.text_to_video.create(
        model="gen4.5", prompt_text="[sandbox:safety]", ratio="1280:720", duration=2
    )
    internal = client.text_to_video.create(
        model="gen4.5", prompt_text="[sandbox:fail]", ratio="1280:720", duration=2
    )

    refused = runway_until(client, safety.id, {"FAILED", "SUCCEEDED"})[-1]
    assert (refused.status, refused.failure_code) == ("FAILED", "SAFETY.INPUT.TEXT")
    assert refused.failure and refused.cost.credits == 0
    broken = runway_until(client, internal.id, {"FAILED", "SUCCEEDED"})[-1]
    assert (broken.status, broken.failure_code) == ("FAILED", "INTERNAL")


def test_runway_throttles_over_the_concurrency_limit_and_on_the_trigger(sandbox: SandboxProcess) -> None:
    sandbox.configure(provider="runway", max_concurrent=1, throttle_seconds=0.3)
    client = runway_client(sandbox)
    first = client.text_to_video.create(
        model="gen4.5", prompt_text="[sandbox:never]", ratio="1280:720", duration=2
    )
    runway_until(client, first.id, {"RUNNING"})
    second = client.text_to_video.create(model="gen4.5", prompt_text="queued", ratio="1280:720", duration=2)
    assert client.tasks.retrieve(second.id).status == "THROTTLED"

    client.tasks.delete(first.id)
    seen = runway_until(client, second.id, {"SUCCEEDED"})
    assert "RUNNING" in {task.status for task in seen}

    # Throttled long enough that the first read, on a loaded box too, comes while it still is.
    sandbox.configure(provider="runway", throttle_seconds=2)
    third = client.text_to_video.create(
        model="gen4.5", prompt_text="[sandbox:throttle] [sandbox:fail]", ratio="1280:720", duration=2
    )
    seen = runway_until(client, third.id, {"FAILED"})
    assert seen[0].status == "THROTTLED"


def test_runway_429_with_and_without_retry_after(sandbox: SandboxProcess) -> None:
    url = f"{sandbox.root}/runway/v1/text_to_video"
    body = {"model": "gen4.5", "promptText": "[sandbox:never]", "ratio": "1280:720", "duration": 2}
    sandbox.fault(provider="runway", operation="create", kind="429", retry_after=7)
    sandbox.fault(provider="runway", operation="create", kind="429")

    with_header = httpx.post(url, json=body, headers=runway_headers())
    assert (with_header.status_code, with_header.headers["Retry-After"]) == (429, "7")
    assert "error" in with_header.json()
    without = httpx.post(url, json=body, headers=runway_headers())
    assert without.status_code == 429
    assert "Retry-After" not in without.headers

    # The client retries a refused create by itself: one task, two requests, same key.
    sandbox.fault(provider="runway", operation="create", kind="429", retry_after=0.2)
    created = runway_client(sandbox, max_retries=2).text_to_video.create(
        model="gen4.5",
        prompt_text="[sandbox:never]",
        ratio="1280:720",
        duration=2,
        extra_headers={"Idempotency-Key": "k"},
    )
    counters = sandbox.counters()
    assert counters["create_requests"]["runway"]["k"] == 2
    assert counters["creates"]["runway"] == {"k": 1}
    assert list(counters["tasks"]["runway"]) == [created.id]


def test_runway_5xx_drop_and_hang(sandbox: SandboxProcess) -> None:
    client = runway_client(sandbox, max_retries=0)
    sandbox.fault(provider="runway", operation="create", kind="drop")
    with pytest.raises(runwayml.APIConnectionError):
        client.text_to_video.create(
            model="gen4.5",
            prompt_text="x",
            ratio="1280:720",
            duration=2,
            extra_headers={"Idempotency-Key": "d"},
        )
    counters = sandbox.counters()
    assert counters["create_requests"]["runway"] == {"d": 1}
    assert "runway" not in counters["creates"]  # refused in front: nothing was created

    created = client.text_to_video.create(
        model="gen4.5", prompt_text="[sandbox:never]", ratio="1280:720", duration=2
    )
    sandbox.fault(provider="runway", operation="get", kind="5xx", status=502)
    with pytest.raises(runwayml.InternalServerError) as bad_gateway:
        client.tasks.retrieve(created.id)
    assert bad_gateway.value.status_code == 502
    sandbox.fault(provider="runway", operation="get", kind="hang", hang_seconds=30)
    with pytest.raises(runwayml.APITimeoutError):
        client.tasks.retrieve(created.id, timeout=0.5)
    assert client.tasks.retrieve(created.id).status == "RUNNING"  # the faults were used up


def test_runway_lost_create_response_makes_a_second_task_on_retry(sandbox: SandboxProcess) -> None:
    sandbox.fault(provider="runway", operation="create", kind="drop", phase="after")
    created = runway_client(sandbox, max_retries=1).text_to_video.create(
        model="gen4.5",
        prompt_text="[sandbox:never]",
        ratio="1280:720",
        duration=2,
        extra_headers={"Idempotency-Key": "lost"},
    )
    counters = sandbox.counters()
    assert counters["creates"]["runway"] == {"lost": 2}  # paid twice: the sandbox does not deduplicate
    assert created.id in counters["tasks"]["runway"]


def test_runway_output_urls_expire_and_a_new_read_gives_fresh_ones(sandbox: SandboxProcess) -> None:
    sandbox.configure(provider="runway", output_ttl_seconds=1, render_seconds=0.2)
    client = runway_client(sandbox)
    created = client.text_to_video.create(model="gen4.5", prompt_text="short", ratio="720:1280", duration=2)
    url = runway_until(client, created.id, {"SUCCEEDED"})[-1].output[0]

    assert httpx.get(url).status_code == 200
    poll(lambda: httpx.get(url).status_code, lambda status: status == 403)
    fresh = client.tasks.retrieve(created.id).output[0]
    assert fresh != url
    assert httpx.get(fresh).status_code == 200


# --- Veo on Vertex AI ---------------------------------------------------------------------------------


def veo_client(sandbox: SandboxProcess, token: str = KEY, **options: Any) -> genai.Client:
    return genai.Client(
        vertexai=True,
        project="sandbox-project",
        location="us-central1",
        credentials=google.oauth2.credentials.Credentials(token=token),
        http_options=genai_types.HttpOptions(base_url=f"{sandbox.root}/vertex", **options),
    )


def veo_config(**fields: Any) -> genai_types.GenerateVideosConfig:
    return genai_types.GenerateVideosConfig(**{"duration_seconds": 4, "number_of_videos": 1, **fields})


def test_veo_text_to_video_returns_the_video_bytes(sandbox: SandboxProcess) -> None:
    client = veo_client(sandbox)
    operation = client.models.generate_videos(
        model="veo-3.0-fast-generate-001",
        source=genai_types.GenerateVideosSource(prompt="a paper boat on a river"),
        config=veo_config(
            aspect_ratio="9:16",
            resolution="720p",
            generate_audio=False,
            http_options=genai_types.HttpOptions(headers={"Idempotency-Key": "veo-1"}),
        ),
    )
    assert operation.name.startswith(
        "projects/sandbox-project/locations/us-central1/publishers/google/models/veo-3.0-fast-generate-001/operations/"
    )
    seen = poll(lambda: client.operations.get(operation), lambda op: bool(op.done))

    assert not seen[0].done
    done = seen[-1]
    assert done.error is None
    assert done.response.rai_media_filtered_count == 0
    video = done.response.generated_videos[0].video
    assert video.mime_type == "video/mp4"
    assert probe(video.video_bytes) == (720, 1280, 4.0)
    counters = sandbox.counters()
    assert counters["creates"]["veo"] == {"veo-1": 1}
    assert counters["tasks"]["veo"][operation.name.rpartition("/")[2]]["gets"] == len(seen)


def test_veo_image_to_video_with_storage_uri_from_a_rebuilt_operation(sandbox: SandboxProcess) -> None:
    async def scenario() -> genai_types.GenerateVideosOperation:
        client = veo_client(sandbox)
        started = await client.aio.models.generate_videos(
            model="veo-3.0-generate-001",
            source=genai_types.GenerateVideosSource(
                prompt="it starts to rain",
                image=genai_types.Image(image_bytes=png_bytes(), mime_type="image/png"),
            ),
            config=veo_config(output_gcs_uri="gs://sandbox-bucket/renders/"),
        )
        # What a renderer does after a restart: only the stored name is left.
        rebuilt = genai_types.GenerateVideosOperation(name=started.name)
        return await poll_async(lambda: client.aio.operations.get(rebuilt), lambda op: bool(op.done))

    done = asyncio.run(scenario())
    operation_id = done.name.rpartition("/")[2]
    video = done.response.generated_videos[0].video
    assert video.uri == f"gs://sandbox-bucket/renders/{operation_id}/sample_0.mp4"
    assert video.video_bytes is None


def test_veo_accepts_the_v1_path_too(sandbox: SandboxProcess) -> None:
    base = f"{sandbox.root}/vertex/v1/projects/p/locations/us-central1/publishers/google/models/veo-3.0-generate-001"
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"instances": [{"prompt": "[sandbox:never]"}], "parameters": {"durationSeconds": 6}}
    started = httpx.post(f"{base}:predictLongRunning", json=body, headers=headers)
    assert started.status_code == 200
    name = started.json()["name"]
    fetched = httpx.post(f"{base}:fetchPredictOperation", json={"operationName": name}, headers=headers)
    assert fetched.json() == {"name": name}


def test_veo_safety_filter_and_internal_error(sandbox: SandboxProcess) -> None:
    client = veo_client(sandbox)
    safety = client.models.generate_videos(
        model="veo-3.0-generate-001",
        source=genai_types.GenerateVideosSource(prompt="[sandbox:safety]"),
        config=veo_config(),
    )
    internal = client.models.generate_videos(
        model="veo-3.0-generate-001",
        source=genai_types.GenerateVideosSource(prompt="[sandbox:fail]"),
        config=veo_config(),
    )

    filtered = poll(lambda: client.operations.get(safety), lambda op: bool(op.done))[-1]
    assert filtered.error is None
    assert filtered.response.rai_media_filtered_count == 1
    assert filtered.response.rai_media_filtered_reasons
    assert not filtered.response.generated_videos
    broken = poll(lambda: client.operations.get(internal), lambda op: bool(op.done))[-1]
    assert broken.error["code"] == 13
    assert broken.response is None


def test_veo_errors_are_googles(sandbox: SandboxProcess) -> None:
    client = veo_client(sandbox)
    source = genai_types.GenerateVideosSource(prompt="[sandbox:never]")
    with pytest.raises(genai_errors.ClientError) as bad_duration:
        client.models.generate_videos(
            model="veo-3.0-generate-001", source=source, config=veo_config(duration_seconds=5)
        )
    assert (bad_duration.value.code, bad_duration.value.status) == (400, "INVALID_ARGUMENT")
    with pytest.raises(genai_errors.ClientError) as unknown_model:
        client.models.generate_videos(model="veo-9", source=source, config=veo_config())
    assert (unknown_model.value.code, unknown_model.value.status) == (404, "NOT_FOUND")
    # Each client is kept in a variable: a google-genai Client closes its HTTP client when collected.
    stranger = veo_client(sandbox, token="wrong")
    with pytest.raises(genai_errors.ClientError) as bad_token:
        stranger.models.generate_videos(model="veo-3.0-generate-001", source=source, config=veo_config())
    assert (bad_token.value.code, bad_token.value.status) == (401, "UNAUTHENTICATED")

    sandbox.fault(provider="veo", operation="create", kind="429")
    with pytest.raises(genai_errors.ClientError) as quota:
        client.models.generate_videos(model="veo-3.0-generate-001", source=source, config=veo_config())
    assert (quota.value.code, quota.value.status) == (429, "RESOURCE_EXHAUSTED")
    sandbox.fault(provider="veo", operation="create", kind="403")
    with pytest.raises(genai_errors.ClientError) as denied:
        client.models.generate_videos(model="veo-3.0-generate-001", source=source, config=veo_config())
    assert denied.value.status == "PERMISSION_DENIED"
    assert "veo" not in sandbox.counters()["creates"]

    operation = client.models.generate_videos(
        model="veo-3.0-generate-001", source=source, config=veo_config()
    )
    sandbox.fault(provider="veo", operation="get", kind="5xx")
    with pytest.raises(genai_errors.ServerError) as unavailable:
        client.operations.get(operation)
    assert (unavailable.value.code, unavailable.value.status) == (503, "UNAVAILABLE")
    sandbox.fault(provider="veo", operation="get", kind="hang")
    impatient = veo_client(sandbox, timeout=500)  # milliseconds
    with pytest.raises(http_errors("TimeoutException")):
        impatient.operations.get(operation)
    sandbox.fault(provider="veo", operation="get", kind="drop")
    with pytest.raises(http_errors(*DROPPED)):
        client.operations.get(operation)
    assert not client.operations.get(operation).done


# --- Replicate ----------------------------------------------------------------------------------------


def replicate_client(sandbox: SandboxProcess, **options: Any) -> replicate.Client:
    return replicate.Client(api_token=KEY, base_url=f"{sandbox.root}/replicate", **options)


def replicate_until(client: replicate.Client, prediction_id: str, statuses: set[str]) -> list[Any]:
    return poll(lambda: client.predictions.get(prediction_id), lambda p: p.status in statuses)


def test_replicate_model_prediction_reports_progress_and_serves_a_real_video(sandbox: SandboxProcess) -> None:
    sandbox.configure(provider="replicate", render_seconds=1.0)
    client = replicate_client(sandbox, headers={"Idempotency-Key": "rep-1"})
    prediction = client.predictions.create(
        model="acme/video-model", input={"prompt": "a red kite", "duration": 1, "aspect_ratio": "9:16"}
    )
    assert prediction.status == "starting"
    assert prediction.model == "acme/video-model"
    seen = replicate_until(client, prediction.id, {"succeeded", "failed", "canceled"})

    done = seen[-1]
    assert done.status == "succeeded"
    assert any(p.status == "processing" and p.progress and 0 < p.progress.percentage < 1 for p in seen)
    assert done.progress.percentage == 1.0
    assert done.metrics["predict_time"] > 0
    assert all(isinstance(url, str) for url in done.urls.values())
    assert isinstance(done.output, str)
    assert probe(httpx.get(done.output).content) == (720, 1280, 1.0)
    assert sandbox.counters()["creates"]["replicate"] == {"rep-1": 1}


def test_replicate_version_prediction_with_an_image_waits_and_lists(sandbox: SandboxProcess) -> None:
    sandbox.configure(provider="replicate", output_as_list=True)
    client = replicate_client(sandbox)
    first = client.predictions.create(model="acme/i2v", input={"prompt": "[sandbox:never]"})
    done = client.predictions.create(
        version=first.version,  # a bare version id, as a model's predictions report it
        input={"prompt": "a wave", "image": png_data_uri(), "aspect_ratio": "1:1", "duration": 1},
        wait=True,
    )
    assert done.status == "succeeded"
    assert done.model == "acme/i2v"
    assert isinstance(done.output, list)
    assert probe(httpx.get(done.output[0]).content) == (720, 720, 1.0)

    with pytest.raises(ReplicateError) as unknown:
        client.predictions.create(version="f" * 64, input={"prompt": "x"})
    assert unknown.value.status == 422
    with pytest.raises(ReplicateError) as invalid:
        client.predictions.create(model="acme/i2v", input={"prompt": "x", "aspect_ratio": "4:3"})
    assert invalid.value.status == 422
    assert "aspect_ratio" in invalid.value.detail
    assert [p.id for p in client.predictions.list().results] == [done.id, first.id]


def test_replicate_cancel_safety_and_failure(sandbox: SandboxProcess) -> None:
    client = replicate_client(sandbox)
    endless = client.predictions.create(model="acme/video", input={"prompt": "[sandbox:never]"})
    safety = client.predictions.create(model="acme/video", input={"prompt": "[sandbox:safety]"})
    internal = client.predictions.create(model="acme/video", input={"prompt": "[sandbox:fail]"})

    replicate_until(client, endless.id, {"processing"})
    client.predictions.cancel(endless.id)
    assert client.predictions.get(endless.id).status == "canceled"
    refused = replicate_until(client, safety.id, {"failed", "succeeded"})[-1]
    assert refused.status == "failed"
    assert "NSFW" in refused.error
    broken = replicate_until(client, internal.id, {"failed", "succeeded"})[-1]
    assert broken.status == "failed"
    assert broken.error
    assert sandbox.counters()["tasks"]["replicate"][endless.id]["cancels"] == 1


def test_replicate_cancel_after_header_and_run_limit(sandbox: SandboxProcess) -> None:
    sandbox.configure(provider="replicate", max_run_seconds=0.3)
    client = replicate_client(sandbox)
    created = httpx.post(
        f"{sandbox.root}/replicate/v1/models/acme/video/predictions",
        json={"input": {"prompt": "[sandbox:never] [sandbox:throttle]"}},
        headers={"Authorization": f"Bearer {KEY}", "Cancel-After": "0.2s"},
    )
    assert created.status_code == 201
    assert replicate_until(client, created.json()["id"], {"canceled", "failed"})[-1].status == "canceled"

    overrun = client.predictions.create(model="acme/video", input={"prompt": "[sandbox:never]"})
    stopped = replicate_until(client, overrun.id, {"canceled", "failed"})[-1]
    assert (stopped.status, "timed out" in stopped.error) == ("failed", True)


def test_replicate_models_and_credentials(sandbox: SandboxProcess) -> None:
    sandbox.configure(provider="replicate", models=["acme/only"])
    with pytest.raises(ReplicateError) as missing:
        replicate_client(sandbox).predictions.create(model="acme/other", input={"prompt": "x"})
    assert missing.value.status == 404
    with pytest.raises(ReplicateError) as unauthenticated:
        replicate.Client(api_token="wrong", base_url=f"{sandbox.root}/replicate").predictions.get("x")
    assert unauthenticated.value.status == 401
    assert unauthenticated.value.title == "Unauthenticated"


def test_replicate_429_with_and_without_retry_after(sandbox: SandboxProcess) -> None:
    url = f"{sandbox.root}/replicate/v1/models/acme/video/predictions"
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"input": {"prompt": "[sandbox:never]"}}
    sandbox.fault(provider="replicate", operation="create", kind="429", retry_after=3)
    sandbox.fault(provider="replicate", operation="create", kind="429")

    throttled = httpx.post(url, json=body, headers=headers)
    assert (throttled.status_code, throttled.headers["Retry-After"]) == (429, "3")
    assert throttled.json()["detail"].startswith("Request was throttled.")
    without = httpx.post(url, json=body, headers=headers)
    assert without.status_code == 429
    assert "Retry-After" not in without.headers

    client = replicate_client(sandbox)
    sandbox.fault(provider="replicate", operation="create", kind="429")
    with pytest.raises(ReplicateError) as refused:  # the client never retries a create
        client.predictions.create(model="acme/video", input={"prompt": "[sandbox:never]"})
    assert refused.value.status == 429
    assert "replicate" not in sandbox.counters()["creates"]

    prediction = client.predictions.create(model="acme/video", input={"prompt": "[sandbox:never]"})
    sandbox.fault(provider="replicate", operation="get", kind="429", retry_after=0)
    assert client.predictions.get(prediction.id).id == prediction.id  # a read is retried
    assert sandbox.counters()["requests"]["replicate"]["get"] == 2


def test_replicate_faults_on_downloads_and_expired_outputs(sandbox: SandboxProcess) -> None:
    sandbox.configure(provider="replicate", output_ttl_seconds=1, render_seconds=0.2)
    client = replicate_client(sandbox, timeout=httpx.Timeout(0.5))
    # client.predictions.create(model=...) drops `wait` in 1.0.7; the models namespace sends `Prefer: wait=10`.
    done = client.models.predictions.create(
        model="acme/video", input={"prompt": "tiny", "duration": 1}, wait=10
    )
    assert done.status == "succeeded"

    sandbox.fault(provider="replicate", operation="download", kind="5xx", status=500)
    assert httpx.get(done.output).status_code == 500
    sandbox.fault(provider="replicate", operation="download", kind="drop")
    with pytest.raises(http_errors(*DROPPED)):
        httpx.get(done.output)
    sandbox.fault(provider="replicate", operation="get", kind="hang")
    with pytest.raises(httpx.TimeoutException):
        client.predictions.get(done.id)
    poll(lambda: httpx.get(done.output).status_code, lambda status: status == 404)
    assert sandbox.counters()["requests"]["replicate"]["download"] >= 3


# --- Billing ------------------------------------------------------------------------------------------


def billed(sandbox: SandboxProcess, provider: str, keys: set[str]) -> Bills:
    """The provider's bills once every one of these keys is billed. Tasks are billed when they end,
    whether or not anyone reads them: waiting on the bills alone proves it."""
    return poll(lambda: sandbox_bills(sandbox.root, provider), lambda bills: keys <= set(bills.by_key))[-1]


def test_sandbox_prices_are_the_renderers_list_prices() -> None:
    # A renderer's charge and the sandbox's bill must agree to the micro-dollar.
    prices = default_configs(1.0)
    for model, spec in runway_renderer.MODELS.items():
        assert prices["runway"].price(model) == spec.credits_per_second, model
    for model, spec in veo_renderer.MODELS.items():
        assert model in sandbox_vertex.MODELS
        assert prices["veo"].price(model, audio=True) == spec.usd_per_second_audio, model
        assert prices["veo"].price(model, audio=False) == spec.usd_per_second_silent, model
    renderer_price = ReplicateSettings.model_fields["price_per_second_usd"].default
    default_model = ReplicateSettings.model_fields["model"].default
    for model in (default_model, *replicate_renderer.MODELS, "acme/unknown"):
        assert prices["replicate"].price(model) == renderer_price, model
    assert set(prices["veo"].prices) == sandbox_vertex.MODELS


def test_runway_bills_successes_and_cancels_not_failures(sandbox: SandboxProcess) -> None:
    sandbox.configure(provider="runway", throttle_seconds=600)
    client = runway_client(sandbox, max_retries=0)

    def create(key: str, prompt: str, duration: int, model: str = "gen4.5", **extra: Any) -> str:
        return client.text_to_video.create(
            model=model,  # type: ignore[arg-type]
            prompt_text=prompt,
            ratio="1280:720",
            duration=duration,  # type: ignore[arg-type]
            extra_headers={"Idempotency-Key": key},
            **extra,
        ).id

    done = create("done", "a lighthouse", 2)
    silent = create("silent", "a quiet sea", 4, model="veo3.1_fast", audio=False)
    create("safety", "[sandbox:safety]", 2)
    create("fail", "[sandbox:fail]", 2)
    queued = create("queued", "[sandbox:throttle]", 3)
    running = create("running", "[sandbox:never]", 5)
    create("endless", "[sandbox:never]", 4)
    sandbox.fault(provider="runway", operation="create", kind="429")
    with pytest.raises(runwayml.RateLimitError):
        create("refused", "never created", 2)

    assert client.tasks.retrieve(queued).status == "THROTTLED"
    runway_until(client, running, {"RUNNING"})
    client.tasks.delete(queued)
    client.tasks.delete(running)
    bills = billed(sandbox, "runway", {"done", "silent", "safety", "fail", "queued", "running"})
    assert bills.by_key == {
        "done": 2 * 12 * 10_000,  # gen4.5: 12 credits a second, 1 credit = 10,000 micro-USD
        "silent": 4 * 10 * 10_000,  # veo3.1_fast without audio: 10 credits a second
        "safety": 0,
        "fail": 0,
        "queued": 3 * 12 * 10_000,  # cancelled before it ran: the full estimate all the same
        "running": 5 * 12 * 10_000,
    }
    assert bills.total_micros == sum(bills.by_key.values())
    assert bills.tasks[done] == {"micros": 240_000, "state": "succeeded", "key": "done", "model": "gen4.5"}
    # What the task reports is what is billed.
    assert client.tasks.retrieve(done).cost.credits == 24
    assert client.tasks.retrieve(silent).cost.credits == 40
    assert client.tasks.retrieve(queued).cost.credits == 36

    client.tasks.delete(done)  # deleting a finished task refunds nothing and bills nothing more
    assert sandbox_bills(sandbox.root, "runway") == bills


def test_veo_bills_the_videos_returned(sandbox: SandboxProcess) -> None:
    client = veo_client(sandbox)

    def generate(key: str, prompt: str, model: str, **config: Any) -> genai_types.GenerateVideosOperation:
        headers = genai_types.HttpOptions(headers={"Idempotency-Key": key})
        return client.models.generate_videos(
            model=model,
            source=genai_types.GenerateVideosSource(prompt=prompt),
            config=veo_config(resolution="720p", http_options=headers, **config),
        )

    pair = generate(
        "pair", "two boats", "veo-3.0-fast-generate-001", generate_audio=False, number_of_videos=2
    )
    generate("audio", "a choir", "veo-3.1-generate-001", generate_audio=True)
    generate("filtered", "[sandbox:safety]", "veo-3.0-generate-001", generate_audio=False)
    generate("broken", "[sandbox:fail]", "veo-3.0-generate-001", generate_audio=False)
    generate("endless", "[sandbox:never]", "veo-3.0-generate-001", generate_audio=False)

    bills = billed(sandbox, "veo", {"pair", "audio", "filtered", "broken"})
    assert bills.by_key == {
        "pair": 2 * 4 * 100_000,  # two videos of 4 s at 0.10 USD/s (fast, no audio)
        "audio": 4 * 400_000,  # 0.40 USD/s with audio
        "filtered": 0,
        "broken": 0,
    }
    assert bills.total_micros == 2_400_000
    done = client.operations.get(pair)
    assert len(done.response.generated_videos) == 2
    assert bills.tasks[pair.name.rpartition("/")[2]]["model"] == "veo-3.0-fast-generate-001"


def test_replicate_bills_succeeded_predictions_per_output_second(sandbox: SandboxProcess) -> None:
    sandbox.configure(provider="replicate", prices={"acme/priced": 0.12})
    config = sandbox.control("GET", "config")["replicate"]
    assert config["prices"] == {"minimax/video-01": 0.05, "acme/priced": 0.12}  # merged, not replaced

    def create(key: str, prompt: str, model: str = "acme/video", **inputs: Any) -> Any:
        client = replicate_client(sandbox, headers={"Idempotency-Key": key})
        return client.predictions.create(model=model, input={"prompt": prompt, **inputs})

    create("default", "a kite", duration=2)
    create("priced", "a kite", model="acme/priced", duration=3)
    create("safety", "[sandbox:safety]", duration=2)
    create("fail", "[sandbox:fail]", duration=2)
    cancelled = create("cancelled", "[sandbox:never]", duration=2)
    create("endless", "[sandbox:never]", duration=2)
    replicate_client(sandbox).predictions.cancel(cancelled.id)

    bills = billed(sandbox, "replicate", {"default", "priced", "safety", "fail", "cancelled"})
    assert bills.by_key == {
        "default": 2 * 50_000,  # a model without a price of its own: 0.05 USD/s, as the renderer's default
        "priced": 3 * 120_000,
        "safety": 0,
        "fail": 0,
        "cancelled": 0,
    }
    assert bills.total_micros == 460_000
    assert {bill["state"] for bill in bills.tasks.values()} == {"succeeded", "failed", "cancelled"}


def test_reset_clears_the_bills(sandbox: SandboxProcess) -> None:
    client = replicate_client(sandbox, headers={"Idempotency-Key": "r"})
    client.predictions.create(model="acme/video", input={"prompt": "a kite", "duration": 1})
    runway = runway_client(sandbox)
    runway.text_to_video.create(
        model="gen4.5",
        prompt_text="a kite",
        ratio="1280:720",
        duration=2,
        extra_headers={"Idempotency-Key": "w"},
    )
    assert billed(sandbox, "replicate", {"r"}).total_micros == 50_000
    all_bills = poll(lambda: sandbox_bills(sandbox.root), lambda bills: {"r", "w"} <= set(bills.by_key))[-1]
    assert all_bills.total_micros == 50_000 + 240_000

    sandbox.control("POST", "reset")
    assert sandbox_bills(sandbox.root) == Bills(0, {}, {})
    assert sandbox.control("GET", "config")["replicate"]["prices"] == {"minimax/video-01": 0.05}


# --- Control API and process --------------------------------------------------------------------------


def test_control_api_rules_config_counters_and_reset(sandbox: SandboxProcess) -> None:
    assert sandbox.control("GET", "health") == {"status": "SERVING"}
    sandbox.fault(provider="*", operation="get", kind="5xx", rate=0.5)
    rules = sandbox.control("GET", "faults")
    assert [(r["provider"], r["operation"], r["kind"], r["rate"], r["status"]) for r in rules] == [
        ("*", "get", "5xx", 0.5, 503)
    ]
    bad_rule = httpx.post(f"{sandbox.root}/_sandbox/faults", json={"kind": "teapot"})
    assert bad_rule.status_code == 400
    bad_config = httpx.post(f"{sandbox.root}/_sandbox/config", json={"render_seconds": -1})
    assert bad_config.status_code == 400
    config = sandbox.control("POST", "config", {"provider": "veo", "max_concurrent": 2})
    assert (config["veo"]["max_concurrent"], config["runway"]["max_concurrent"]) == (2, None)
    assert config["replicate"]["output_ttl_seconds"] == 3600
    assert config["runway"]["output_ttl_seconds"] == 24 * 3600
    sandbox.control("DELETE", "faults")
    client = runway_client(sandbox)
    created = client.text_to_video.create(
        model="gen4.5", prompt_text="[sandbox:never]", ratio="1280:720", duration=2
    )

    sandbox.control("POST", "reset")
    nothing_billed = {provider: {} for provider in ("runway", "veo", "replicate")}
    assert sandbox.counters() == {
        "creates": {},
        "create_requests": {},
        "tasks": {},
        "requests": {},
        "billing": nothing_billed,
        "billed_total_micros": {"runway": 0, "veo": 0, "replicate": 0},
        "billed_total_micros_all": 0,
    }
    assert sandbox.control("GET", "faults") == []
    assert sandbox.control("GET", "config")["veo"]["max_concurrent"] is None
    with pytest.raises(runwayml.NotFoundError):
        client.tasks.retrieve(created.id)


def test_sigterm_exits_cleanly_with_a_request_hanging(tmp_path: Path) -> None:
    running = start_sandbox(tmp_path)
    outcome: list[BaseException | httpx.Response] = []

    def hang() -> None:
        try:
            outcome.append(httpx.get(f"{running.root}/replicate/v1/predictions/x", timeout=30))
        except httpx.HTTPError as failure:
            outcome.append(failure)

    hung = threading.Thread(target=hang, daemon=True)
    try:
        running.fault(kind="hang")
        hung.start()
        poll(running.counters, lambda counters: "replicate" in counters["requests"])
    finally:
        assert stop_sandbox(running) == 0
    hung.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], httpx.HTTPError)
