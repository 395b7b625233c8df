"""The dispatcher: drives queued jobs through the router and records every event in the job's log.

Every gateway replica runs one on the shared job store, and each job is driven by one replica at a
time: the one holding its claim in the store. A replica claims a job before driving it, renews the
claims it holds every third of the lease, and lets go when it stops driving one (the job ended, was
cancelled, or the gateway stops). Whenever it has a worker free (at start, on every heartbeat, when a
job ends) it takes over unfinished jobs nobody holds: new ones, and those of a replica that died, once
their leases run out; no restart is needed. What a driver records is fenced by its claim: a replica
that lost a job (another took it over, or it was cancelled elsewhere) records nothing more for it, and
stops driving it at once.

A job whose render handle was recorded is re-attached with ResumeRender; one without is executed
again under the same idempotency key, which the renderer answers with the render it already started.
A driver that crashes (the store unreachable, anything unexpected) lets go of its job, which is tried
again after a backoff, here or by another replica.

A job runs once its first attempt is reserved (the router reserves each attempt before its provider is
called); the job's attempts, what each reserved and cost, are recorded from the router's events, and
the settlement outbox tells the ledger. One that today's budget cannot pay before anything was spent
on it fails, or waits queued (the budget policy): a waiting job holds no worker (it keeps its claim), so
the jobs whose ends free money keep running, and tries again at an interval or as soon as a settlement
here frees money.
"""

import asyncio
import contextlib
import math
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import structlog
from opentelemetry import propagate, trace

from aiprod.common.v1 import backend_pb2, event_pb2, job_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_gateway import attempts
from aiprod_gateway.reporting import MetricsReporter
from aiprod_gateway.settlement import Settlement, record_charge
from aiprod_gateway.spending import BudgetRefused, Spending
from aiprod_gateway.store import TERMINAL_STATES, ClaimLost, JobStore, JobUpdate
from aiprod_kit.capabilities import backend_name
from aiprod_kit.failures import Reason, failure, reason_name
from aiprod_kit.settings import ConfigurationError, GatewaySettings

log = structlog.get_logger()
_tracer = trace.get_tracer("aiprod.gateway")

# Router failures worth another try, however long it takes: the router or a renderer is restarting
# or unreachable. Anything else fails the job with the router's message.
_TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
_BACKOFF = (0.2, 5.0)
# A crashed driver's job is tried again after this long, doubled for each crash in a row, up to the most.
_CRASH_BACKOFF = (1.0, 60.0)
# How long a stopping gateway tries to let go of its claims (else they run out).
_RELEASE_TIMEOUT = 5.0
_CANCEL_TIMEOUT = 5.0


def _apply(event: event_pb2.RenderEvent) -> tuple[str, JobUpdate]:
    """The message and the job change that one render event makes."""
    kind = event.WhichOneof("kind")

    def update(job: gateway_pb2.RenderJob) -> None:
        if kind == "routed":
            job.backend = event.routed.backend
            attempts.routed(job, event.attempt, event.routed)
            if job.state == job_pb2.JOB_STATE_QUEUED:
                # Running once its first attempt is paid for: a job the budget cannot pay stays queued.
                job.state = job_pb2.JOB_STATE_RUNNING
        elif kind == "submitted":
            job.handle.CopyFrom(event.submitted)
            job.attempt = event.attempt
            attempts.submitted(job, event.attempt, event.submitted)
        elif kind == "charged":
            attempts.charged(job, event.attempt, event.charged)
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
        "routed": lambda: f"routed to {backend_name(event.routed.backend)}: {event.routed.reason}",
        "submitted": lambda: (
            f"submitted to {backend_name(event.submitted.backend)} as {event.submitted.task_id}"
        ),
        "progress": lambda: f"rendering: {event.progress.fraction:.0%}",
        "qc": lambda: f"technical QC score {event.qc.score:.2f}",
        "fallback": lambda: (
            f"fell back from {backend_name(event.fallback.from_backend)} to "
            f"{backend_name(event.fallback.to_backend)}: {event.fallback.cause.message}"
        ),
        "charged": lambda: attempts.charge_message(event.charged),
        "succeeded": lambda: "video ready",
        "failed": lambda: f"render failed: {reason_name(event.failed.reason)}: {event.failed.message}",
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


