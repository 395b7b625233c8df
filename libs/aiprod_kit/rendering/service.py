"""RendererService for any provider: the kit's half of every provider renderer.

- Idempotency: one render per idempotency key; a create is never sent twice for one key (the kit
  resends only what the provider certainly did not act on, and the adapters turn their clients' own
  retries of POST off).
- One poll loop per renderer (not one per caller), each task polled no more often than poll_seconds.
- Limits, Retry-After and backoff (ProviderLimits); a circuit breaker whose state, with the
  credentials, drives the service's own health (NOT_SERVING while open; a half-open probe closes it).
- On success the output is copied to durable storage before success is reported, then checked (QC).
- The renderer keeps no durable state: a render's task id is the provider's, so after a restart
  GetRender and WatchRender re-attach to it from the provider.
"""

import asyncio
import contextlib
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import structlog
from opentelemetry import context as otel_context

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.breaker import BreakerState, CircuitBreaker
from aiprod_kit.capabilities import shot_mismatches
from aiprod_kit.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from aiprod_kit.money import usd
from aiprod_kit.rendering import qc
from aiprod_kit.rendering.limits import ProviderLimits
from aiprod_kit.rendering.provider import ErrorKind, Provider, ProviderError, ProviderTask, TaskState
from aiprod_kit.rendering.storage import VideoStore
from aiprod_kit.rendering.telemetry import ProviderCallMetrics
from aiprod_kit.server import HealthSignal
from aiprod_kit.settings import ProviderSettings

log = structlog.get_logger()
T = TypeVar("T")

_KEY = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_TERMINAL = frozenset(
    {
        renderer_pb2.RENDER_STATE_SUCCEEDED,
        renderer_pb2.RENDER_STATE_FAILED,
        renderer_pb2.RENDER_STATE_CANCELLED,
    }
)
_STATES = {
    TaskState.PENDING: renderer_pb2.RENDER_STATE_PENDING,
    TaskState.RUNNING: renderer_pb2.RENDER_STATE_RUNNING,
}
# Reasons a failed render carries, stable for routers and people.
_CREATE_FAILURES = {
    ErrorKind.REFUSED: ("PROVIDER_REFUSED", False),
    ErrorKind.AUTH: ("PROVIDER_AUTH", True),
    ErrorKind.RATE_LIMITED: ("PROVIDER_RATE_LIMITED", True),
    ErrorKind.UNAVAILABLE: ("PROVIDER_UNAVAILABLE", True),
    # The create may have reached the provider: it is not sent again under this key.
    ErrorKind.AMBIGUOUS: ("PROVIDER_UNCERTAIN", False),
    ErrorKind.NOT_FOUND: ("PROVIDER_REFUSED", False),
}


def _failure(reason: str, message: str, retryable: bool, provider_code: str = "") -> render_pb2.RenderFailure:
    return render_pb2.RenderFailure(
        reason=reason, message=message, retryable=retryable, provider_code=provider_code
    )


def failure_of(task: ProviderTask) -> render_pb2.RenderFailure:
    """A provider's task failure in the product's terms: safety refusals are final, the rest may succeed
    on another attempt."""
    code = task.failure_code
    if code.upper().startswith("SAFETY"):
        reason = "PROVIDER_SAFETY_INPUT" if ".INPUT" in code.upper() else "PROVIDER_SAFETY_OUTPUT"
        return _failure(reason, task.failure_message or code, False, code)
    if code.upper().startswith("ASSET"):
        return _failure("PROVIDER_BAD_INPUT", task.failure_message or code, False, code)
    return _failure(
        "PROVIDER_FAILED", task.failure_message or code or "the provider failed the task", True, code
    )


def _priced_shot(shot: render_pb2.Shot, facts: qc.Probe) -> render_pb2.Shot:
    """The shot to price: after a re-attach the request is unknown, so the output's length stands in."""
    if shot.duration_seconds:
        return shot
    return render_pb2.Shot(duration_seconds=facts.duration_seconds)


