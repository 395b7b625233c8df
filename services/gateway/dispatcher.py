"""The dispatcher: drives queued jobs through the router and records every event in the job's log.

It survives restarts: on start it picks up every queued or running job. A job whose render handle
was recorded is re-attached with ResumeRender; one without is executed again under the same
idempotency key, which the renderer answers with the render it already started.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import structlog

from aiprod.common.v1 import backend_pb2, event_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_gateway.reporting import MetricsReporter
from aiprod_gateway.spending import BudgetRefused, Spending
from aiprod_gateway.store import TERMINAL_STATES, JobStore, JobUpdate

log = structlog.get_logger()

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


class Dispatcher:
    def __init__(
        self,
        store: JobStore,
        router: router_pb2_grpc.RouterServiceStub,
        reporter: MetricsReporter,
        spending: Spending,
        concurrency: int,
    ) -> None:
        self._store = store
        self._router = router
        self._reporter = reporter
        self._spending = spending
        self._concurrency = concurrency
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._driving: dict[str, asyncio.Task[None]] = {}
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
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    def enqueue(self, job_id: str) -> None:
        self._queue.put_nowait(job_id)

    async def stop_driving(self, job_id: str) -> None:
        """Stops following a job's render (for a cancel); returns once nothing more is recorded for it."""
        task = self._driving.get(job_id)
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    async def _work(self) -> None:
        while True:
            job_id = await self._queue.get()
            task = asyncio.create_task(self._drive(job_id))
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

    async def _drive(self, job_id: str) -> None:
        job = await self._store.get_job(job_id)
        if job is None or job.state not in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING):
            return
        if job.state == job_pb2.JOB_STATE_QUEUED:
            await self._store.append_event(job_id, "rendering", _set_running)
            job = await self._store.get_job(job_id)
            assert job is not None
            self._reporter.job_changed(job)
        delay = _BACKOFF[0]
        reserved: int | None = None
        while job.state not in TERMINAL_STATES:
            try:
                if reserved is None:
                    reserved = await self._spending.reserve(job)
                    if reserved:
                        await self._store.append_event(
                            job_id, f"budget reserved: {reserved / 1e6:.2f} USD", _noop
                        )
                async for event in self._render_events(job):
                    message, update = _apply(event)
                    await self._store.append_event(job_id, message, update, render_event=event)
                    if event.HasField("fallback"):
                        self._reporter.backend_failed(job, event.fallback)
                    if event.WhichOneof("kind") in ("succeeded", "failed"):
                        break
            except BudgetRefused as refused:
                await self._store.append_event(
                    job_id, f"budget refused: {refused}", _failed("BUDGET_EXHAUSTED", str(refused))
                )
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

    async def _render_events(self, job: gateway_pb2.RenderJob) -> AsyncIterator[event_pb2.RenderEvent]:
        shot = job.plan.shots[0]
        if job.HasField("handle"):
            request = router_pb2.ResumeRenderRequest(
                job_id=job.job_id,
                handle=job.handle,
                shot=shot,
                constraints=job.spec.constraints,
                attempt=job.attempt,
            )
            stream = self._router.ResumeRender(request)
        else:
            request = router_pb2.ExecuteRenderRequest(
                job_id=job.job_id, shot=shot, constraints=job.spec.constraints, idempotency_key=job.job_id
            )
            stream = self._router.ExecuteRender(request)
        async for response in stream:
            yield response.event


def _noop(job: gateway_pb2.RenderJob) -> None:
    """An event that changes nothing on the job, only tells."""


def _set_running(job: gateway_pb2.RenderJob) -> None:
    job.state = job_pb2.JOB_STATE_RUNNING


def _failed(reason: str, message: str) -> JobUpdate:
    def update(job: gateway_pb2.RenderJob) -> None:
        job.state = job_pb2.JOB_STATE_FAILED
        job.error.CopyFrom(render_pb2.RenderFailure(reason=reason, message=message, retryable=False))

    return update
