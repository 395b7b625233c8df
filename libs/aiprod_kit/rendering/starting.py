"""Starting a render once per idempotency key, and finding it again by key or by task id.

- One render per key, across restarts and replicas. The key's intent is recorded in the key store
  (shared by every replica of the backend) before the create is sent, the task id right after; a
  repeated StartRender re-attaches to that task. A key whose create may have reached the provider
  without its task id being recorded is never sent again: it reads PROVIDER_UNCERTAIN. The kit resends
  only what the provider certainly did not act on, and the adapters turn their clients' own retries of
  POST off.
- A StartRender whose caller goes away: before the create is sent, its slot and key are freed; once
  sent, the create runs on without the caller, so that its task id is recorded.
- A task id this process never saw is re-attached from the key store (as it ended, or to be followed)
  or, failing that, from the provider.
"""

import asyncio
import time

import structlog

from aiprod.common.v1 import render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.errors import (
    ErrorReason,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from aiprod_kit.failures import Reason, failure
from aiprod_kit.rendering.background import Background
from aiprod_kit.rendering.calls import ProviderCalls
from aiprod_kit.rendering.health import ProviderHealth
from aiprod_kit.rendering.keys import KEY_PATTERN, KEY_RULE, KeyRecord
from aiprod_kit.rendering.outcomes import CREATE_FAILURES
from aiprod_kit.rendering.polling import Poller
from aiprod_kit.rendering.provider import ErrorKind, Provider, ProviderError
from aiprod_kit.rendering.record import ProviderRender
from aiprod_kit.rendering.registry import RenderRegistry
from aiprod_kit.settings import ProviderSettings

log = structlog.get_logger()

# How long after a claimant's create deadline another replica still waits for its task id: the
# claimant's own clock and its last write.
_DEADLINE_SLACK_SECONDS = 5.0
# How often a replica waiting on another's create looks at the key store again.
_KEY_POLL_SECONDS = 0.2


class RenderStarter:
    def __init__(
        self,
        provider: Provider,
        settings: ProviderSettings,
        calls: ProviderCalls,
        health: ProviderHealth,
        registry: RenderRegistry[ProviderRender],
        poller: Poller,
        background: Background,
    ) -> None:
        self._provider = provider
        self._settings = settings
        self._calls = calls
        self._health = health
        self._registry = registry
        self._poller = poller
        self._background = background
        self._log = log.bind(backend=provider.name)

    async def start(self, key: str, shot: render_pb2.Shot, model: str) -> ProviderRender:
        """The render under key: the one already started (here, in the key store, or at another replica),
        else a new one whose create is sent."""
        while True:
            render = self._registry.by_key(key)
            if render is not None:
                await render.created.wait()
                if render.abandoned:
                    continue  # its caller went away before anything was sent: this call starts it
                return render
            record = await self._registry.read(key)
            if self._registry.by_key(key) is not None:
                continue  # another call got here while the store was read
            render = ProviderRender(key, shot, model, self._provider.backend)
            self._registry.add(render)
            break
        try:
            if record is not None:
                return await self._resume(render, record)
            if not self._health.serving:
                # Nothing was sent: the caller may try elsewhere, or here again later under the same key.
                raise Unavailable(self._health.not_serving_reason())
            await self._take_slot(render)
        except BaseException:
            self._abandon(render)
            raise
        # From here the create runs on if the caller goes away: its task id must be recorded and its
        # slot freed when the render ends.
        return await asyncio.shield(self._background.spawn(self._create(render)))

    async def by_key(self, key: str) -> ProviderRender:
        """The render started under a key, as StartRender would answer it, without ever creating one:
        NOT_FOUND when no create was ever claimed under the key here (nothing reached the provider)."""
        if not KEY_PATTERN.fullmatch(key):
            raise InvalidArgument([("idempotency_key", KEY_RULE)])
        while True:
            render = self._registry.by_key(key)
            if render is not None:
                await render.created.wait()
                if not render.abandoned:
                    return render
            record = await self._registry.read(key)
            if record is None:
                raise NotFound(f"no render was started under key {key} at {self._provider.name}")
            if self._registry.by_key(key) is not None:
                continue  # another call got here while the store was read
            render = ProviderRender(key, record.shot, record.model, self._provider.backend)
            self._registry.add(render)
            try:
                return await self._resume(render, record)
            except BaseException:
                self._abandon(render)
                raise

    async def by_task(self, task_id: str) -> ProviderRender:
        """The render with this task id, re-attached from the key store or the provider when this
        process never saw it."""
        render = self._registry.known(task_id)
        if render is not None:
            return render
        record = await self._registry.read_by_task(task_id)
        if record is not None and record.ended is not None:
            render = ProviderRender(record.idempotency_key, record.shot, record.model, self._provider.backend)
            render.restore(record.ended)
            render.created.set()
            render = self._registry.adopt_task(render)
            self._registry.forget_later(render)
            return render
        try:
            task = await self._calls.call(
                None, lambda: self._provider.get(task_id), idempotent=True, what="get"
            )
        except ProviderError as error:
            if error.kind in (ErrorKind.NOT_FOUND, ErrorKind.REFUSED):
                raise NotFound(f"{self._provider.name} has no task {task_id}") from error
            raise Unavailable(f"{self._provider.name} could not be asked about {task_id}: {error}") from error
        # Without a key record the shot is unknown (a task from before the key store): QC then checks
        # the output against what it is.
        render = ProviderRender("", render_pb2.Shot(), "", self._provider.backend)
        if record is not None:
            render.adopt(record)
        render.status.handle.task_id = task_id
        render.created.set()
        render = self._registry.adopt_task(render)
        if render.key and self._registry.by_key(render.key) is None:
            self._registry.name_key(render.key, render)
        self._log.info("render re-attached", task_id=task_id)
        # Shielded: finishing an output must not stop halfway because this caller went away.
        await asyncio.shield(self._background.spawn(self._poller.settle(render, task)))
        return render

    def _abandon(self, render: ProviderRender) -> None:
        """Frees a key whose create was never sent (its caller went away, or it could not start)."""
        if render.created.is_set():
            return
        render.release_slot()
        render.abandoned = True
        self._registry.forget_key(render)
        render.created.set()

    async def _take_slot(self, render: ProviderRender) -> None:
        slots = self._calls.limits.task_slots
        try:
            async with asyncio.timeout(self._settings.slot_wait_seconds):
                await slots.acquire()
        except TimeoutError:
            raise ResourceExhausted(
                f"the {self._provider.name} renderer is at its limit of "
                f"{self._settings.max_concurrent_tasks} concurrent tasks",
                reason=ErrorReason.AT_CAPACITY,
            ) from None
        render.slot = slots

    async def _create(self, render: ProviderRender) -> ProviderRender:
        """Claims the key, sends the create and records its task id; returns the render that answers
        (another replica's, when it claimed the key first)."""
        key = render.key
        assert self._registry.keys is not None
        try:
            won, record = await self._registry.keys.claim(key, render.model, render.shot)
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
            render.release_slot()
            try:
                return await self._resume(render, record)
            except BaseException:
                self._abandon(render)  # this process sent nothing: the next call tries again
                raise
        deadline = record.claimed + self._settings.create_deadline_seconds
        try:
            # Its retries of what the provider did not act on, and its waits for a request slot, within
            # the deadline: a create still waiting for a slot then was never sent (nothing to pay).
            task_id = await self._calls.call(
                render,
                lambda: self._provider.create(render.shot, render.model, key),
                idempotent=False,
                what="create",
                within=max(deadline - time.time(), 0.001),
            )
        except ProviderError as error:
            self._health.record_outcome(error)
            reason, retryable = CREATE_FAILURES[error.kind]
            self._log.warning("create failed", idempotency_key=key, error=str(error))
            # Refused for sure: nothing was created, nothing is billed. Uncertain: no charge is known.
            charge = None if error.kind == ErrorKind.AMBIGUOUS else 0
            render.created.set()
            await self._registry.end(
                render,
                renderer_pb2.RENDER_STATE_FAILED,
                failure(reason, str(error), retryable, error.provider_code),
                charge,
            )
            await self._health.publish()
            return render
        self._health.record_outcome(None)
        await self._registry.record_task(render, task_id)
        render.created.set()
        self._log.info("render started", idempotency_key=key, task_id=task_id)
        self._poller.schedule(render)
        return render

    async def _resume(self, render: ProviderRender, record: KeyRecord) -> ProviderRender:
        """Answers a key the store knows: as it ended, by re-attaching to its task, or uncertain."""
        render.adopt(record)
        if record.ended is None and not record.task_id:
            record = await self._await_task_id(record)
        if record.ended is not None:
            render.restore(record.ended)
            if render.task_id:
                render = self._registry.adopt_task(render)
            render.created.set()
            self._registry.forget_later(render)
            return render
        if not record.task_id:
            render.created.set()
            await self._registry.end(
                render,
                renderer_pb2.RENDER_STATE_FAILED,
                failure(
                    Reason.PROVIDER_UNCERTAIN,
                    "an earlier create under this key may have reached the provider; it is not sent again",
                    False,
                ),
                None,
            )
            return render
        existing = self._registry.by_task(record.task_id)
        if existing is not None:
            # Already followed here (a GetRender re-attached it): answer that one, and send waiters to it.
            render.abandoned = True
            self._registry.name_key(render.key, existing)
            render.created.set()
            return existing
        render.status.handle.task_id = record.task_id
        self._registry.name_task(render)
        render.created.set()
        self._log.info("render re-attached by key", idempotency_key=render.key, task_id=record.task_id)
        # Shielded: a caller going away must not leave the render neither followed nor ended.
        await asyncio.shield(self._background.spawn(self._poller.attach(render)))
        return render

    async def _await_task_id(self, record: KeyRecord) -> KeyRecord:
        """Waits while another process may still be creating the key's task (until its create deadline)."""
        give_up = record.claimed + self._settings.create_deadline_seconds + _DEADLINE_SLACK_SECONDS
        while record.ended is None and not record.task_id and time.time() < give_up:
            await asyncio.sleep(_KEY_POLL_SECONDS)
            record = await self._registry.read(record.idempotency_key) or record
        return record