class _Render:
    """One render at this renderer: its status and the event its watchers wait on."""

    def __init__(self, key: str, shot: render_pb2.Shot, model: str, backend: int) -> None:
        self.shot = shot
        self.model = model
        self.next_poll = 0.0
        self.holds_slot = False
        self.created = asyncio.Event()
        self._changed = asyncio.Event()
        # The trace of the call that made this render (StartRender, or a watch after a restart): its
        # polls and download join it.
        self.trace_context = otel_context.get_current()
        self.status = renderer_pb2.Render(
            handle=backend_pb2.RenderHandle(backend=backend, idempotency_key=key),
            state=renderer_pb2.RENDER_STATE_PENDING,
        )
        self.status.create_time.GetCurrentTime()
        self.status.update_time.CopyFrom(self.status.create_time)

    @property
    def task_id(self) -> str:
        return self.status.handle.task_id

    @property
    def ended(self) -> bool:
        return self.status.state in _TERMINAL

    def snapshot(self) -> renderer_pb2.Render:
        copy = renderer_pb2.Render()
        copy.CopyFrom(self.status)
        return copy

    def next_change(self) -> asyncio.Event:
        return self._changed

    def changed(self) -> None:
        self.status.update_time.GetCurrentTime()
        self._changed.set()
        self._changed = asyncio.Event()

    def end(self, state: int, failure: render_pb2.RenderFailure | None = None) -> None:
        self.status.state = state
        if failure is not None:
            self.status.failure.CopyFrom(failure)
        self.changed()


