"""The local renderer end to end: the real service process, spoken to through the generated stubs."""

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import grpc
import pytest
from google.protobuf import text_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.failures import Reason

# Generous: the machine has two cores and the suite may share them with other processes.
TIMEOUT = 60.0
PACED_FPS = 12.0

Stub = renderer_pb2_grpc.RendererServiceStub
SUCCEEDED = renderer_pb2.RENDER_STATE_SUCCEEDED
RUNNING = renderer_pb2.RENDER_STATE_RUNNING
PENDING = renderer_pb2.RENDER_STATE_PENDING
CANCELLED = renderer_pb2.RENDER_STATE_CANCELLED


@dataclass
class RendererProcess:
    """A renderer process and the JSON records of its log, as they arrive."""

    data_dir: Path
    process: subprocess.Popen[bytes]
    records: list[dict[str, Any]] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)
    port: int = 0

    def pump(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                record = json.loads(line)
            except ValueError:
                record = {"event": "unparsed", "line": line.decode(errors="replace")}
            with self.arrived:
                self.records.append(record)
                self.arrived.notify_all()
        with self.arrived:
            self.records.append({"event": "exited"})
            self.arrived.notify_all()

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        """The first log record matching predicate, waiting for it; blocking."""

        def found() -> dict[str, Any] | None:
            return next((record for record in self.records if predicate(record)), None)

        with self.arrived:
            if not self.arrived.wait_for(
                lambda: found() or self.records[-1:] == [{"event": "exited"}], timeout
            ):
                raise TimeoutError("no such log record")
            record = found()
        if record is None:
            raise AssertionError(f"the renderer exited; its log: {self.records}")
        return record

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def videos(self) -> Path:
        return self.data_dir / "videos"


def _start(data_dir: Path, **environment: str) -> RendererProcess:
    env = {
        **os.environ,
        "AIPROD_LOCAL_RENDERER_PORT": "0",
        "AIPROD_DATA_DIR": str(data_dir),
        "AIPROD_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
        **environment,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "aiprod_renderers.local"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    renderer = RendererProcess(data_dir, process)
    threading.Thread(target=renderer.pump, name="renderer-log", daemon=True).start()
    try:
        renderer.port = int(renderer.wait_for(lambda record: record.get("event") == "serving")["port"])
    except BaseException:
        process.kill()
        process.wait()
        raise
    return renderer


def _stop(renderer: RendererProcess) -> None:
    renderer.process.send_signal(signal.SIGTERM)
    try:
        assert renderer.process.wait(TIMEOUT) == 0
    finally:
        if renderer.process.poll() is None:
            renderer.process.kill()
            renderer.process.wait()


@pytest.fixture(scope="module")
def renderer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RendererProcess]:
    process = _start(tmp_path_factory.mktemp("renderer"))
    yield process
    _stop(process)


@pytest.fixture(scope="module")
def paced_renderer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RendererProcess]:
    """Slowed down so that renders can be caught mid-way; one slot, so that others wait PENDING."""
    process = _start(
        tmp_path_factory.mktemp("paced"),
        AIPROD_LOCAL_RENDER_PACE_FPS=str(PACED_FPS),
        AIPROD_LOCAL_RENDER_CONCURRENCY="1",
    )
    yield process
    _stop(process)


@pytest.fixture(scope="module")
async def stub(renderer: RendererProcess) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(renderer.address) as channel:
        yield Stub(channel)


@dataclass
class Paced:
    """A stub to the paced renderer, and the renders a test started there."""

    stub: Stub
    started: list[str] = field(default_factory=list)

    async def start(self, request: renderer_pb2.StartRenderRequest) -> renderer_pb2.Render:
        render = (await self.stub.StartRender(request)).render
        self.started.append(render.handle.task_id)
        return render


