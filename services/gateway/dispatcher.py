"""The dispatcher: drives queued jobs through the router and records every event in the job's log.

It survives restarts: on start it picks up every queued or running job. A job whose render handle
was recorded is re-attached with ResumeRender; one without is executed again under the same
idempotency key, which the renderer answers with the render it already started.

A job runs once its worst case is reserved. One that today's budget cannot pay fails, or waits queued
(the budget policy): a waiting job holds no worker, so the jobs whose ends free money keep running,
and tries again at an interval or as soon as a job of this gateway settles.
"""

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import structlog
from opentelemetry import propagate, trace

from aiprod.common.v1 import backend_pb2, event_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_gateway.reporting import MetricsReporter
from aiprod_gateway.spending import BudgetRefused, Spending
from aiprod_gateway.store import TERMINAL_STATES, JobStore, JobUpdate
from aiprod_kit.money import usd
from aiprod_kit.settings import ConfigurationError, GatewaySettings

log = structlog.get_logger()
_tracer = trace.get_tracer("aiprod.gateway")

# Router failures worth another try, however long it takes: the router or a renderer is restarting
# or unreachable. Anything else fails the job with the router's message.
_TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
_BACKOFF = (0.2, 5.0)


def _backend_name(backend: int) -> str:
    return backend_pb2.Backend.Name(backend).removeprefix("BACKEND_").lower()


def _apply(event: event_pb2.RenderEvent) -> tuple[str, JobUpdate]:
    """The message and the job change that one render event makes."""
    kind = event.WhichOneof("kind")

    def update(job: gateway_pb2.RenderJob) -> None:
        if kind == "routed":
            job.backend = event.routed.backend
        elif kind == "submitted":
            job.handle.CopyFrom(event.submitted)
            job.attempt = event.attempt
        elif kind == "progress":
            job.progress = event.progress.fraction
        elif kind == "succeeded":
            job.state = job_pb2.JOB_STATE_SUCCEEDED
            job.progress = 1.0
            job.result.CopyFrom(event.succeeded)
        elif kind == "failed":
            job.state = job_pb2.JOB_STATE_FAILED
            job.error.CopyFrom(event.failed)

    messages = {
        "routed": lambda: f"routed to {_backend_name(event.routed.backend)}: {event.routed.reason}",
        "submitted": lambda: (
            f"submitted to {_backend_name(event.submitted.backend)} as {event.submitted.task_id}"
        ),
        "progress": lambda: f"rendering: {event.progress.fraction:.0%}",
        "qc": lambda: f"technical QC score {event.qc.score:.2f}",
        "fallback": lambda: (
            f"fell back from {_backend_name(event.fallback.from_backend)} to "
            f"{_backend_name(event.fallback.to_backend)}: {event.fallback.cause.message}"
        ),
        "succeeded": lambda: "video ready",
        "failed": lambda: f"render failed: {event.failed.reason}: {event.failed.message}",
    }
    return messages[kind](), update


@dataclass(frozen=True)
class BudgetPolicy:
    """What becomes of a queued job today's budget cannot pay (AIPROD_GATEWAY_BUDGET_*)."""

    # Wait for money (else fail at once).
    wait: bool = True
    retry_seconds: float = 30.0
    # The longest wait before the job fails; None: no limit.
    max_wait_seconds: float | None = 86400.0

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> "BudgetPolicy":
        retry, max_wait = settings.gateway_budget_retry_seconds, settings.gateway_budget_max_wait_seconds
        if not (math.isfinite(retry) and retry > 0):
            raise ConfigurationError(f"AIPROD_GATEWAY_BUDGET_RETRY_SECONDS: {retry} is not a positive number")
        if not (math.isfinite(max_wait) and max_wait >= 0):
            raise ConfigurationError(
                f"AIPROD_GATEWAY_BUDGET_MAX_WAIT_SECONDS: {max_wait} is not a number of seconds (0: no limit)"
            )
        return cls(settings.gateway_budget_policy == "wait", retry, max_wait or None)


