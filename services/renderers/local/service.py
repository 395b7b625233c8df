"""The local renderer: renders synthetic videos on this machine, free, for development and tests.

Renders run as background tasks, at most `concurrency` at once; the encoding itself runs in a worker
thread so that the event loop keeps serving. Render state lives in memory only: the renderer holds
no durable state, while the videos it stores are durable on disk. Requests are checked as the kit's
renderers check theirs (`aiprod_kit.checks`), then against what this renderer can do.
"""

import asyncio
import contextlib
import math
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import structlog

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.checks import Violation, echo, shot_violations, task_id_violations
from aiprod_kit.errors import FailedPrecondition, InvalidArgument, NotFound
from aiprod_kit.failures import Reason, failure
from aiprod_kit.money import usd
from aiprod_kit.rendering import finishing, qc
from aiprod_kit.rendering.keys import KEY_PATTERN, KEY_RULE
from aiprod_kit.rendering.record import RenderRecord
from aiprod_kit.rendering.registry import RenderRegistry
from aiprod_kit.rendering.storage import (
    LocalVideoStore,
    VideoStore,
    scratch_directory,
    video_store_from_settings,
)
from aiprod_kit.rendering.watching import watch_renders
from aiprod_kit.server import Registration
from aiprod_kit.settings import LocalRendererSettings
from aiprod_renderers.local import synth

SERVICE_NAME = renderer_pb2.DESCRIPTOR.services_by_name["RendererService"].full_name
MODEL = "local-synth-v1"
MIN_DURATION_SECONDS = 1.0
MAX_DURATION_SECONDS = 60.0
MAX_PROMPT_CHARACTERS = 2000
_ASPECT_RATIOS = (render_pb2.ASPECT_RATIO_16_9, render_pb2.ASPECT_RATIO_9_16, render_pb2.ASPECT_RATIO_1_1)
# Progress is published in steps of at least this much, so that watchers get ~50 messages a render.
_PROGRESS_STEP = 0.02
# The share of progress that encoding accounts for; storing and checking the file make the rest.
_ENCODE_SHARE = 0.9

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


def _violations(request: renderer_pb2.StartRenderRequest) -> list[Violation]:
    shot = request.shot
    found = []
    if not KEY_PATTERN.fullmatch(request.idempotency_key):
        found.append(("idempotency_key", KEY_RULE))
    malformed = shot_violations(shot)
    found += malformed
    # This renderer's own limits, for the fields the checks every renderer makes left alone.
    checked = {field for field, _ in malformed}
    if "shot.prompt" not in checked and len(shot.prompt) > MAX_PROMPT_CHARACTERS:
        found.append(("shot.prompt", f"at most {MAX_PROMPT_CHARACTERS} characters"))
    duration = shot.duration_seconds
    if "shot.duration_seconds" not in checked and not (
        math.isfinite(duration) and MIN_DURATION_SECONDS <= duration <= MAX_DURATION_SECONDS
    ):
        found.append(
            ("shot.duration_seconds", f"must be {MIN_DURATION_SECONDS:g} to {MAX_DURATION_SECONDS:g} seconds")
        )
    if "shot.aspect_ratio" not in checked and shot.aspect_ratio not in (
        render_pb2.ASPECT_RATIO_UNSPECIFIED,
        *_ASPECT_RATIOS,
    ):
        found.append(
            ("shot.aspect_ratio", f"does not render {render_pb2.AspectRatio.Name(shot.aspect_ratio)}")
        )
    if "shot.first_frame" not in checked and shot.HasField("first_frame"):
        found.append(("shot.first_frame", "this backend takes no first frame"))
    if shot.resolution not in ("", "720p"):
        found.append(("shot.resolution", f"renders 720p only, not {echo(shot.resolution)}"))
    if request.model not in ("", MODEL):
        found.append(("model", f"unknown model {echo(request.model)}; this backend has {MODEL!r}"))
    return found


