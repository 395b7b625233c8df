"""The renderer's one poll loop, and what it does with the provider's answers.

Invariants: one loop per renderer, not one per caller; each task is polled no more often than
poll_seconds, and not while the breaker holds requests back. The wait between two polls of a task grows
by half each time, up to max_poll_seconds (a render of minutes is asked about a dozen times, not once
every few seconds), and is cut short when the task's progress says it ends sooner. A task the provider no longer knows ends
RENDER_LOST; one that ended at the provider ends here with its failure reason and charge, or, when it
succeeded, once its output is finished (stored and checked). Whatever fails in doing so ends the render
FAILED with RENDERER_INTERNAL and its charge: nothing stays RUNNING for ever.
"""

import asyncio
import contextlib
import heapq
import itertools
import time

import structlog

from aiprod.common.v1 import render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.failures import Reason, failure
from aiprod_kit.money import usd
from aiprod_kit.rendering.background import Background
from aiprod_kit.rendering.calls import ProviderCalls
from aiprod_kit.rendering.finishing import OutputFinisher
from aiprod_kit.rendering.health import ProviderHealth
from aiprod_kit.rendering.outcomes import GOING, charge_of, failure_of
from aiprod_kit.rendering.provider import ErrorKind, Provider, ProviderError, ProviderTask, TaskState
from aiprod_kit.rendering.record import ProviderRender
from aiprod_kit.rendering.registry import RenderRegistry

log = structlog.get_logger()

# How much longer each wait between two polls of a task is than the one before.
_GROWTH = 1.5