class Dispatcher:
    def __init__(
        self,
        store: JobStore,
        router: router_pb2_grpc.RouterServiceStub,
        reporter: MetricsReporter,
        spending: Spending,
        concurrency: int,
        budget_policy: BudgetPolicy,
    ) -> None:
        self._store = store
        self._router = router
        self._reporter = reporter
        self._spending = spending
        self._concurrency = concurrency
        self._budget_policy = budget_policy
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._driving: dict[str, asyncio.Task[None]] = {}
        # Jobs waiting for budget, each with the task that enqueues it again.
        self._waiting: dict[str, asyncio.Task[None]] = {}
        self._workers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        unfinished = await self._store.unfinished_jobs()
        for job in unfinished:
            self._queue.put_nowait(job.job_id)
        if unfinished:
            log.info("resuming unfinished jobs", count=len(unfinished))
        self._workers = [asyncio.create_task(self._work()) for _ in range(self._concurrency)]

    async def stop(self) -> None:
        """Stops driving jobs; they stay queued or running in the store for the next start."""
        for waiting in self._waiting.values():
            waiting.cancel()
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    def enqueue(self, job_id: str) -> None:
        self._queue.put_nowait(job_id)

    async def stop_driving(self, job_id: str) -> None:
        """Stops following a job's render, or its wait for budget (for a cancel); returns once nothing
        more is recorded for it."""
        task = self._driving.get(job_id)
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        # After the driver: it may just have set the job waiting.
        waiting = self._waiting.pop(job_id, None)
        if waiting is not None:
            waiting.cancel()

    async def _work(self) -> None:
        while True:
            job_id = await self._queue.get()
            task = asyncio.create_task(self._traced(job_id))
            self._driving[job_id] = task
            try:
                # wait() rather than await: a cancelled job ends its task, not this worker.
                await asyncio.wait({task})
            except asyncio.CancelledError:
                task.cancel()
                raise
            finally:
                self._driving.pop(job_id, None)
            if not task.cancelled() and task.exception() is not None:
                log.error("job driver crashed", job_id=job_id, exc_info=task.exception())

    async def _traced(self, job_id: str) -> None:
        """Drives the job inside its own trace, the one its CreateRenderJob started: the router,
        renderer and provider calls join it, also when the job is resumed after a restart."""
        parent = propagate.extract(await self._store.trace_context(job_id))
        with _tracer.start_as_current_span(
            "dispatch job", context=parent, attributes={"aiprod.job_id": job_id}
        ):
            await self._drive(job_id)

    async def _drive(self, job_id: str) -> None:
        job = await self._store.get_job(job_id)
        if job is None or job.state not in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING):
            return
        delay = _BACKOFF[0]
        while job.state not in TERMINAL_STATES:
            try:
                if not job.HasField("reserved"):
                    job = await self._reserve(job)
                if job.state == job_pb2.JOB_STATE_QUEUED:
                    # Running once paid for: a job the budget cannot pay stays queued.
                    await self._store.append_event(job_id, "rendering", _set_running)
                    job = await self._store.get_job(job_id)
                    assert job is not None
                    self._reporter.job_changed(job)
                # Read to the stream's end (the router ends it after the final event): a call left open
                # would keep its span, and the job's trace, unfinished.
                async for event in self._render_events(job):
                    message, update = _apply(event)
                    await self._store.append_event(job_id, message, update, render_event=event)
                    if event.HasField("fallback"):
                        self._reporter.backend_failed(job, event.fallback)
            except BudgetRefused as refused:
                if await self._budget_refused(job, refused):
                    return  # waits, queued; _retry_later enqueues it again
            except grpc.aio.AioRpcError as error:
                if error.code() not in _TRANSIENT:
                    await self._store.append_event(
                        job_id,
                        f"render refused: {error.details()}",
                        _failed("ROUTER_REFUSED", error.details()),
                    )
                else:
                    log.warning("router call broke; will resume", job_id=job_id, code=error.code().name)
            job = await self._store.get_job(job_id)
            assert job is not None
            if job.state in TERMINAL_STATES:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF[1])
        await self._spending.settle(job)
        self._reporter.job_changed(job)

    async def _reserve(self, job: gateway_pb2.RenderJob) -> gateway_pb2.RenderJob:
        """Reserves the job's worst case and records the amount on the job: a resumed job passes it to
        the router without reserving again. A free render records nothing (it has nothing to settle)."""
        amount = await self._spending.reserve(job)
        if amount:
            message = await self._spending.describe_reservation(amount)
            await self._store.append_event(job.job_id, message, _reserved(amount))
            job = await self._store.get_job(job.job_id)
            assert job is not None
        return job

    async def _budget_refused(self, job: gateway_pb2.RenderJob, refused: BudgetRefused) -> bool:
        """The budget policy for a job today's budget cannot pay: fails it with BUDGET_EXHAUSTED, or
        leaves it queued to try again later (True). A waiting job gets one event, whose time starts its
        wait: the limit holds across restarts."""
        policy = self._budget_policy
        started = job.HasField("budget_wait_start_time")
        waited = time.time() - job.budget_wait_start_time.ToNanoseconds() / 1e9 if started else 0.0
        if not policy.wait or (policy.max_wait_seconds is not None and waited >= policy.max_wait_seconds):
            why = f"{refused} (after {waited:.0f} s waiting for budget)" if policy.wait else str(refused)
            await self._store.append_event(
                job.job_id, f"budget refused: {why}", _failed("BUDGET_EXHAUSTED", why)
            )
            return False
        if not started:
            log.info("job waits for budget", job_id=job.job_id, why=str(refused))
            await self._store.append_event(job.job_id, f"waiting for budget: {refused}", _waiting_for_budget)
        delay = policy.retry_seconds
        if policy.max_wait_seconds is not None:
            delay = min(delay, policy.max_wait_seconds - waited)
        self._retry_later(job.job_id, delay)
        return True

    def _retry_later(self, job_id: str, delay: float) -> None:
        """Enqueues a waiting job again after delay, or as soon as a job of this gateway frees money."""

        async def retry() -> None:
            await self._spending.money_freed(delay)
            self._waiting.pop(job_id, None)
            self._queue.put_nowait(job_id)

        self._waiting[job_id] = asyncio.create_task(retry())

    async def _render_events(self, job: gateway_pb2.RenderJob) -> AsyncIterator[event_pb2.RenderEvent]:
        shot = job.plan.shots[0]
        if job.HasField("handle"):
            request = router_pb2.ResumeRenderRequest(
                job_id=job.job_id,
                handle=job.handle,
                shot=shot,
                constraints=job.spec.constraints,
                attempt=job.attempt,
                reserved=job.reserved,
            )
            stream = self._router.ResumeRender(request)
        else:
            request = router_pb2.ExecuteRenderRequest(
                job_id=job.job_id,
                shot=shot,
                constraints=job.spec.constraints,
                idempotency_key=job.job_id,
                reserved=job.reserved,
            )
            stream = self._router.ExecuteRender(request)
        async for response in stream:
            yield response.event


def _reserved(amount_micros: int) -> JobUpdate:
    def update(job: gateway_pb2.RenderJob) -> None:
        job.reserved.CopyFrom(usd(amount_micros))

    return update


def _waiting_for_budget(job: gateway_pb2.RenderJob) -> None:
    job.budget_wait_start_time.GetCurrentTime()


def _set_running(job: gateway_pb2.RenderJob) -> None:
    job.state = job_pb2.JOB_STATE_RUNNING


def _failed(reason: str, message: str) -> JobUpdate:
    def update(job: gateway_pb2.RenderJob) -> None:
        job.state = job_pb2.JOB_STATE_FAILED
        job.error.CopyFrom(render_pb2.RenderFailure(reason=reason, message=message, retryable=False))

    return update
