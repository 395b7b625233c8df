"""RendererService for any provider: the kit's half of every provider renderer.

- Idempotency: one render per idempotency key, across restarts and replicas. The key's intent is
  recorded in the key store (shared by every replica of the backend) before the create is sent, the
  task id right after; a repeated StartRender re-attaches to that task. A key whose create may have
  reached the provider without its task id being recorded is never sent again: it reads
  PROVIDER_UNCERTAIN. The kit resends only what the provider certainly did not act on, and the
  adapters turn their clients' own retries of POST off.
- A StartRender whose caller goes away: before the create is sent, its slot and key are freed; once
  sent, the create runs on without the caller, so that its task id is recorded.
- One poll loop per renderer (not one per caller), each task polled no more often than poll_seconds.
- Limits, Retry-After and backoff (ProviderLimits); a circuit breaker whose state, with the
  credentials, drives the service's own health (NOT_SERVING while open; one half-open probe closes it).
- On success the output is copied to durable storage before success is reported, then checked (QC);
  the copy retries rate limits and transient errors within the download timeout.
- Every terminal render carries what the provider bills for it (the adapter's `charge_micros`), except
  an uncertain create; the ending is recorded in the key store, so that it is answered the same after
  the provider has forgotten the task. Whatever fails in the background ends its render FAILED with a
  reason; nothing stays RUNNING for ever.
"""

import asyncio
import contextlib
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import structlog
from opentelemetry import context as otel_context

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.breaker import BreakerState, CircuitBreaker
from aiprod_kit.capabilities import shot_mismatches
from aiprod_kit.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from aiprod_kit.money import usd
from aiprod_kit.rendering import qc
from aiprod_kit.rendering.keys import KeyRecord, RenderKeyStore
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
# How long after a claimant's create deadline another replica still waits for its task id: the
# claimant's own clock and its last write.
_DEADLINE_SLACK_SECONDS = 5.0
# How often a replica waiting on another's create looks at the key store again.
_KEY_POLL_SECONDS = 0.2
# Writes of a task id or an ending to the key store: tries, and the first pause between them.
_STORE_TRIES = 5
_STORE_BACKOFF_SECONDS = 0.2


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


class _Render:
    """One render at this renderer: its status and the event its watchers wait on."""

    def __init__(self, key: str, shot: render_pb2.Shot, model: str, backend: int) -> None:
        self.shot = shot
        self.model = model
        self.next_poll = 0.0
        self.holds_slot = False
        # Set once StartRender's answer is known; abandoned: its caller went away before anything was
        # sent, so a later call under the key starts afresh.
        self.created = asyncio.Event()
        self.abandoned = False
        # Its end is being recorded: known to this process, not announced yet.
        self.concluding = False
        # The task as last seen at the provider, and the output's length once probed: for the charge.
        self.last_task: ProviderTask | None = None
        self.output_seconds = 0.0
        self._changed = asyncio.Event()
        # The trace of the call that made this render (StartRender, or a watch after a restart): its
        # polls and download join it.
        self.trace_context = otel_context.get_current()
        self.status = renderer_pb2.Render(
            handle=backend_pb2.RenderHandle(backend=backend, idempotency_key=key),
            state=renderer_pb2.RENDER_STATE_PENDING,
            model=model,
        )
        self.status.create_time.GetCurrentTime()
        self.status.update_time.CopyFrom(self.status.create_time)

    @property
    def key(self) -> str:
        return self.status.handle.idempotency_key

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

    def adopt(self, record: KeyRecord) -> None:
        """Takes the request as the key store kept it (after a restart, or from another replica)."""
        self.shot = record.shot
        self.model = record.model
        self.status.model = record.model
        self.status.handle.idempotency_key = record.idempotency_key

    def restore(self, ended: renderer_pb2.Render) -> None:
        """Takes the ending the key store kept."""
        self.status.CopyFrom(ended)
        self.changed()