class Poller:
    def __init__(
        self,
        provider: Provider,
        calls: ProviderCalls,
        health: ProviderHealth,
        registry: RenderRegistry[ProviderRender],
        finisher: OutputFinisher,
        background: Background,
        poll_seconds: float,
        max_poll_seconds: float | None = None,
    ) -> None:
        self._provider = provider
        self._calls = calls
        self._health = health
        self._registry = registry
        self._finisher = finisher
        self._background = background
        self._poll_seconds = poll_seconds
        self._max_poll_seconds = max(max_poll_seconds or poll_seconds, poll_seconds)
        self._wake = asyncio.Event()
        # (when, order, render): when each scheduled poll is due; order breaks ties between renders.
        self._due: list[tuple[float, int, ProviderRender]] = []
        self._order = itertools.count()
        self._log = log.bind(backend=provider.name)

    def schedule(self, render: ProviderRender, delay: float | None = None) -> None:
        """Polls the render's task after delay (default: the next wait of its backoff)."""
        render.next_poll = time.monotonic() + (self._next_wait(render) if delay is None else delay)
        heapq.heappush(self._due, (render.next_poll, next(self._order), render))
        self._wake.set()

    def _next_wait(self, render: ProviderRender) -> float:
        """poll_seconds, half as long again at each poll up to max_poll_seconds; no longer than the
        time left that the task's progress implies (it ends at its pace so far)."""
        now = time.monotonic()
        if not render.polls:
            render.polling_since = now
        wait = min(self._poll_seconds * _GROWTH**render.polls, self._max_poll_seconds)
        render.polls += 1
        progress = render.status.progress
        if 0 < progress < 1:
            wait = min(wait, (now - render.polling_since) * (1 - progress) / progress)
        return max(wait, self._poll_seconds)

    async def run(self) -> None:
        """The renderer's one poll loop: polls each due task, then sleeps until the next one is due.
        The due times are a heap: a wake costs the polls it starts, not a pass over every task."""
        breaker = self._health.breaker
        while True:
            self._wake.clear()
            now = time.monotonic()
            if breaker.allows_requests:
                while self._due and self._due[0][0] <= now:
                    due, _, render = heapq.heappop(self._due)
                    if render.ended or render.next_poll != due:
                        continue  # ended, or scheduled again since (its other entry stands)
                    render.next_poll = 0  # in flight; set again when the poll ends
                    self._background.spawn(self._poll(render))
            timeout = max(self._due[0][0] - now, 0.01) if self._due else None
            if not breaker.allows_requests and self._due:
                timeout = max(breaker.seconds_until_probe(), 0.1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def attach(self, render: ProviderRender) -> None:
        """Reads a task this process did not create; if the provider cannot be asked now, the poll
        loop asks later."""
        try:
            task = await self._get(render)
        except ProviderError as error:
            if error.kind == ErrorKind.NOT_FOUND:
                await self.lost(render, error)
            else:
                self.schedule(render)
            return
        await self.settle(render, task)

    async def settle(self, render: ProviderRender, task: ProviderTask) -> None:
        """Applies what the provider said of the task; whatever goes wrong in doing so ends the render
        with a reason rather than leaving it RUNNING for ever."""
        try:
            await self._apply(render, task)
        except Exception as error:
            await self._failed_here(render, error)

    async def lost(self, render: ProviderRender, error: ProviderError) -> None:
        await self._registry.end(
            render,
            renderer_pb2.RENDER_STATE_FAILED,
            failure(Reason.RENDER_LOST, str(error), True),
            charge_of(self._provider, render, None),
        )

    async def _get(self, render: ProviderRender) -> ProviderTask:
        return await self._calls.call(
            render, lambda: self._provider.get(render.task_id), idempotent=True, what="get"
        )

    async def _poll(self, render: ProviderRender) -> None:
        try:
            await self._poll_once(render)
        except Exception as error:
            await self._failed_here(render, error)

    async def _poll_once(self, render: ProviderRender) -> None:
        try:
            task = await self._get(render)
        except ProviderError as error:
            self._health.record_outcome(error)
            await self._health.publish()
            if error.kind == ErrorKind.NOT_FOUND:
                await self.lost(render, error)
                return
            self._log.warning("poll failed", task_id=render.task_id, error=str(error))
            self.schedule(render)
            return
        self._health.record_outcome(None)
        await self.settle(render, task)
        if not render.ended and render.next_poll == 0:
            self.schedule(render)

    async def _failed_here(self, render: ProviderRender, error: Exception) -> None:
        self._log.exception("render failed in the renderer", task_id=render.task_id, exc_info=error)
        await self._registry.end(
            render,
            renderer_pb2.RENDER_STATE_FAILED,
            failure(Reason.RENDERER_INTERNAL, f"the renderer failed: {type(error).__name__}", True),
            charge_of(self._provider, render, render.last_task),
        )

    async def _apply(self, render: ProviderRender, task: ProviderTask) -> None:
        if render.ended:
            return  # cancelled meanwhile
        render.last_task = task
        if task.state in GOING:
            render.update(GOING[task.state], task.progress)
            if render.next_poll == 0 and self._registry.by_task(render.task_id) is not None:
                self.schedule(render)
            return
        render.release_slot()
        if task.state == TaskState.SUCCEEDED:
            await self._succeeded(render, task)
        elif task.state == TaskState.CANCELLED:
            await self._registry.end(
                render,
                renderer_pb2.RENDER_STATE_CANCELLED,
                failure(Reason.CANCELLED, "cancelled at the provider", False),
                charge_of(self._provider, render, task),
            )
        else:
            await self._registry.end(
                render,
                renderer_pb2.RENDER_STATE_FAILED,
                failure_of(task),
                charge_of(self._provider, render, task),
            )

    async def _succeeded(self, render: ProviderRender, task: ProviderTask) -> None:
        """Success is reported only once the output is finished. The provider billed the task whatever
        becomes of its output, so every ending here carries its charge."""
        finished = await self._finisher.finish(render, task)
        charge = charge_of(self._provider, render, task)
        if isinstance(finished, render_pb2.RenderFailure):
            await self._registry.end(render, renderer_pb2.RENDER_STATE_FAILED, finished, charge)
            return
        finished.cost.CopyFrom(usd(charge))
        render.status.progress = 1.0
        render.status.output.CopyFrom(finished)
        await self._registry.end(render, renderer_pb2.RENDER_STATE_SUCCEEDED, None, charge)