@pytest.fixture
async def paced(paced_renderer: RendererProcess) -> AsyncIterator[Paced]:
    """Cancels, at the end, whatever the test left running: the renderer's one slot is shared."""
    async with grpc.aio.insecure_channel(paced_renderer.address) as channel:
        paced = Paced(Stub(channel))
        yield paced
        for task_id in paced.started:
            status = (await paced.stub.GetRender(renderer_pb2.GetRenderRequest(task_id=task_id))).render
            if status.state in (PENDING, RUNNING):
                await paced.stub.CancelRender(renderer_pb2.CancelRenderRequest(task_id=task_id))


def _request(
    key: str, prompt: str, seconds: float, aspect: int = 0, seed: int = 0
) -> renderer_pb2.StartRenderRequest:
    shot = render_pb2.Shot(prompt=prompt, duration_seconds=seconds, aspect_ratio=aspect, seed=seed)
    return renderer_pb2.StartRenderRequest(idempotency_key=key, shot=shot)


async def _watch(stub: Stub, task_id: str) -> list[renderer_pb2.Render]:
    """Every status the watch stream sends, until it ends."""
    async with asyncio.timeout(TIMEOUT):
        return [
            message.render
            async for message in stub.WatchRender(renderer_pb2.WatchRenderRequest(task_id=task_id))
        ]


def _sha256_and_size(path: Path) -> tuple[str, int]:
    content = path.read_bytes()
    return hashlib.sha256(content).hexdigest(), len(content)