class ProviderRendererService(renderer_pb2_grpc.RendererServiceServicer):
    def __init__(
        self,
        provider: Provider,
        settings: ProviderSettings,
        store: VideoStore,
        health: HealthSignal,
        work_dir: Path,
        keys: RenderKeyStore,
    ) -> None:
        self._provider = provider
        self._settings = settings
        self._store = store
        self._health = health
        self._work_dir = work_dir
        self._keys = keys
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
        # Polls, creates and other work that outlives the call that started it.
        self._background: set[asyncio.Task[Any]] = set()
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
            # Half-open: the probe is the one trial request.
            if self._breaker.allow_request():
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
        within: float | None = None,
    ) -> T:
        """One provider call under the limits, measured, in the trace of the render it serves."""
        with self._calls.call(what, render.trace_context if render else None):
            return await self._limits.call(
                operation, idempotent=idempotent, what=what, timeout=timeout, within=within
            )

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
        for task in [*self._loops, *self._background]:
            task.cancel()
        for task in [*self._loops, *self._background]:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # RPCs ---------------------------------------------------------------------------------------

    async def GetCapabilities(
        self, request: renderer_pb2.GetCapabilitiesRequest, context: grpc.aio.ServicerContext
    ) -> renderer_pb2.GetCapabilitiesResponse:
        return renderer_pb2.GetCapabilitiesResponse(capabilities=self._provider.capabilities())

    def _violations(self, request: renderer_pb2.StartRenderRequest, model: str) -> list[tuple[str, str]]:
        capabilities = self._provider.capabilities()
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
        return violations

    async def StartRender(
        self, request: renderer_pb2.StartRenderRequest, context: grpc.aio.ServicerContext
    ) -> renderer_pb2.StartRenderResponse:
        model = request.model or self._provider.capabilities().models[0]
        if violations := self._violations(request, model):
            raise InvalidArgument(violations)
        key = request.idempotency_key
        while True:
            render = self._by_key.get(key)
            if render is not None:
                await render.created.wait()
                if render.abandoned:
                    continue  # its caller went away before anything was sent: this call starts it
                return renderer_pb2.StartRenderResponse(render=render.snapshot())
            record = await self._read_key(key)
            if key in self._by_key:
                continue  # another call got here while the store was read
            render = _Render(key, request.shot, model, self._provider.backend)
            self._by_key[key] = render
            break
        try:
            if record is not None:
                answer = await self._resume(render, record)
            else:
                if not self.serving:
                    # Nothing was sent: the caller may try elsewhere, or here again later under the same key.
                    raise Unavailable(self._not_serving_reason())
                await self._take_slot(render)
        except BaseException:
            self._abandon(render)
            raise
        if record is None:
            # From here the create runs on if the caller goes away: its task id must be recorded and its
            # slot freed when the render ends.
            answer = await asyncio.shield(self._spawn(self._create(render)))
        return renderer_pb2.StartRenderResponse(render=answer.snapshot())

    def _not_serving_reason(self) -> str:
        if self._missing:
            return f"the {self._provider.name} renderer has no credentials: set {', '.join(self._missing)}"
        return f"the {self._provider.name} renderer is not serving: its circuit breaker is {self._breaker.state.value}"

    def _abandon(self, render: _Render) -> None:
        """Frees a key whose create was never sent (its caller went away, or it could not start)."""
        if render.created.is_set():
            return
        self._release(render)
        render.abandoned = True
        if self._by_key.get(render.key) is render:
            del self._by_key[render.key]
        render.created.set()

    async def _read_key(self, key: str) -> KeyRecord | None:
        try:
            return await self._keys.get(key)
        except ServiceError:
            raise
        except Exception as error:
            self._log.exception("render key store unreadable", idempotency_key=key)
            raise Unavailable(f"the render key store cannot be read now: {type(error).__name__}") from error

    async def _take_slot(self, render: _Render) -> None:
        try:
            async with asyncio.timeout(self._settings.slot_wait_seconds):
                await self._limits.task_slots.acquire()
        except TimeoutError:
            raise ResourceExhausted(
                f"the {self._provider.name} renderer is at its limit of "
                f"{self._settings.max_concurrent_tasks} concurrent tasks"
            ) from None
        render.holds_slot = True

    async def _create(self, render: _Render) -> _Render:
        """Claims the key, sends the create and records its task id; returns the render that answers
        (another replica's, when it claimed the key first)."""
        key = render.key
        try:
            won, record = await self._keys.claim(key, render.model, render.shot)
        except BaseException as error:
            # Nothing was sent: the key and the slot are free again.
            self._abandon(render)
            if isinstance(error, ServiceError) or not isinstance(error, Exception):
                raise
            self._log.exception("render key store unwritable", idempotency_key=key)
            raise Unavailable(
                f"the render key store cannot be written now: {type(error).__name__}"
            ) from error
        if not won:
            self._release(render)
            try:
                return await self._resume(render, record)
            except BaseException:
                self._abandon(render)  # this process sent nothing: the next call tries again
                raise
        deadline = record.claimed + self._settings.create_deadline_seconds
        try:
            async with asyncio.timeout(max(deadline - time.time(), 0.0)):
                task_id = await self._call(
                    render,
                    lambda: self._provider.create(render.shot, render.model, key),
                    idempotent=False,
                    what="create",
                )
        except (ProviderError, TimeoutError) as caught:
            error = (
                caught
                if isinstance(caught, ProviderError)
                else ProviderError(
                    ErrorKind.AMBIGUOUS,
                    f"the create got no answer within {self._settings.create_deadline_seconds:g} s",
                )
            )
            self._record_outcome(error)
            reason, retryable = _CREATE_FAILURES[error.kind]
            self._log.warning("create failed", idempotency_key=key, error=str(error))
            # Refused for sure: nothing was created, nothing is billed. Uncertain: no charge is known.
            charge = None if error.kind == ErrorKind.AMBIGUOUS else 0
            render.created.set()
            await self._conclude(
                render,
                renderer_pb2.RENDER_STATE_FAILED,
                _failure(reason, str(error), retryable, error.provider_code),
                charge,
            )
            await self._publish_health()
            return render
        self._record_outcome(None)
        render.status.handle.task_id = task_id
        self._by_task[task_id] = render
        await self._durably("record task id", key, lambda: self._keys.record_task(key, task_id))
        render.created.set()
        self._log.info("render started", idempotency_key=key, task_id=task_id)
        self._schedule(render, delay=self._settings.poll_seconds)
        return render

    async def _durably(self, what: str, key: str, write: Callable[[], Awaitable[None]]) -> bool:
        """A key store write, tried again over a short outage; False (logged) when it could not be made:
        the render goes on, only its answer after a restart or on another replica suffers."""
        pause = _STORE_BACKOFF_SECONDS
        for attempt in range(_STORE_TRIES):
            try:
                await write()
                return True
            except Exception:
                if attempt == _STORE_TRIES - 1:
                    self._log.exception(f"render key store: could not {what}", idempotency_key=key)
                    return False
                await asyncio.sleep(pause)
                pause *= 2
        return False

    async def _resume(self, render: _Render, record: KeyRecord) -> _Render:
        """Answers a key the store knows: as it ended, by re-attaching to its task, or uncertain."""
        render.adopt(record)
        if record.ended is None and not record.task_id:
            record = await self._await_task_id(record)
        if record.ended is not None:
            render.restore(record.ended)
            if render.task_id:
                render = self._by_task.setdefault(render.task_id, render)
            render.created.set()
            return render
        if not record.task_id:
            render.created.set()
            await self._conclude(
                render,
                renderer_pb2.RENDER_STATE_FAILED,
                _failure(
                    "PROVIDER_UNCERTAIN",
                    "an earlier create under this key may have reached the provider; it is not sent again",
                    False,
                ),
                None,
            )
            return render
        existing = self._by_task.get(record.task_id)
        if existing is not None:
            # Already followed here (a GetRender re-attached it): answer that one, and send waiters to it.
            render.abandoned = True
            self._by_key[render.key] = existing
            render.created.set()
            return existing
        render.status.handle.task_id = record.task_id
        self._by_task[record.task_id] = render
        render.created.set()
        self._log.info("render re-attached by key", idempotency_key=render.key, task_id=record.task_id)
        # Shielded: a caller going away must not leave the render neither followed nor ended.
        await asyncio.shield(self._spawn(self._attach(render)))
        return render

    async def _await_task_id(self, record: KeyRecord) -> KeyRecord:
        """Waits while another process may still be creating the key's task (until its create deadline)."""
        give_up = record.claimed + self._settings.create_deadline_seconds + _DEADLINE_SLACK_SECONDS
        while record.ended is None and not record.task_id and time.time() < give_up:
            await asyncio.sleep(_KEY_POLL_SECONDS)
            record = await self._read_key(record.idempotency_key) or record
        return record

    async def _attach(self, render: _Render) -> None:
        """Reads a task this process did not create; if the provider cannot be asked now, the poll
        loop asks later."""
        try:
            task = await self._call(
                render, lambda: self._provider.get(render.task_id), idempotent=True, what="get"
            )
        except ProviderError as error:
            if error.kind == ErrorKind.NOT_FOUND:
                await self._lost(render, error)
            else:
                self._schedule(render, self._settings.poll_seconds)
            return
        await self._settle(render, task)

    async def GetRender(
        self, request: renderer_pb2.GetRenderRequest, context: grpc.aio.ServicerContext
    ) -> renderer_pb2.GetRenderResponse:
        if request.idempotency_key and not request.task_id:
            return renderer_pb2.GetRenderResponse(
                render=(await self._find_by_key(request.idempotency_key)).snapshot()
            )
        return renderer_pb2.GetRenderResponse(render=(await self._find(request.task_id)).snapshot())

    async def _find_by_key(self, key: str) -> _Render:
        """The render started under a key, as StartRender would answer it, without ever creating one:
        NOT_FOUND when no create was ever claimed under the key here (nothing reached the provider)."""
        if not _KEY.fullmatch(key):
            raise InvalidArgument(
                [("idempotency_key", "must be 1 to 128 characters from A-Z, a-z, 0-9 and . _ : -")]
            )
        while True:
            render = self._by_key.get(key)
            if render is not None:
                await render.created.wait()
                if not render.abandoned:
                    return render
            record = await self._read_key(key)
            if record is None:
                raise NotFound(f"no render was started under key {key} at {self._provider.name}")
            if key in self._by_key:
                continue  # another call got here while the store was read
            render = _Render(key, record.shot, record.model, self._provider.backend)
            self._by_key[key] = render
            try:
                return await self._resume(render, record)
            except BaseException:
                self._abandon(render)
                raise

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
        # What the provider bills for a cancelled task, whatever it was doing.
        charge = self._charge(render, render.last_task, cancelled=True)
        await self._conclude(
            render, renderer_pb2.RENDER_STATE_CANCELLED, _failure("CANCELLED", message, False), charge
        )
        return renderer_pb2.CancelRenderResponse(render=render.snapshot())

    async def _find(self, task_id: str) -> _Render:
        """The render with this task id, re-attached from the key store or the provider when this
        process never saw it."""
        if not task_id:
            raise InvalidArgument([("task_id", "must not be empty")])
        render = self._by_task.get(task_id)
        if render is not None:
            return render
        try:
            record = await self._keys.by_task(task_id)
        except Exception:
            # The provider can still say where the task is; only its request stays unknown.
            self._log.exception("render key store unreadable", task_id=task_id)
            record = None
        if record is not None and record.ended is not None:
            render = _Render(record.idempotency_key, record.shot, record.model, self._provider.backend)
            render.restore(record.ended)
            render.created.set()
            return self._by_task.setdefault(task_id, render)
        try:
            task = await self._call(None, lambda: self._provider.get(task_id), idempotent=True, what="get")
        except ProviderError as error:
            if error.kind in (ErrorKind.NOT_FOUND, ErrorKind.REFUSED):
                raise NotFound(f"{self._provider.name} has no task {task_id}") from error
            raise Unavailable(f"{self._provider.name} could not be asked about {task_id}: {error}") from error
        # Without a key record the shot is unknown (a task from before the key store): QC then checks
        # the output against what it is.
        render = _Render("", render_pb2.Shot(), "", self._provider.backend)
        if record is not None:
            render.adopt(record)
        render.status.handle.task_id = task_id
        render.created.set()
        self._by_task.setdefault(task_id, render)
        render = self._by_task[task_id]
        if render.key and render.key not in self._by_key:
            self._by_key[render.key] = render
        self._log.info("render re-attached", task_id=task_id)
        # Shielded: finishing an output must not stop halfway because this caller went away.
        await asyncio.shield(self._spawn(self._settle(render, task)))
        return render

    # Endings ------------------------------------------------------------------------------------

    def _charge(self, render: _Render, task: ProviderTask | None, *, cancelled: bool = False) -> int:
        """The provider's bill for the render's task by the adapter's rules; task None: not known to
        have ended (lost, or given up on), which the rules price at the worst case."""
        shot = render.shot
        if not shot.duration_seconds:
            # Re-attached without its request: the output's length stands in.
            shot = render_pb2.Shot(duration_seconds=render.output_seconds)
        if task is not None and task.state in _STATES and not cancelled:
            task = None
        return self._provider.charge_micros(shot, task, cancelled=cancelled)

    async def _conclude(
        self,
        render: _Render,
        state: int,
        failure: render_pb2.RenderFailure | None = None,
        charge_micros: int | None = None,
    ) -> None:
        """Ends the render (once): its state, failure and charge, kept in the key store, then announced:
        a caller told of the end finds it answered the same after a restart."""
        if render.ended or render.concluding:
            return
        render.concluding = True
        self._release(render)
        ended = render.snapshot()
        ended.state = state
        if failure is not None:
            ended.failure.CopyFrom(failure)
        if charge_micros is not None:
            ended.charge.CopyFrom(usd(charge_micros))
        ended.update_time.GetCurrentTime()
        if render.key:
            await self._durably(
                "record the ending", render.key, lambda: self._keys.record_end(render.key, ended)
            )
        render.status.CopyFrom(ended)
        render.changed()
        self._log.info(
            "render ended",
            idempotency_key=render.key,
            task_id=render.task_id,
            state=renderer_pb2.RenderState.Name(state),
            reason=failure.reason if failure else "",
            charge_micros=charge_micros,
        )

    async def _lost(self, render: _Render, error: ProviderError) -> None:
        await self._conclude(
            render,
            renderer_pb2.RENDER_STATE_FAILED,
            _failure("RENDER_LOST", str(error), True),
            self._charge(render, None),
        )

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
                    self._spawn(self._poll(render))
            upcoming = [r.next_poll for r in waiting if r.next_poll > 0]
            timeout = max(min(upcoming) - now, 0.01) if upcoming else None
            if not self._breaker.allows_requests and upcoming:
                timeout = max(self._breaker.seconds_until_probe(), 0.1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake_poller.wait()

    async def _poll(self, render: _Render) -> None:
        try:
            await self._poll_once(render)
        except Exception as error:
            await self._failed_here(render, error)

    async def _settle(self, render: _Render, task: ProviderTask) -> None:
        """Applies what the provider said of the task; whatever goes wrong in doing so ends the render
        with a reason rather than leaving it RUNNING for ever."""
        try:
            await self._apply(render, task)
        except Exception as error:
            await self._failed_here(render, error)

    async def _failed_here(self, render: _Render, error: Exception) -> None:
        self._log.exception("render failed in the renderer", task_id=render.task_id, exc_info=error)
        await self._conclude(
            render,
            renderer_pb2.RENDER_STATE_FAILED,
            _failure("RENDERER_INTERNAL", f"the renderer failed: {type(error).__name__}", True),
            self._charge(render, render.last_task),
        )

    async def _poll_once(self, render: _Render) -> None:
        try:
            task = await self._call(
                render, lambda: self._provider.get(render.task_id), idempotent=True, what="get"
            )
        except ProviderError as error:
            self._record_outcome(error)
            await self._publish_health()
            if error.kind == ErrorKind.NOT_FOUND:
                await self._lost(render, error)
                return
            self._log.warning("poll failed", task_id=render.task_id, error=str(error))
            self._schedule(render, self._settings.poll_seconds)
            return
        self._record_outcome(None)
        await self._settle(render, task)
        if not render.ended and render.next_poll == 0:
            self._schedule(render, self._settings.poll_seconds)

    async def _apply(self, render: _Render, task: ProviderTask) -> None:
        if render.ended:
            return  # cancelled meanwhile
        render.last_task = task
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
            await self._conclude(
                render,
                renderer_pb2.RENDER_STATE_CANCELLED,
                _failure("CANCELLED", "cancelled at the provider", False),
                self._charge(render, task),
            )
        else:
            await self._conclude(
                render, renderer_pb2.RENDER_STATE_FAILED, failure_of(task), self._charge(render, task)
            )

    async def _finish(self, render: _Render, task: ProviderTask) -> None:
        """Copies the output to durable storage, checks it, and only then reports success. The provider
        billed the task whatever becomes of its output, so every ending here carries its charge."""

        async def fail(reason: str, message: str, retryable: bool) -> None:
            await self._conclude(
                render,
                renderer_pb2.RENDER_STATE_FAILED,
                _failure(reason, message, retryable),
                self._charge(render, task),
            )

        if not task.outputs:
            await fail("PROVIDER_NO_OUTPUT", "no video in the result", True)
            return
        self._work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self._work_dir) as scratch:
            local = Path(scratch) / "output.mp4"
            try:
                # Rate limits and transient errors are waited out for as long as the download may take.
                await self._call(
                    render,
                    lambda: self._provider.download(task.outputs[0], local),
                    idempotent=True,
                    what="download",
                    timeout=self._settings.download_timeout_seconds,
                    within=self._settings.download_timeout_seconds,
                )
            except ProviderError as error:
                self._log.warning("output not copied", task_id=render.task_id, error=str(error))
                await fail("OUTPUT_LOST", str(error), False)
                return
            try:
                facts = await asyncio.to_thread(qc.probe, local)
            except qc.DecodeError as error:
                await fail("OUTPUT_UNDECODABLE", f"the output: {error}", True)
                return
            render.output_seconds = facts.duration_seconds
            try:
                stored = await self._store.put(local)
            except Exception as error:
                self._log.exception("output not stored", task_id=render.task_id)
                await fail("OUTPUT_STORE_FAILED", f"the output could not be stored: {error}", True)
                return
        try:
            report = self._check(facts, render.shot)
        except Exception as error:
            self._log.exception("output not checked", task_id=render.task_id)
            await fail(
                "OUTPUT_CHECK_FAILED", f"the output could not be checked: {type(error).__name__}", True
            )
            return
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
        charge = self._charge(render, task)
        render.status.progress = 1.0
        render.status.output.CopyFrom(
            render_pb2.RenderOutput(backend=self._provider.backend, video=video, qc=report, cost=usd(charge))
        )
        self._log.info("render stored", task_id=render.task_id, uri=stored.uri, qc=round(report.score, 3))
        await self._conclude(render, renderer_pb2.RENDER_STATE_SUCCEEDED, None, charge)

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
