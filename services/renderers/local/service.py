"""The local renderer: renders synthetic videos on this machine, free, for development and tests.

Renders run as background tasks, at most `concurrency` at once; the encoding itself runs in a worker
thread so that the event loop keeps serving. Render state lives in memory only: the renderer holds
no durable state, while the videos it stores are durable on disk.
"""

import asyncio
import contextlib
import math
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import structlog

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.errors import FailedPrecondition, InvalidArgument, NotFound
from aiprod_kit.money import usd
from aiprod_kit.rendering import qc
from aiprod_kit.rendering.storage import LocalVideoStore
from aiprod_kit.server import Registration
from aiprod_kit.settings import LocalRendererSettings
from aiprod_renderers.local import synth

SERVICE_NAME = renderer_pb2.DESCRIPTOR.services_by_name["RendererService"].full_name
MODEL = "local-synth-v1"
MIN_DURATION_SECONDS = 1.0
MAX_DURATION_SECONDS = 60.0
MAX_PROMPT_CHARACTERS = 2000
_KEY_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_ASPECT_RATIOS = (render_pb2.ASPECT_RATIO_16_9, render_pb2.ASPECT_RATIO_9_16, render_pb2.ASPECT_RATIO_1_1)
# Progress is published in steps of at least this much, so that watchers get ~50 messages a render.
_PROGRESS_STEP = 0.02
# The share of progress that encoding accounts for; storing and checking the file make the rest.
_ENCODE_SHARE = 0.9

TERMINAL_STATES = frozenset(
    {
        renderer_pb2.RENDER_STATE_SUCCEEDED,
        renderer_pb2.RENDER_STATE_FAILED,
        renderer_pb2.RENDER_STATE_CANCELLED,
    }
)

log = structlog.get_logger()


def capabilities() -> renderer_pb2.Capabilities:
    return renderer_pb2.Capabilities(
        backend=backend_pb2.BACKEND_LOCAL,
        models=[MODEL],
        min_duration_seconds=MIN_DURATION_SECONDS,
        max_duration_seconds=MAX_DURATION_SECONDS,
        aspect_ratios=_ASPECT_RATIOS,
        resolutions=["720p"],
        image_input=False,
        audio=False,
        price_per_second=usd(0),
        nominal_quality=0.5,
        max_prompt_characters=MAX_PROMPT_CHARACTERS,
    )


def _violations(request: renderer_pb2.StartRenderRequest) -> list[tuple[str, str]]:
    shot = request.shot
    found = []
    if not _KEY_PATTERN.fullmatch(request.idempotency_key):
        found.append(("idempotency_key", "must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':', '-'"))
    if not shot.prompt.strip():
        found.append(("shot.prompt", "required"))
    elif len(shot.prompt) > MAX_PROMPT_CHARACTERS:
        found.append(("shot.prompt", f"at most {MAX_PROMPT_CHARACTERS} characters"))
    duration = shot.duration_seconds
    if not (math.isfinite(duration) and MIN_DURATION_SECONDS <= duration <= MAX_DURATION_SECONDS):
        found.append(
            ("shot.duration_seconds", f"must be {MIN_DURATION_SECONDS:g} to {MAX_DURATION_SECONDS:g} seconds")
        )
    if shot.aspect_ratio != render_pb2.ASPECT_RATIO_UNSPECIFIED and shot.aspect_ratio not in _ASPECT_RATIOS:
        found.append(("shot.aspect_ratio", f"unknown aspect ratio {shot.aspect_ratio}"))
    if shot.HasField("first_frame"):
        found.append(("shot.first_frame", "this backend takes no first frame"))
    if request.model not in ("", MODEL):
        found.append(("model", f"unknown model; this backend has {MODEL!r}"))
    return found


