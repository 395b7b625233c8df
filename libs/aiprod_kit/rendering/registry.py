"""The renders this process knows, by idempotency key and by task id, and their record in the key store.

Invariants: a key and a task id each name at most one render here. A render ends once (`end`): its
slot is freed, its ending (state, failure, charge) is kept in the key store before it is announced, so
that a caller told of the end finds it answered the same after a restart or on another replica. Key
store writes are retried over a short outage; one that cannot be made is logged, and the render goes
on (only its answer after a restart suffers). An ended render whose ending the key store keeps is
forgotten here a minute later (the key store answers for it, by key and by task id, as it does after a
restart): a renderer's memory holds the renders going on, not every render it ever made. Without a key
store (the local renderer) renders live in memory only.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import structlog

from aiprod.common.v1 import render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.errors import InvalidArgument, ServiceError, Unavailable
from aiprod_kit.failures import reason_name
from aiprod_kit.money import usd
from aiprod_kit.rendering.keys import KeyRecord, RenderKeyStore
from aiprod_kit.rendering.record import RenderRecord

R = TypeVar("R", bound=RenderRecord)
log = structlog.get_logger()

# Writes of a task id or an ending to the key store: tries, and the first pause between them.
_STORE_TRIES = 5
_STORE_BACKOFF_SECONDS = 0.2
# How long an ended render is still answered from memory: its watchers and a GetRender just after its
# end are told without a key store read.
ENDED_KEPT_SECONDS = 60.0


class RenderRegistry(Generic[R]):
    def __init__(
        self,
        backend_name: str,
        keys: RenderKeyStore | None = None,
        ended_kept_seconds: float = ENDED_KEPT_SECONDS,
    ) -> None:
        self.keys = keys
        self._ended_kept_seconds = ended_kept_seconds
        self._by_key: dict[str, R] = {}
        self._by_task: dict[str, R] = {}
        self._log = log.bind(backend=backend_name)

    # In memory --------------------------------------------------------------------------------------

    def by_key(self, key: str) -> R | None:
        return self._by_key.get(key)

    def by_task(self, task_id: str) -> R | None:
        return self._by_task.get(task_id)

    def known(self, task_id: str) -> R | None:
        """The render a caller names by task id, None when this process does not know it;
        INVALID_ARGUMENT for an empty id."""
        if not task_id:
            raise InvalidArgument([("task_id", "must not be empty")])
        return self._by_task.get(task_id)

    def add(self, render: R) -> None:
        """Names the render by its key, and by its task id when it has one."""
        self._by_key[render.key] = render
        if render.task_id:
            self._by_task[render.task_id] = render

    def name_key(self, key: str, render: R) -> None:
        self._by_key[key] = render

    def forget_key(self, render: R) -> None:
        if self._by_key.get(render.key) is render:
            del self._by_key[render.key]

    def name_task(self, render: R) -> None:
        self._by_task[render.task_id] = render

    def adopt_task(self, render: R) -> R:
        """The render already known by the task id of `render`, else `render`, now known by it."""
        return self._by_task.setdefault(render.task_id, render)

    def forget_later(self, render: R) -> None:
        """An ended render the key store keeps: answered from memory for a while, then by the key store."""
        asyncio.get_running_loop().call_later(self._ended_kept_seconds, self.forget, render)

    def forget(self, render: R) -> None:
        """No longer answers for the render from memory."""
        self.forget_key(render)
        if self._by_task.get(render.task_id) is render:
            del self._by_task[render.task_id]

    def with_tasks(self) -> list[R]:
        """Every render known by a task id, ended or not."""
        return list(self._by_task.values())

    # Key store --------------------------------------------------------------------------------------

    async def read(self, key: str) -> KeyRecord | None:
        """What the key store knows of the key; UNAVAILABLE when it cannot be read."""
        if self.keys is None:
            return None
        try:
            return await self.keys.get(key)
        except ServiceError:
            raise
        except Exception as error:
            self._log.exception("render key store unreadable", idempotency_key=key)
            raise Unavailable(f"the render key store cannot be read now: {type(error).__name__}") from error

    async def read_by_task(self, task_id: str) -> KeyRecord | None:
        """What the key store knows of the task; None, logged, when it cannot be read (the provider can
        still say where the task is; only its request stays unknown)."""
        if self.keys is None:
            return None
        try:
            return await self.keys.by_task(task_id)
        except Exception:
            self._log.exception("render key store unreadable", task_id=task_id)
            return None

    async def record_task(self, render: R, task_id: str) -> None:
        """The render's task, known by its id here and kept in the key store."""
        render.status.handle.task_id = task_id
        self._by_task[task_id] = render
        if self.keys is not None:
            keys = self.keys
            await self._durably("record task id", render.key, lambda: keys.record_task(render.key, task_id))

    async def _durably(self, what: str, key: str, write: Callable[[], Awaitable[None]]) -> bool:
        """A key store write, tried again over a short outage; False (logged) when it could not be made."""
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

    # Endings ----------------------------------------------------------------------------------------

    async def end(
        self,
        render: R,
        state: int,
        failure: render_pb2.RenderFailure | None = None,
        charge_micros: int | None = None,
    ) -> None:
        """Ends the render (once): its state, failure and charge, kept in the key store, then announced."""
        if render.ended or render.concluding:
            return
        render.concluding = True
        render.release_slot()
        ended = render.snapshot()
        ended.state = state
        if failure is not None:
            ended.failure.CopyFrom(failure)
        if charge_micros is not None:
            ended.charge.CopyFrom(usd(charge_micros))
        ended.update_time.GetCurrentTime()
        kept = False
        if render.key and self.keys is not None:
            keys = self.keys
            kept = await self._durably(
                "record the ending", render.key, lambda: keys.record_end(render.key, ended)
            )
        render.restore(ended)
        if kept:
            self.forget_later(render)
        self._log.info(
            "render ended",
            idempotency_key=render.key,
            task_id=render.task_id,
            state=renderer_pb2.RenderState.Name(state),
            reason=reason_name(failure.reason) if failure else "",
            charge_micros=charge_micros,
        )