def _decode(path: Path) -> tuple[int, int, int, float]:
    """(frames, width, height, frame rate) found by decoding every frame."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.codec_context.width, stream.codec_context.height, float(stream.average_rate)


def _field_violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    fields = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        # Other details (the ErrorInfo every error carries) are not about fields.
        if detail.Unpack(bad_request):
            fields += [violation.field for violation in bad_request.field_violations]
    return fields


async def test_capabilities(stub: Stub) -> None:
    capabilities = (await stub.GetCapabilities(renderer_pb2.GetCapabilitiesRequest())).capabilities
    assert capabilities.backend == backend_pb2.BACKEND_LOCAL
    assert list(capabilities.models) == ["local-synth-v1"]
    assert (capabilities.min_duration_seconds, capabilities.max_duration_seconds) == (1, 60)
    assert not capabilities.allowed_durations_seconds
    assert set(capabilities.aspect_ratios) == {
        render_pb2.ASPECT_RATIO_16_9,
        render_pb2.ASPECT_RATIO_9_16,
        render_pb2.ASPECT_RATIO_1_1,
    }
    assert list(capabilities.resolutions) == ["720p"]
    assert not capabilities.image_input and not capabilities.audio
    assert capabilities.price_per_second.currency_code == "USD"
    assert capabilities.price_per_second.amount_micros == 0
    assert capabilities.nominal_quality == 0.5
    assert (capabilities.max_prompt_characters, capabilities.max_image_bytes) == (2000, 0)


async def test_render_16_9(stub: Stub, renderer: RendererProcess) -> None:
    request = _request(
        "landscape-1", "A lighthouse in a storm, waves crashing", 2, render_pb2.ASPECT_RATIO_16_9
    )
    started = (await stub.StartRender(request)).render
    assert started.state in (PENDING, RUNNING)
    assert started.handle == backend_pb2.RenderHandle(
        backend=backend_pb2.BACKEND_LOCAL, task_id=started.handle.task_id, idempotency_key="landscape-1"
    )
    assert started.handle.task_id.startswith("local_")

    events = await _watch(stub, started.handle.task_id)
    assert [event.state for event in events][-1] == SUCCEEDED
    progress = [event.progress for event in events]
    assert progress == sorted(progress)
    assert any(event.state == RUNNING and 0 < event.progress < 1 for event in events)
    # Progress is sent in steps of 2% at least: at most 50 of them, plus the start and the end.
    assert len(events) <= 53

    output = events[-1].output
    video = output.video
    assert output.backend == backend_pb2.BACKEND_LOCAL
    assert output.cost.amount_micros == 0 and output.cost.currency_code == "USD"
    assert video.uri.startswith("file:///")
    path = Path(video.uri.removeprefix("file://"))
    assert path == (renderer.videos / video.sha256[:2] / f"{video.sha256}.mp4").resolve()
    assert _sha256_and_size(path) == (video.sha256, video.size_bytes)
    assert video.mime_type == "video/mp4"
    assert (video.width, video.height, video.frame_rate, video.frame_count) == (1280, 720, 24, 48)
    assert video.duration_seconds == 2
    assert _decode(path) == (48, 1280, 720, 24.0)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.format.name) == ("h264", "yuv420p")

    assert output.qc.score == 1.0
    assert {check.name for check in output.qc.checks} >= {"duration", "resolution", "frame_rate"}
    assert not list(renderer.videos.glob(".partial-*"))

    # Once ended: GetRender tells the same, and a watch sends the final status and ends.
    got = (await stub.GetRender(renderer_pb2.GetRenderRequest(task_id=started.handle.task_id))).render
    assert got == events[-1]
    assert await _watch(stub, started.handle.task_id) == [events[-1]]


@pytest.mark.parametrize(
    ("aspect", "size"),
    [(render_pb2.ASPECT_RATIO_9_16, (720, 1280)), (render_pb2.ASPECT_RATIO_1_1, (960, 960))],
    ids=["9:16", "1:1"],
)
async def test_render_sizes(stub: Stub, aspect: int, size: tuple[int, int]) -> None:
    request = _request(f"size-{aspect}", "A tall tower and a square garden", 1, aspect)
    started = (await stub.StartRender(request)).render
    final = (await _watch(stub, started.handle.task_id))[-1]
    assert final.state == SUCCEEDED
    # Rendered on this machine: free, and said so.
    assert final.HasField("charge") and final.charge.amount_micros == 0
    assert final.model == "local-synth-v1"
    video = final.output.video
    assert (video.width, video.height, video.frame_count) == (*size, 24)
    assert _decode(Path(video.uri.removeprefix("file://"))) == (24, *size, 24.0)
    assert final.output.qc.score == 1.0


async def test_same_key_same_render(stub: Stub, renderer: RendererProcess) -> None:
    request = _request("same-key:1", "One render, however often it is asked for", 1, seed=42)
    first, second = await asyncio.gather(stub.StartRender(request), stub.StartRender(request))
    task_id = first.render.handle.task_id
    assert second.render.handle.task_id == task_id
    assert (await _watch(stub, task_id))[-1].state == SUCCEEDED
    again = (await stub.StartRender(request)).render
    assert again.handle.task_id == task_id
    assert again.state == SUCCEEDED

    # The log has every start before this render's end: exactly one start for the key.
    await asyncio.to_thread(
        renderer.wait_for,
        lambda record: record.get("event") == "render ended" and record["task_id"] == task_id,
    )
    starts = [
        record
        for record in renderer.records
        if record.get("event") == "render started" and record.get("idempotency_key") == "same-key:1"
    ]
    assert [record["task_id"] for record in starts] == [task_id]


async def test_cancel_mid_render(paced: Paced, paced_renderer: RendererProcess) -> None:
    # 20 s at the paced rate would take 40 s: only a cancel ends it in time.
    task_id = (await paced.start(_request("cancel-1", "A render that is cancelled", 20))).handle.task_id
    async with asyncio.timeout(TIMEOUT):
        stream = paced.stub.WatchRender(renderer_pb2.WatchRenderRequest(task_id=task_id))
        async for message in stream:
            if message.render.state == RUNNING and message.render.progress > 0:
                break
        cancelled = (await paced.stub.CancelRender(renderer_pb2.CancelRenderRequest(task_id=task_id))).render
        assert cancelled.state == CANCELLED
        assert cancelled.failure.reason == Reason.CANCELLED
        assert cancelled.HasField("charge") and cancelled.charge.amount_micros == 0
        assert 0 < cancelled.progress < 0.5
        rest = [message.render async for message in stream]
    assert rest[-1] == cancelled
    assert (await paced.stub.GetRender(renderer_pb2.GetRenderRequest(task_id=task_id))).render == cancelled

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await paced.stub.CancelRender(renderer_pb2.CancelRenderRequest(task_id=task_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The worker has stopped by the time the cancel answers: its partial file is gone, none was stored.
    assert [path for path in paced_renderer.videos.rglob("*") if path.is_file()] == []


async def test_cancel_pending_render(paced: Paced) -> None:
    running = await paced.start(_request("busy-1", "A render that holds the one slot", 20))
    pending = await paced.start(_request("waiting-1", "A render that waits for it", 2))
    assert pending.state == PENDING
    request = renderer_pb2.CancelRenderRequest(task_id=pending.handle.task_id)
    cancelled = (await paced.stub.CancelRender(request)).render
    assert cancelled.state == CANCELLED and cancelled.failure.reason == Reason.CANCELLED
    assert cancelled.progress == 0
    # The slot's holder goes on regardless.
    events = paced.stub.WatchRender(renderer_pb2.WatchRenderRequest(task_id=running.handle.task_id))
    async with asyncio.timeout(TIMEOUT):
        async for message in events:
            if message.render.state == RUNNING and message.render.progress > 0:
                break
    events.cancel()


# Changes (protobuf text merged into a valid request) that make it invalid, and the field to blame.
INVALID = [
    ('idempotency_key: ""', "idempotency_key"),
    ('idempotency_key: "has space"', "idempotency_key"),
    (f'idempotency_key: "{"k" * 129}"', "idempotency_key"),
    ('shot { prompt: "   " }', "shot.prompt"),
    (f'shot {{ prompt: "{"p" * 2001}" }}', "shot.prompt"),
    ("shot { duration_seconds: 0 }", "shot.duration_seconds"),
    ("shot { duration_seconds: 60.5 }", "shot.duration_seconds"),
    ("shot { duration_seconds: nan }", "shot.duration_seconds"),
    ("shot { aspect_ratio: 7 }", "shot.aspect_ratio"),
    ('shot { first_frame { uri: "file:///first.png" } }', "shot.first_frame"),
    ('model: "veo-3"', "model"),
]


@pytest.mark.parametrize(("change", "field"), INVALID, ids=[change[:40] for change, _ in INVALID])
async def test_invalid_input(stub: Stub, change: str, field: str) -> None:
    request = text_format.Merge(change, _request("bad-input", "A valid prompt", 2))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.StartRender(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _field_violations(caught.value) == [field]
    # Still serving.
    assert (await stub.GetCapabilities(renderer_pb2.GetCapabilitiesRequest())).capabilities.models


async def test_unknown_task(stub: Stub) -> None:
    task_id = "local_0000"
    calls = [
        stub.GetRender(renderer_pb2.GetRenderRequest(task_id=task_id)),
        stub.CancelRender(renderer_pb2.CancelRenderRequest(task_id=task_id)),
        _watch(stub, task_id),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_stop_mid_render(tmp_path: Path) -> None:
    """SIGTERM while rendering: the render is cancelled, its partial file removed, the process exits 0."""
    renderer = _start(
        tmp_path, AIPROD_LOCAL_RENDER_PACE_FPS=str(PACED_FPS), AIPROD_SHUTDOWN_GRACE_SECONDS="0.5"
    )
    try:
        async with grpc.aio.insecure_channel(renderer.address) as channel:
            stub = Stub(channel)
            task_id = (await stub.StartRender(_request("stop-1", "Interrupted", 20))).render.handle.task_id
            async with asyncio.timeout(TIMEOUT):
                async for message in stub.WatchRender(renderer_pb2.WatchRenderRequest(task_id=task_id)):
                    if message.render.progress > 0:
                        break
    finally:
        await asyncio.to_thread(_stop, renderer)
    assert [path for path in renderer.videos.rglob("*") if path.is_file()] == []