class _Render:
    """One render: its status, its cancel flag, its task, and the event its watchers wait on."""

    def __init__(self, task_id: str, request: renderer_pb2.StartRenderRequest) -> None:
        self.task_id = task_id
        self.shot = request.shot
        self.cancel = threading.Event()
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._status = renderer_pb2.Render(
            handle=backend_pb2.RenderHandle(
                backend=backend_pb2.BACKEND_LOCAL, task_id=task_id, idempotency_key=request.idempotency_key
            ),
            state=renderer_pb2.RENDER_STATE_PENDING,
            model=MODEL,
        )
        self._status.create_time.GetCurrentTime()
        self._status.update_time.CopyFrom(self._status.create_time)

    @property
    def state(self) -> int:
        return self._status.state

    @property
    def ended(self) -> bool:
        return self._status.state in TERMINAL_STATES

    def snapshot(self) -> renderer_pb2.Render:
        copy = renderer_pb2.Render()
        copy.CopyFrom(self._status)
        return copy

    def next_change(self) -> asyncio.Event:
        """The event set at the status's next change."""
        return self._changed

    def _changed_now(self) -> None:
        self._status.update_time.GetCurrentTime()
        self._changed.set()
        self._changed = asyncio.Event()

    def start(self) -> None:
        self._status.state = renderer_pb2.RENDER_STATE_RUNNING
        self._changed_now()

    def set_progress(self, fraction: float) -> None:
        # Progress can arrive from the worker after a cancel has ended the render.
        if not self.ended:
            self._status.progress = fraction
            self._changed_now()

    def succeed(self, output: render_pb2.RenderOutput) -> None:
        self._status.state = renderer_pb2.RENDER_STATE_SUCCEEDED
        self._status.progress = 1.0
        self._status.output.CopyFrom(output)
        self._status.charge.CopyFrom(usd(0))  # rendered here: nobody bills
        self._changed_now()

    def fail(self, reason: str, message: str, retryable: bool) -> None:
        self._end(renderer_pb2.RENDER_STATE_FAILED, reason, message, retryable)

    def cancelled(self, message: str) -> None:
        self._end(renderer_pb2.RENDER_STATE_CANCELLED, "CANCELLED", message, retryable=False)

    def _end(self, state: int, reason: str, message: str, retryable: bool) -> None:
        self._status.state = state
        self._status.failure.CopyFrom(
            render_pb2.RenderFailure(reason=reason, message=message, retryable=retryable)
        )
        self._status.charge.CopyFrom(usd(0))
        self._changed_now()