class _LocalRender(RenderRecord):
    """A render on this machine: the kit's record, its cancel flag and the task that runs it."""

    def __init__(self, task_id: str, request: renderer_pb2.StartRenderRequest) -> None:
        super().__init__(request.idempotency_key, request.shot, MODEL, backend_pb2.BACKEND_LOCAL, task_id)
        self.cancel = threading.Event()
        self.task: asyncio.Task[None] | None = None


class LocalRendererService(renderer_pb2_grpc.RendererServiceServicer):
    def __init__(
        self,
        videos_dir: Path,
        concurrency: int,
        pace_fps: float,
        remote_store: VideoStore | None = None,
        work_dir: Path | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"render concurrency must be at least 1, not {concurrency}")
        self._videos_dir = videos_dir.resolve()
        # Where outputs go when they are not kept on this machine (a Cloud Storage bucket): each is
        # encoded and checked in a directory of its own here (two renders of one prompt make the same
        # file), then put there and the directory removed.
        self._remote_store = remote_store
        self._work_dir = work_dir or self._videos_dir.parent / "tmp" / "renderer-local"
        self._pace_fps = pace_fps
        self._slots = asyncio.Semaphore(concurrency)
        # In memory only: a local render is free, so one lost to a restart is simply rendered again.
        self._registry: RenderRegistry[_LocalRender] = RenderRegistry("local")

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
        render = self._registry.by_key(request.idempotency_key)
        if render is None:
            render = _LocalRender(f"local_{uuid.uuid4().hex}", request)
            self._registry.add(render)
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
        if request.idempotency_key and not request.task_id:
            return renderer_pb2.GetRenderResponse(
                render=self._find_by_key(request.idempotency_key).snapshot()
            )
        return renderer_pb2.GetRenderResponse(render=self._find(request.task_id).snapshot())

    async def WatchRender(
        self, request: renderer_pb2.WatchRenderRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[renderer_pb2.WatchRenderResponse]:
        async for status in self._find(request.task_id).watch():
            yield renderer_pb2.WatchRenderResponse(render=status)

    async def WatchRenders(
        self,
        requests: AsyncIterator[renderer_pb2.WatchRendersRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[renderer_pb2.WatchRendersResponse]:
        async def find(task_id: str) -> _LocalRender:
            return self._find(task_id)

        async for response in watch_renders(requests, find):
            yield response

    async def CancelRender(
        self, request: renderer_pb2.CancelRenderRequest, context: grpc.aio.ServicerContext
    ) -> renderer_pb2.CancelRenderResponse:
        render = self._find(request.task_id)
        if render.ended:
            raise FailedPrecondition(
                f"render {render.task_id} has already ended "
                f"({renderer_pb2.RenderState.Name(render.status.state)})"
            )
        await self._cancel(render)
        log.info("render cancelled", task_id=render.task_id)
        return renderer_pb2.CancelRenderResponse(render=render.snapshot())

    async def close(self) -> None:
        """Cancels every render that has not ended and waits for their workers to stop."""
        await asyncio.gather(
            *(self._cancel(render) for render in self._registry.with_tasks() if not render.ended)
        )

    def _find(self, task_id: str) -> _LocalRender:
        if violations := task_id_violations(task_id):
            raise InvalidArgument(violations)
        render = self._registry.known(task_id)
        if render is None:
            raise NotFound(f"no render {echo(task_id)} at this renderer")
        return render

    def _find_by_key(self, key: str) -> _LocalRender:
        """The render started under a key; NOT_FOUND when none was (here, since this process started)."""
        if not KEY_PATTERN.fullmatch(key):
            raise InvalidArgument([("idempotency_key", KEY_RULE)])
        render = self._registry.by_key(key)
        if render is None:
            raise NotFound(f"no render was started under key {echo(key)} at this renderer")
        return render

    async def _end(
        self, render: _LocalRender, state: int, reason: int, message: str, retryable: bool
    ) -> None:
        # Rendered here: nobody bills.
        await self._registry.end(render, state, failure(reason, message, retryable), 0)

    async def _cancel(self, render: _LocalRender) -> None:
        render.cancel.set()
        assert render.task is not None
        if render.status.state == renderer_pb2.RENDER_STATE_PENDING:
            # Still waiting for a slot: nothing runs yet, so the task can simply go.
            render.task.cancel()
            await self._end(
                render,
                renderer_pb2.RENDER_STATE_CANCELLED,
                Reason.CANCELLED,
                "cancelled before it started",
                False,
            )
        else:
            # The worker sees the flag before its next frame; shielded so that a caller giving up
            # on the cancel call does not cut the render's own ending short.
            await asyncio.shield(render.task)

    async def _run(self, render: _LocalRender) -> None:
        async with self._slots:
            render.update(renderer_pb2.RENDER_STATE_RUNNING, 0.0)
            output: render_pb2.RenderOutput | None = None
            error: Exception | None = None
            try:
                if self._remote_store is None:
                    output = await self._encode(render, LocalVideoStore(self._videos_dir))
                else:
                    output = await self._encode_and_put(render, self._remote_store)
            except synth.RenderCancelled:
                pass
            except Exception as caught:
                log.exception("render failed", task_id=render.task_id)
                error = caught
        # Once a cancel is asked the render ends CANCELLED, even if its worker got to the end first.
        if render.cancel.is_set():
            await self._end(
                render,
                renderer_pb2.RENDER_STATE_CANCELLED,
                Reason.CANCELLED,
                "cancelled while rendering",
                False,
            )
        elif output is not None:
            render.status.progress = 1.0
            render.status.output.CopyFrom(output)
            await self._registry.end(render, renderer_pb2.RENDER_STATE_SUCCEEDED, None, 0)
        else:
            await self._end(
                render,
                renderer_pb2.RENDER_STATE_FAILED,
                Reason.RENDERER_INTERNAL,
                f"the local renderer failed ({type(error).__name__})",
                True,
            )

    async def _encode(self, render: _LocalRender, store: LocalVideoStore) -> render_pb2.RenderOutput:
        return await asyncio.to_thread(self._produce, render, store, asyncio.get_running_loop())

    async def _encode_and_put(self, render: _LocalRender, remote: VideoStore) -> render_pb2.RenderOutput:
        """Encoded and checked in a scratch directory, then put in the remote store."""
        async with scratch_directory(self._work_dir) as scratch:
            local = LocalVideoStore(scratch)
            output = await self._encode(render, local)
            if render.cancel.is_set():
                raise synth.RenderCancelled
            stored = await remote.put(local.path_of(output.video.uri))
        output.video.uri = stored.uri
        return output

    def _produce(
        self, render: _LocalRender, store: LocalVideoStore, loop: asyncio.AbstractEventLoop
    ) -> render_pb2.RenderOutput:
        """Encodes, stores and checks the video. Runs in a worker thread."""
        shot = render.shot
        width, height = synth.frame_size(shot.aspect_ratio)
        published = 0.0

        def on_progress(fraction: float) -> None:
            nonlocal published
            if fraction - published >= _PROGRESS_STEP or fraction == 1.0:
                published = fraction
                loop.call_soon_threadsafe(
                    render.update, renderer_pb2.RENDER_STATE_RUNNING, fraction * _ENCODE_SHARE
                )

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
        report = finishing.check(
            found,
            shot,
            frame_size=lambda shot: synth.frame_size(shot.aspect_ratio),
            frame_rate=synth.FRAME_RATE,
            exact_size=True,
        )
        output = finishing.render_output(backend_pb2.BACKEND_LOCAL, stored, found, report)
        output.cost.CopyFrom(usd(0))
        return output


@contextlib.asynccontextmanager
async def build(settings: LocalRendererSettings) -> AsyncIterator[list[Registration]]:
    """The renderer's registrations; on the way out, renders still going are cancelled."""
    service = LocalRendererService(
        settings.data_dir / "videos",
        settings.local_render_concurrency,
        settings.local_render_pace_fps,
        video_store_from_settings(settings.data_dir, settings.gcs_bucket) if settings.gcs_bucket else None,
        settings.data_dir / "tmp" / "renderer-local",
    )
    try:
        yield [Registration(SERVICE_NAME, service, renderer_pb2_grpc.add_RendererServiceServicer_to_server)]
    finally:
        await service.close()