class ProviderRendererService(renderer_pb2_grpc.RendererServiceServicer):
    def __init__(
        self,
        provider: Provider,
        settings: ProviderSettings,
        store: VideoStore,
        health: HealthSignal,
        work_dir: Path,
    ) -> None:
        self._provider = provider
        self._settings = settings
        self._store = store
        self._health = health
        self._work_dir = work_dir
        self._limits = ProviderLimits(
            settings.requests_per_minute, settings.max_concurrent_tasks, settings.request_timeout_seconds
        )
        self._breaker = CircuitBreaker(
            settings.breaker_failures, settings.breaker_cooldown_seconds, self._breaker_changed
        )
        self._missing = provider.missing_configuration()
        self._by_key: dict[str, _Render] = {}
        self._by_task: dict[str, _Render] = {}
        self._wake_poller = asyncio.Event()
        self._wake_supervisor = asyncio.Event()
        self._polls: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._log = log.bind(backend=provider.name)
        self._calls = ProviderCallMetrics(provider.name)

    # Health -------------------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        return not self._missing and self._breaker.allows_requests

    def _breaker_changed(self, state: BreakerState) -> None:
        self._log.warning("circuit breaker", state=state.value)
        self._wake_supervisor.set()

    async def _publish_health(self) -> None:
        if self._health.serving != self.serving:
            self._log.info(
                "health", serving=self.serving, missing=self._missing, breaker=self._breaker.state.value
            )
            await self._health.set(self.serving)

    async def _supervise(self) -> None:
        """Keeps health in step with credentials and the breaker; probes when the breaker is due."""
        if self._missing:
            self._log.error("credentials missing: not serving", missing=self._missing)
            await self._publish_health()
            return
        await self._probe()
        while True:
            await self._publish_health()
            self._wake_supervisor.clear()
            if self._breaker.state == BreakerState.CLOSED:
                await self._wake_supervisor.wait()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(self._breaker.seconds_until_probe(), 0.05)):
                    await self._wake_supervisor.wait()
            if self._breaker.probe_due():
                await self._probe()

    async def _probe(self) -> None:
        try:
            await self._call(None, self._provider.probe, idempotent=True, what="probe")
        except ProviderError as error:
            self._log.warning("probe failed", error=str(error))
            if error.kind == ErrorKind.AUTH:
                self._breaker.trip()
            else:
                self._breaker.record_failure()
            return
        self._breaker.record_success()

    async def _call(
        self,
        render: "_Render | None",
        operation: Callable[[], Awaitable[T]],
        *,
        idempotent: bool,
        what: str,
        timeout: float | None = None,
    ) -> T:
        """One provider call under the limits, measured, in the trace of the render it serves."""
        with self._calls.call(what, render.trace_context if render else None):
            return await self._limits.call(operation, idempotent=idempotent, what=what, timeout=timeout)

    def _record_outcome(self, error: ProviderError | None) -> None:
        if error is None:
            self._breaker.record_success()
        elif error.kind == ErrorKind.AUTH:
            self._breaker.trip()
        elif error.kind in (ErrorKind.RATE_LIMITED, ErrorKind.UNAVAILABLE, ErrorKind.AMBIGUOUS):
            self._breaker.record_failure()

    # Life ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loops = [asyncio.create_task(self._supervise()), asyncio.create_task(self._poll_forever())]

    async def close(self) -> None:
        for task in [*self._loops, *self._polls]:
            task.cancel()
        for task in [*self._loops, *self._polls]:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # RPCs ---------------------------------------------------------------------------------------

    async def GetCapabilities(
        self, request: renderer_pb2.GetCapabilitiesRequest, context: grpc.aio.ServicerContext
    ) -> renderer_pb2.GetCapabilitiesResponse:
        return renderer_pb2.GetCapabilitiesResponse(capabilities=self._provider.capabilities())

    async def StartRender(
        self, request: renderer_pb2.StartRenderRequest, context: grpc.aio.ServicerContext
    ) -> renderer_pb2.StartRenderResponse:
        capabilities = self._provider.capabilities()
        model = request.model or capabilities.models[0]
        violations = []
        if not _KEY.fullmatch(request.idempotency_key):
            violations.append(
                ("idempotency_key", "must be 1 to 128 characters from A-Z, a-z, 0-9 and . _ : -")
            )
        if not request.shot.prompt.strip():
            violations.append(("shot.prompt", "must not be empty"))
        violations += [(f"shot.{field}", why) for field, why in shot_mismatches(request.shot, capabilities)]
        if model not in capabilities.models:
            violations.append(
                ("model", f"unknown model {model!r}; this backend has {', '.join(capabilities.models)}")
            )
        if violations:
            raise InvalidArgument(violations)

        render = self._by_key.get(request.idempotency_key)
        if render is not None:
            await render.created.wait()
            return renderer_pb2.StartRenderResponse(render=render.snapshot())
        if not self.serving:
            # Nothing was sent: the caller may try elsewhere, or here again later under the same key.
            raise Unavailable(self._not_serving_reason())
        render = _Render(request.idempotency_key, request.shot, model, self._provider.backend)
        self._by_key[request.idempotency_key] = render
        try:
            await self._create(render)
        finally:
            render.created.set()
        return renderer_pb2.StartRenderResponse(render=render.snapshot())

    def _not_serving_reason(self) -> str:
        if self._missing:
            return f"the {self._provider.name} renderer has no credentials: set {', '.join(self._missing)}"
        return f"the {self._provider.name} renderer is not serving: its circuit breaker is {self._breaker.state.value}"

    async def _create(self, render: _Render) -> None:
        try:
            async with asyncio.timeout(self._settings.slot_wait_seconds):
                await self._limits.task_slots.acquire()
        except TimeoutError:
            del self._by_key[render.status.handle.idempotency_key]
            raise ResourceExhausted(
                f"the {self._provider.name} renderer is at its limit of "
                f"{self._settings.max_concurrent_tasks} concurrent tasks"
            ) from None
        render.holds_slot = True
        key = render.status.handle.idempotency_key
        try:
            task_id = await self._call(
                render,
                lambda: self._provider.create(render.shot, render.model, key),
                idempotent=False,
                what="create",
            )
        except ProviderError as error:
            self._record_outcome(error)
            self._release(render)
            reason, retryable = _CREATE_FAILURES[error.kind]
            self._log.warning("create failed", idempotency_key=key, error=str(error))
            render.end(
                renderer_pb2.RENDER_STATE_FAILED, _failure(reason, str(error), retryable, error.provider_code)
            )
            await self._publish_health()
            return
        self._record_outcome(None)
        render.status.handle.task_id = task_id
        self._by_task[task_id] = render
        self._log.info("render started", idempotency_key=key, task_id=task_id)
        self._schedule(render, delay=self._settings.poll_seconds)

    async def GetRender(
        self, request: renderer_pb2.GetRenderRequest, context: grpc.aio.ServicerContext
    ) -> renderer_pb2.GetRenderResponse:
        return renderer_pb2.GetRenderResponse(render=(await self._find(request.task_id)).snapshot())

    async def WatchRender(
        self, request: renderer_pb2.WatchRenderRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[renderer_pb2.WatchRenderResponse]:
        render = await self._find(request.task_id)
        while True:
            change = render.next_change()
            yield renderer_pb2.WatchRenderResponse(render=render.snapshot())
            if render.ended:
                return
            await change.wait()

    async def CancelRender(
        self, request: renderer_pb2.CancelRenderRequest, context: grpc.aio.ServicerContext
    ) -> renderer_pb2.CancelRenderResponse:
        render = await self._find(request.task_id)
        if render.ended:
            raise FailedPrecondition(f"render {request.task_id} has already ended")
        try:
            cancelled = await self._call(
                render, lambda: self._provider.cancel(render.task_id), idempotent=True, what="cancel"
            )
        except ProviderError as error:
            raise Unavailable(
                f"the {self._provider.name} provider did not take the cancel: {error}"
            ) from error
        message = "cancelled" if cancelled else f"stopped following; {self._provider.name} has no cancel"
        self._release(render)
        render.end(renderer_pb2.RENDER_STATE_CANCELLED, _failure("CANCELLED", message, False))
        return renderer_pb2.CancelRenderResponse(render=render.snapshot())

    async def _find(self, task_id: str) -> _Render:
        """The render with this task id, re-attached from the provider when this process never saw it."""
        if not task_id:
            raise InvalidArgument([("task_id", "must not be empty")])
        render = self._by_task.get(task_id)
        if render is not None:
            return render
        try:
            task = await self._call(None, lambda: self._provider.get(task_id), idempotent=True, what="get")
        except ProviderError as error:
            if error.kind in (ErrorKind.NOT_FOUND, ErrorKind.REFUSED):
                raise NotFound(f"{self._provider.name} has no task {task_id}") from error
            raise Unavailable(f"{self._provider.name} could not be asked about {task_id}: {error}") from error
        # The shot is unknown after a restart: QC then checks the output against what it is.
        render = _Render("", render_pb2.Shot(), "", self._provider.backend)
        render.status.handle.task_id = task_id
        render.created.set()
        self._by_task.setdefault(task_id, render)
        render = self._by_task[task_id]
        self._log.info("render re-attached", task_id=task_id)
        await self._apply(render, task)
        return render

    # Polling ------------------------------------------------------------------------------------

    def _schedule(self, render: _Render, delay: float) -> None:
        render.next_poll = time.monotonic() + delay
        self._wake_poller.set()

    async def _poll_forever(self) -> None:
        """The renderer's one poll loop: polls each due task, then sleeps until the next one is due."""
        while True:
            self._wake_poller.clear()
            now = time.monotonic()
            waiting = [r for r in self._by_task.values() if not r.ended and r.next_poll > 0]
            for render in waiting:
                if render.next_poll <= now and self._breaker.allows_requests:
                    render.next_poll = 0  # in flight; set again when the poll ends
                    poll = asyncio.create_task(self._poll(render))
                    self._polls.add(poll)
                    poll.add_done_callback(self._polls.discard)
            upcoming = [r.next_poll for r in waiting if r.next_poll > 0]
            timeout = max(min(upcoming) - now, 0.01) if upcoming else None
            if not self._breaker.allows_requests and upcoming:
                timeout = max(self._breaker.seconds_until_probe(), 0.1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake_poller.wait()

    async def _poll(self, render: _Render) -> None:
        try:
            task = await self._call(
                render, lambda: self._provider.get(render.task_id), idempotent=True, what="get"
            )
        except ProviderError as error:
            self._record_outcome(error)
            await self._publish_health()
            if error.kind == ErrorKind.NOT_FOUND:
                self._release(render)
                render.end(renderer_pb2.RENDER_STATE_FAILED, _failure("RENDER_LOST", str(error), True))
                return
            self._log.warning("poll failed", task_id=render.task_id, error=str(error))
            self._schedule(render, self._settings.poll_seconds)
            return
        self._record_outcome(None)
        await self._apply(render, task)
        if not render.ended:
            self._schedule(render, self._settings.poll_seconds)

    async def _apply(self, render: _Render, task: ProviderTask) -> None:
        if render.ended:
            return  # cancelled meanwhile
        if task.state in _STATES:
            if render.status.state != _STATES[task.state] or render.status.progress != task.progress:
                render.status.state = _STATES[task.state]
                render.status.progress = task.progress
                render.changed()
            if render.next_poll == 0 and render.task_id in self._by_task:
                self._schedule(render, self._settings.poll_seconds)
            return
        self._release(render)
        if task.state == TaskState.SUCCEEDED:
            await self._finish(render, task)
        elif task.state == TaskState.CANCELLED:
            render.end(
                renderer_pb2.RENDER_STATE_CANCELLED, _failure("CANCELLED", "cancelled at the provider", False)
            )
        else:
            render.end(renderer_pb2.RENDER_STATE_FAILED, failure_of(task))

    async def _finish(self, render: _Render, task: ProviderTask) -> None:
        """Copies the output to durable storage, checks it, and only then reports success."""
        if not task.outputs:
            render.end(
                renderer_pb2.RENDER_STATE_FAILED,
                _failure("PROVIDER_NO_OUTPUT", "no video in the result", True),
            )
            return
        self._work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self._work_dir) as scratch:
            local = Path(scratch) / "output.mp4"
            try:
                await self._call(
                    render,
                    lambda: self._provider.download(task.outputs[0], local),
                    idempotent=True,
                    what="download",
                    timeout=self._settings.download_timeout_seconds,
                )
            except ProviderError as error:
                self._log.warning("output not copied", task_id=render.task_id, error=str(error))
                render.end(renderer_pb2.RENDER_STATE_FAILED, _failure("OUTPUT_LOST", str(error), False))
                return
            try:
                facts = await asyncio.to_thread(qc.probe, local)
            except qc.DecodeError as error:
                render.end(
                    renderer_pb2.RENDER_STATE_FAILED,
                    _failure("OUTPUT_UNDECODABLE", f"the output: {error}", True),
                )
                return
            stored = await self._store.put(local)
        report = self._check(facts, render.shot)
        video = render_pb2.VideoArtifact(
            uri=stored.uri,
            sha256=stored.sha256,
            size_bytes=stored.size_bytes,
            mime_type="video/mp4",
            duration_seconds=facts.duration_seconds,
            width=facts.width,
            height=facts.height,
            frame_rate=facts.frame_rate,
            frame_count=facts.frame_count,
        )
        render.status.progress = 1.0
        render.status.output.CopyFrom(
            render_pb2.RenderOutput(
                backend=self._provider.backend,
                video=video,
                qc=report,
                cost=usd(self._provider.cost_micros(_priced_shot(render.shot, facts), task)),
            )
        )
        render.end(renderer_pb2.RENDER_STATE_SUCCEEDED)
        self._log.info("render stored", task_id=render.task_id, uri=stored.uri, qc=round(report.score, 3))

    def _check(self, facts: qc.Probe, shot: render_pb2.Shot) -> render_pb2.QcReport:
        if not shot.duration_seconds:
            # Re-attached after a restart: the request is unknown here, so the output is checked for
            # black and frozen frames against its own duration and size.
            width, height, duration = facts.width, facts.height, facts.duration_seconds
        else:
            (width, height), duration = self._provider.frame_size(shot), shot.duration_seconds
        # Providers deliver standard sizes of the asked ratio (1080p for 720p is no fault).
        return qc.report(
            facts,
            duration_seconds=duration,
            width=width,
            height=height,
            frame_rate=self._provider.frame_rate,
            exact_size=False,
        )

    def _release(self, render: _Render) -> None:
        if render.holds_slot:
            render.holds_slot = False
            self._limits.task_slots.release()