def job_lease_seconds(settings: GatewaySettings) -> float:
    """AIPROD_GATEWAY_JOB_LEASE_SECONDS, checked."""
    lease = settings.gateway_job_lease_seconds
    if not (math.isfinite(lease) and lease > 0):
        raise ConfigurationError(f"AIPROD_GATEWAY_JOB_LEASE_SECONDS: {lease} is not a positive number")
    return lease


def owner_id() -> str:
    """This gateway process's name on the claims it holds: its host (the pod), its pid, and a random part
    (a restarted container may get its pid again)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


async def cancel_render(
    router: router_pb2_grpc.RouterServiceStub, job_id: str, handle: backend_pb2.RenderHandle
) -> event_pb2.AttemptCharge | None:
    """Cancels a render at its backend, through the router; returns what the cancelled attempt costs by
    its provider's rules. Best effort: None, logged, when it fails (the attempt's reservation is then
    held, and counts at its worst case once it expires)."""
    try:
        response = await router.CancelRender(
            router_pb2.CancelRenderRequest(handle=handle), timeout=_CANCEL_TIMEOUT
        )
    except grpc.aio.AioRpcError as error:
        log.warning("render not cancelled at its backend", job_id=job_id, code=error.code().name)
        return None
    return response.charge


@dataclass(eq=False)
class _Driver:
    """A job this replica drives: its task, and what the dispatcher needs to know once it stops."""

    # The render the driver follows, as its stream named it (recorded on the job or not yet), and its
    # attempt's number.
    handle: backend_pb2.RenderHandle | None = None
    attempt: int = 0
    # The driver recorded the job's end itself (which ended its claim) and is settling it.
    ended: bool = False
    # Stopped for a cancel made here: the canceller records the end.
    cancelled: bool = False
    # An attempt of this run was charged or held: money went out, whatever the budget says next.
    charged: bool = False
    task: asyncio.Task[None] = field(init=False)


class Dispatcher:
    def __init__(
        self,
        store: JobStore,
        router: router_pb2_grpc.RouterServiceStub,
        reporter: MetricsReporter,
        spending: Spending,
        settlement: Settlement,
        concurrency: int,
        budget_policy: BudgetPolicy,
        owner: str,
        lease_seconds: float = 30.0,
    ) -> None:
        self._store = store
        self._router = router
        self._reporter = reporter
        self._spending = spending
        self._settlement = settlement
        self._concurrency = concurrency
        self._budget_policy = budget_policy
        self._owner = owner
        self._lease = lease_seconds
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        # The jobs in the queue, once each; one dropped from here (cancelled, lost) is skipped when its
        # turn comes.
        self._queued: set[str] = set()
        self._driving: dict[str, _Driver] = {}
        # Jobs to queue again later, each with the task that will: waiting for budget (the claim kept)
        # or backing off after a crash (the claim let go).
        self._later: dict[str, asyncio.Task[None]] = {}
        self._crashes: dict[str, int] = {}
        # The claims this replica holds and renews (jobs it queued, drives, or keeps waiting for budget),
        # each with the number of its taking: a renewal answered after a job was let go of and claimed
        # again says nothing about the new claim.
        self._claimed: dict[str, int] = {}
        self._claims_taken = 0
        # Set when a worker frees up: the heartbeat looks for work at once.
        self._worker_free = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._workers = [asyncio.create_task(self._work()) for _ in range(self._concurrency)]
        # Its first beat takes over the unfinished jobs nobody holds, a previous run's among them.
        self._heartbeat = asyncio.create_task(self._beat())
        log.info("dispatcher started", owner=self._owner, lease_seconds=self._lease)

    async def stop(self) -> None:
        """Stops driving jobs and lets go of their claims: they stay queued or running in the store, and
        another replica, or the next start, takes them over at once rather than after their leases."""
        tasks = [
            *([self._heartbeat] if self._heartbeat else []),
            *self._later.values(),
            *self._workers,
            *(driver.task for driver in self._driving.values()),
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        held = sorted(self._claimed)
        self._claimed.clear()
        try:
            await asyncio.wait_for(self._store.release_claims(self._owner, held), _RELEASE_TIMEOUT)
        except Exception as error:
            log.warning("claims not released; they expire", count=len(held), error=str(error))

    def enqueue(self, job_id: str) -> None:
        """Queues a job to drive here. It is claimed when a worker takes it: by then another replica may
        drive it, and this one skips it."""
        if job_id in self._queued or job_id in self._driving:
            return
        self._queued.add(job_id)
        self._queue.put_nowait(job_id)

    async def stop_driving(self, job_id: str) -> None:
        """Stops what this replica does for a job, for a cancel: its render stream, its wait for budget,
        its place in the queue; returns once nothing more is recorded for it here. The claim is left to
        the cancel's event, which ends it. A replica that drives the job elsewhere stops when it finds
        the job ended: at its next event or its next renewal."""
        self._claimed.pop(job_id, None)
        self._queued.discard(job_id)
        driver = self._driving.get(job_id)
        if driver is not None:
            driver.cancelled = True
            driver.task.cancel()
            await asyncio.wait({driver.task})
        # After the driver: it may just have set the job waiting.
        later = self._later.pop(job_id, None)
        if later is not None:
            later.cancel()

    # Claims ---------------------------------------------------------------------------------------

    def _hold(self, job_id: str) -> None:
        """Counts a claim as this replica's before it is taken: a stop meanwhile lets go of it too."""
        self._claims_taken += 1
        self._claimed[job_id] = self._claims_taken

    async def _beat(self) -> None:
        """Every third of the lease, and whenever a worker frees up: renews this replica's claims,
        stopping what it does for the jobs it lost, then takes over jobs nobody holds."""
        while True:
            try:
                await self._renew()
                await self._take_over()
            except Exception as error:
                # The store unreachable, most likely: the next beat tries again. A driver that cannot
                # write meanwhile crashes and is retried on its own.
                log.warning("job claims not kept this beat", error=str(error), exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._worker_free.wait(), self._lease / 3)
            self._worker_free.clear()

    async def _renew(self) -> None:
        held = dict(self._claimed)
        if not held:
            return
        renewed = await self._store.renew_claims(self._owner, sorted(held), self._lease)
        for job_id in held.keys() - renewed:
            driver = self._driving.get(job_id)
            if self._claimed.get(job_id) != held[job_id] or (driver is not None and driver.ended):
                continue  # let go of (and maybe claimed again) meanwhile, or ended by its own driver
            self._lose(job_id)

    def _lose(self, job_id: str) -> None:
        """Stops at once all this replica does for a job whose claim it no longer holds."""
        self._claimed.pop(job_id, None)
        self._queued.discard(job_id)
        later = self._later.pop(job_id, None)
        if later is not None:
            later.cancel()
            log.info("job claimed elsewhere or ended; no longer waiting for it here", job_id=job_id)
        driver = self._driving.get(job_id)
        if driver is not None:
            driver.task.cancel()  # its worker then finds out why (_lost)

    async def _take_over(self) -> None:
        """Claims jobs nobody holds, as many as this replica has workers free, and queues them."""
        free = self._concurrency - len(self._driving) - len(self._queued)
        if free <= 0:
            return
        # Leave room for the ones found that are this replica's already (queued, or backing off).
        found = await self._store.claimable_jobs(free + len(self._queued) + len(self._later))
        taken: list[str] = []
        for job_id in found:
            if len(taken) >= free:
                break
            if job_id in self._queued or job_id in self._driving or job_id in self._later:
                continue
            self._hold(job_id)
            if await self._store.claim(job_id, self._owner, self._lease):
                taken.append(job_id)
                self.enqueue(job_id)
            else:
                self._claimed.pop(job_id, None)
        if taken:
            log.info("took over jobs nobody drove", count=len(taken), job_ids=taken)

    # Workers --------------------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            job_id = await self._queue.get()
            if job_id not in self._queued:
                continue
            self._queued.discard(job_id)
            try:
                await self._claim_and_drive(job_id)
            except Exception:
                # Never the worker's end; the job's claim was let go of or runs out.
                log.exception("job not driven", job_id=job_id)
            if not self._queued:
                self._worker_free.set()

    async def _claim_and_drive(self, job_id: str) -> None:
        self._hold(job_id)
        try:
            claimed = await self._store.claim(job_id, self._owner, self._lease)
        except Exception as error:
            self._crashed(job_id, error)
            return
        if not claimed:
            # Another replica drives it, or it ended meanwhile (cancelled while queued).
            self._claimed.pop(job_id, None)
            self._crashes.pop(job_id, None)
            return
        driver = _Driver()
        driver.task = asyncio.create_task(self._traced(job_id, driver))
        self._driving[job_id] = driver
        try:
            # wait() rather than await: a stopped job ends its task, not this worker.
            await asyncio.wait({driver.task})
        except asyncio.CancelledError:
            driver.task.cancel()
            raise
        finally:
            self._driving.pop(job_id, None)
        if driver.cancelled:
            return  # cancelled here: the canceller records the end
        error = None if driver.task.cancelled() else driver.task.exception()
        if driver.task.cancelled() or isinstance(error, ClaimLost):
            self._claimed.pop(job_id, None)
            self._crashes.pop(job_id, None)
            await self._lost(job_id, driver)
        elif error is not None:
            self._crashed(job_id, error)
        else:
            self._crashes.pop(job_id, None)
            if job_id not in self._later:  # a job waiting for budget keeps its claim
                self._claimed.pop(job_id, None)
                if not driver.ended:  # an ended job's claim ended with it
                    await self._release(job_id)

    async def _release(self, job_id: str) -> None:
        try:
            await self._store.release_claims(self._owner, [job_id])
        except Exception as error:
            log.warning("claim not released; it expires", job_id=job_id, error=str(error))

    async def _lost(self, job_id: str, driver: _Driver) -> None:
        """After a driver stopped because its claim was gone: another replica took the job over, or the
        job ended elsewhere, cancelled by a replica that settled it and cancelled the render it found
        recorded."""
        job = await self._store.get_job(job_id)
        if job is None or job.state != job_pb2.JOB_STATE_CANCELLED:
            log.info("job claimed by another replica; stopped driving it", job_id=job_id)
            return
        log.info("job cancelled elsewhere; stopped driving it", job_id=job_id)
        if driver.handle is not None and driver.handle.task_id != job.handle.task_id:
            # A render this driver saw start but could not record: nobody else knows to cancel it, nor
            # to record what it costs.
            charge = await cancel_render(self._router, job_id, driver.handle)
            if charge is not None:
                await record_charge(self._store, job_id, driver.attempt, charge, driver.handle)
                self._settlement.charged()

    def _crashed(self, job_id: str, error: BaseException) -> None:
        """A driver that failed unexpectedly (the store unreachable, a bug): the job is let go of, for any
        replica, and tried again here after a backoff that grows while it keeps failing."""
        crashes = self._crashes[job_id] = self._crashes.get(job_id, 0) + 1
        delay = min(_CRASH_BACKOFF[0] * 2 ** (crashes - 1), _CRASH_BACKOFF[1])
        log.error(
            "job driver crashed; trying again",
            job_id=job_id,
            crashes=crashes,
            retry_in_seconds=delay,
            exc_info=error,
        )
        self._claimed.pop(job_id, None)

        async def back_off() -> None:
            # In the background: with the store away, the release may take as long as the crash did.
            await self._release(job_id)
            await asyncio.sleep(delay)

        self._enqueue_later(job_id, back_off)

    def _enqueue_later(self, job_id: str, wait: Callable[[], Awaitable[None]]) -> None:
        async def later() -> None:
            await wait()
            self._later.pop(job_id, None)
            self.enqueue(job_id)

        self._later[job_id] = asyncio.create_task(later())

    # Driving --------------------------------------------------------------------------------------

    async def _traced(self, job_id: str, driver: _Driver) -> None:
        """Drives the job inside its own trace, the one its CreateRenderJob started: the router,
        renderer and provider calls join it, also when the job is resumed after a restart."""
        parent = propagate.extract(await self._store.trace_context(job_id))
        with _tracer.start_as_current_span(
            "dispatch job", context=parent, attributes={"aiprod.job_id": job_id}
        ):
            await self._drive(job_id, driver)

    async def _record(
        self,
        driver: _Driver,
        job_id: str,
        message: str,
        update: JobUpdate,
        render_event: event_pb2.RenderEvent | None = None,
    ) -> None:
        """Appends one of the driver's events, fenced by this replica's claim (ClaimLost: stop)."""

        def recorded(job: gateway_pb2.RenderJob) -> None:
            update(job)
            if job.state in TERMINAL_STATES:
                # Known before the commit that ends the claim: a renewal that finds it gone knows why.
                driver.ended = True

        await self._store.append_event(job_id, message, recorded, render_event, owner=self._owner)

    async def _drive(self, job_id: str, driver: _Driver) -> None:
        job = await self._store.get_job(job_id)
        if job is None or job.state not in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING):
            return
        delay = _BACKOFF[0]
        while job.state not in TERMINAL_STATES:
            try:
                # Read to the stream's end (the router ends it after the final event): a call left open
                # would keep its span, and the job's trace, unfinished.
                async with contextlib.aclosing(self._render_events(job)) as events:
                    async for event in events:
                        await self._on_event(job, event, driver)
            except BudgetRefused as refused:
                if await self._budget_refused(job, refused, driver):
                    return  # waits, queued; _enqueue_later queues it again
            except grpc.aio.AioRpcError as error:
                if error.code() not in _TRANSIENT:
                    await self._record(
                        driver,
                        job_id,
                        f"render refused: {error.details()}",
                        _failed(Reason.ROUTER_REFUSED, error.details() or ""),
                    )
                else:
                    log.warning("router call broke; will resume", job_id=job_id, code=error.code().name)
            job = await self._store.get_job(job_id)
            assert job is not None
            if job.state in TERMINAL_STATES:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF[1])
        if not driver.ended:
            # It ended elsewhere while this driver recorded nothing (a cancel while the router was away).
            raise ClaimLost(f"job {job_id} ended elsewhere")
        self._reporter.job_changed(job)

    async def _on_event(
        self, job: gateway_pb2.RenderJob, event: event_pb2.RenderEvent, driver: _Driver
    ) -> None:
        """Records one render event on the job (job: as it was when its stream began)."""
        if (
            event.HasField("failed")
            and event.failed.reason == Reason.BUDGET_EXHAUSTED
            and not attempts.may_have_billed(job)
            and not driver.charged
        ):
            # Nothing was spent on it: the budget policy decides (wait, or fail).
            raise BudgetRefused(event.failed.message)
        if event.HasField("submitted"):
            # Known before it is recorded: should the job be cancelled elsewhere meanwhile, this
            # replica cancels the render.
            driver.handle = event.submitted
            driver.attempt = event.attempt
        message, update = _apply(event)
        if event.HasField("routed") and event.routed.reserved.amount_micros:
            message += await self._spending.level_note()
        was_queued = job.state == job_pb2.JOB_STATE_QUEUED and event.HasField("routed")
        await self._record(driver, job.job_id, message, update, render_event=event)
        if event.HasField("charged"):
            driver.charged = driver.charged or event.charged.outcome != event_pb2.CHARGE_OUTCOME_RELEASE
            self._settlement.charged()
        if event.HasField("fallback"):
            self._reporter.backend_failed(job, event.fallback)
        if was_queued:
            job.state = job_pb2.JOB_STATE_RUNNING
            self._reporter.job_changed(job)

    async def _budget_refused(
        self, job: gateway_pb2.RenderJob, refused: BudgetRefused, driver: _Driver
    ) -> bool:
        """The budget policy for a job today's budget cannot pay: fails it with BUDGET_EXHAUSTED, or
        leaves it queued to try again later (True). A waiting job gets one event, whose time starts its
        wait: the limit holds across restarts."""
        policy = self._budget_policy
        started = job.HasField("budget_wait_start_time")
        waited = time.time() - job.budget_wait_start_time.ToNanoseconds() / 1e9 if started else 0.0
        if not policy.wait or (policy.max_wait_seconds is not None and waited >= policy.max_wait_seconds):
            why = f"{refused} (after {waited:.0f} s waiting for budget)" if policy.wait else str(refused)
            await self._record(
                driver, job.job_id, f"budget refused: {why}", _failed(Reason.BUDGET_EXHAUSTED, why)
            )
            return False
        if not started:
            log.info("job waits for budget", job_id=job.job_id, why=str(refused))
            await self._record(driver, job.job_id, f"waiting for budget: {refused}", _waiting_for_budget)
        delay = policy.retry_seconds
        if policy.max_wait_seconds is not None:
            delay = min(delay, policy.max_wait_seconds - waited)
        # Again after delay, or as soon as a job of this gateway frees money.
        self._enqueue_later(job.job_id, lambda: self._settlement.money_freed(delay))
        return True

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
                job_id=job.job_id,
                shot=shot,
                constraints=job.spec.constraints,
                idempotency_key=job.job_id,
            )
            stream = self._router.ExecuteRender(request)
        try:
            async for response in stream:
                yield response.event
        finally:
            # Left early (the claim lost, a write failed): the router stops following it for this driver.
            stream.cancel()


def _waiting_for_budget(job: gateway_pb2.RenderJob) -> None:
    job.budget_wait_start_time.GetCurrentTime()


def _failed(reason: int, message: str) -> JobUpdate:
    def update(job: gateway_pb2.RenderJob) -> None:
        job.state = job_pb2.JOB_STATE_FAILED
        job.error.CopyFrom(failure(reason, message, retryable=False))

    return update