class LocalRendererService(renderer_pb2_grpc.RendererServiceServicer):
    def __init__(self, videos_dir: Path, concurrency: int, pace_fps: float) -> None:
        if concurrency < 1:
            raise ValueError(f"render concurrency must be at least 1, not {concurrency}")
        self._videos_dir = videos_dir.resolve()
        self._pace_fps = pace_fps
        self._slots = asyncio.Semaphore(concurrency)
        self._renders: dict[str, _Render] = {}
        self._by_key: dict[str, _Render] = {}

    async def GetCapabilities(
        self, request: renderer_pb2.GetCapabilitiesRequest, context: grpc.aio.ServicerContext
    ) -> renderer_pb2.GetCapabilitiesResponse:
        return renderer_pb2.GetCapabilitiesResponse(capabilities=capabilities())

    async def StartRender(
        self, request: renderer_pb2.StartRenderRequest, context: grpc.aio.ServicerContext
    ) -> renderer_pb2.StartRenderResponse:
        if violations := _violations(request):
            raise InvalidArgument(violations)
        # No await between the lookup and the insert: concurrent calls with one key get one render.
        render = self._by_key.get(request.idempotency_key)
        if render is None:
            render = _Render(f"local_{uuid.uuid4().hex}", request)
            self._renders[render.task_id] = render
            self._by_key[request.idempotency_key] = render
            render.task = asyncio.create_task(self._run(render), name=render.task_id)
            log.info(
                "render started",
                task_id=render.task_id,
                idempotency_key=request.idempotency_key,
                duration_seconds=request.shot.duration_seconds,
                aspect_ratio=render_pb2.AspectRatio.Name(request.shot.aspect_ratio),
            )
        return renderer_pb2.StartRenderResponse(render=render.snapshot())

    async def GetRender(
        self, request: renderer_pb2.GetRenderRequest, context: grpc.aio.ServicerContext
    ) -> renderer_pb2.GetRenderResponse:
        return renderer_pb2.GetRenderResponse(render=self._find(request.task_id).snapshot())

    async def WatchRender(
        self, request: renderer_pb2.WatchRenderRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[renderer_pb2.WatchRenderResponse]:
        render = self._find(request.task_id)
        while True:
            # Taken before the snapshot, so that a change while the message is sent is not missed.
            changed = render.next_change()
            status = render.snapshot()
            yield renderer_pb2.WatchRenderResponse(render=status)
            if status.state in TERMINAL_STATES:
                return
            await changed.wait()

    async def CancelRender(
        self, request: renderer_pb2.CancelRenderRequest, context: grpc.aio.ServicerContext
    ) -> renderer_pb2.CancelRenderResponse:
        render = self._find(request.task_id)
        if render.ended:
            raise FailedPrecondition(
                f"render {render.task_id} has already ended ({renderer_pb2.RenderState.Name(render.state)})"
            )
        await self._cancel(render)
        log.info("render cancelled", task_id=render.task_id)
        return renderer_pb2.CancelRenderResponse(render=render.snapshot())

    async def close(self) -> None:
        """Cancels every render that has not ended and waits for their workers to stop."""
        await asyncio.gather(*(self._cancel(render) for render in self._renders.values() if not render.ended))

    def _find(self, task_id: str) -> _Render:
        if not task_id:
            raise InvalidArgument([("task_id", "required")])
        render = self._renders.get(task_id)
        if render is None:
            raise NotFound(f"no render {task_id!r} at this renderer")
        return render

    async def _cancel(self, render: _Render) -> None:
        render.cancel.set()
        assert render.task is not None
        if render.state == renderer_pb2.RENDER_STATE_PENDING:
            # Still waiting for a slot: nothing runs yet, so the task can simply go.
            render.task.cancel()
            render.cancelled("cancelled before it started")
        else:
            # The worker sees the flag before its next frame; shielded so that a caller giving up
            # on the cancel call does not cut the render's own ending short.
            await asyncio.shield(render.task)

    async def _run(self, render: _Render) -> None:
        async with self._slots:
            render.start()
            started = time.monotonic()
            output: render_pb2.RenderOutput | None = None
            error: Exception | None = None
            try:
                output = await asyncio.to_thread(self._produce, render, asyncio.get_running_loop())
            except synth.RenderCancelled:
                pass
            except Exception as caught:
                log.exception("render failed", task_id=render.task_id)
                error = caught
        # Once a cancel is asked the render ends CANCELLED, even if its worker got to the end first.
        if render.cancel.is_set():
            render.cancelled("cancelled while rendering")
        elif output is not None:
            render.succeed(output)
        else:
            render.fail("INTERNAL", f"the local renderer failed ({type(error).__name__})", retryable=True)
        log.info(
            "render ended",
            task_id=render.task_id,
            state=renderer_pb2.RenderState.Name(render.state),
            seconds=round(time.monotonic() - started, 3),
        )

    def _produce(self, render: _Render, loop: asyncio.AbstractEventLoop) -> render_pb2.RenderOutput:
        """Encodes, stores and checks the video. Runs in a worker thread."""
        shot = render.shot
        width, height = synth.frame_size(shot.aspect_ratio)
        published = 0.0

        def on_progress(fraction: float) -> None:
            nonlocal published
            if fraction - published >= _PROGRESS_STEP or fraction == 1.0:
                published = fraction
                loop.call_soon_threadsafe(render.set_progress, fraction * _ENCODE_SHARE)

        store = LocalVideoStore(self._videos_dir)
        stored, _ = store.store(
            lambda path: synth.encode_video(
                path,
                shot.prompt,
                shot.seed,
                shot.duration_seconds,
                width,
                height,
                on_progress=on_progress,
                cancel=render.cancel,
                pace_fps=self._pace_fps,
            ),
        )
        if render.cancel.is_set():
            raise synth.RenderCancelled
        found = qc.probe(store.path_of(stored.uri))
        return render_pb2.RenderOutput(
            backend=backend_pb2.BACKEND_LOCAL,
            video=render_pb2.VideoArtifact(
                uri=stored.uri,
                sha256=stored.sha256,
                size_bytes=stored.size_bytes,
                mime_type="video/mp4",
                duration_seconds=found.duration_seconds,
                width=found.width,
                height=found.height,
                frame_rate=found.frame_rate,
                frame_count=found.frame_count,
            ),
            qc=qc.report(
                found,
                duration_seconds=shot.duration_seconds,
                width=width,
                height=height,
                frame_rate=synth.FRAME_RATE,
            ),
            cost=usd(0),
        )


@contextlib.asynccontextmanager
async def build(settings: LocalRendererSettings) -> AsyncIterator[list[Registration]]:
    """The renderer's registrations; on the way out, renders still going are cancelled."""
    service = LocalRendererService(
        settings.data_dir / "videos", settings.local_render_concurrency, settings.local_render_pace_fps
    )
    try:
        yield [Registration(SERVICE_NAME, service, renderer_pb2_grpc.add_RendererServiceServicer_to_server)]
    finally:
        await service.close()
