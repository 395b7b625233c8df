"""Driving one job: its render events from the router, recorded in its log and on the job, fenced by
this replica's claim; its budget policy; and what a driver that lost its job still owes it.

A job whose render handle was recorded is re-attached with ResumeRender; one without is executed
again under the same idempotency key, which the renderer answers with the render it already started.

A job runs once its first attempt is reserved (the router reserves each attempt before its provider is
called); the job's attempts, what each reserved and cost, are recorded from the router's events, and
the settlement outbox tells the ledger. One that today's budget cannot pay before anything was spent
on it fails, or waits queued (the budget policy): the driver then says how long to wait, and the
dispatcher queues it again after that, or as soon as a settlement here frees money.

Each render names the job's tenant (whose budget pays for its attempts) and, when the job's SLA tier
promises a quality minimum, the guarantee: an output under it earns one free re-render, paid by the
company's ledger account (AIPROD_GATEWAY_SLA_ACCOUNT). A resumed render says whether that re-render
was granted already: it was when the routed event of a re-render is in the job's log for the resumed
attempt or an earlier one (one routed but not yet started is granted again by the router, for the same
attempt, on the same ledger line). Every attempt's charge names the account that pays it; where the
router cannot say (the resumed attempt of a job whose re-render was granted), the driver does, from the
routed events it recorded.
"""

import asyncio
import contextlib
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import structlog
from opentelemetry import propagate, trace

from aiprod.common.v1 import backend_pb2, event_pb2, job_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_gateway import attempts
from aiprod_gateway.quoting import quoted_constraints
from aiprod_gateway.reporting import MetricsReporter
from aiprod_gateway.settlement import Settlement, record_charge
from aiprod_gateway.spending import BudgetRefused, Spending
from aiprod_gateway.store import TERMINAL_STATES, ClaimLost, JobStore, JobUpdate
from aiprod_gateway.tiers import TierPolicy, parse_tiers
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
_CANCEL_TIMEOUT = 5.0
# A ledger account's name, as the metrics service accepts it.
_ACCOUNT = re.compile(r"[A-Za-z0-9._:-]{1,128}")


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


@dataclass(frozen=True)
class Guarantees:
    """What each SLA tier promises of a render's quality, and the company's ledger account that pays
    the free re-render an output under it earns (AIPROD_GATEWAY_TIERS, AIPROD_GATEWAY_SLA_ACCOUNT)."""

    tiers: dict[int, TierPolicy]
    account: str

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> "Guarantees":
        account = settings.gateway_sla_account
        if not _ACCOUNT.fullmatch(account):
            raise ConfigurationError(
                f"AIPROD_GATEWAY_SLA_ACCOUNT: {account!r} must be 1 to 128 characters among A-Z a-z 0-9 . _ : -"
            )
        return cls(parse_tiers(settings.gateway_tiers), account)

    def of(self, job: gateway_pb2.RenderJob) -> router_pb2.QualityGuarantee | None:
        """The job's guarantee: its tier's quality minimum; None for a job without a tier (created
        before tiers) or a tier that promises none."""
        tier = self.tiers.get(job.tier)
        if tier is None or tier.quality_minimum <= 0:
            return None
        return router_pb2.QualityGuarantee(quality_minimum=tier.quality_minimum, account=self.account)


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
class Drive:
    """One job as this replica drives it: its task, and what the dispatcher needs to know once it stops."""

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
    # The attempt that is the job's free re-render, once routed (from the job's log, then its stream).
    rerender_attempt: int | None = None
    # The job's scheduling priority (gateway_pb2.Priority), once the driver has read the job: its place
    # in the dispatcher's queue when it is queued again.
    priority: int = 0
    task: asyncio.Task[None] = field(init=False)


class JobDriver:
    def __init__(
        self,
        store: JobStore,
        router: router_pb2_grpc.RouterServiceStub,
        reporter: MetricsReporter,
        spending: Spending,
        settlement: Settlement,
        budget_policy: BudgetPolicy,
        owner: str,
        guarantees: Guarantees | None = None,
    ) -> None:
        self._store = store
        self._router = router
        self._reporter = reporter
        self._spending = spending
        self._settlement = settlement
        self._budget_policy = budget_policy
        self._owner = owner
        # By default the tiers and the account as the process's settings (its environment) say.
        self._guarantees = guarantees or Guarantees.from_settings(GatewaySettings())

    async def drive(self, job_id: str, driver: Drive) -> float | None:
        """Drives the job inside its own trace, the one its CreateRenderJob started: the router,
        renderer and provider calls join it, also when the job is resumed after a restart. Returns how
        long to wait before driving it again when it waits for budget (None: it ended, or was lost:
        ClaimLost)."""
        parent = propagate.extract(await self._store.trace_context(job_id))
        with _tracer.start_as_current_span(
            "dispatch job", context=parent, attributes={"aiprod.job_id": job_id}
        ):
            return await self._drive(job_id, driver)

    async def _record(
        self,
        driver: Drive,
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

    async def _drive(self, job_id: str, driver: Drive) -> float | None:
        job = await self._store.get_job(job_id)
        if job is None or job.state not in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING):
            return None
        driver.priority = job.priority
        delay = _BACKOFF[0]
        while job.state not in TERMINAL_STATES:
            try:
                # Read to the stream's end (the router ends it after the final event): a call left open
                # would keep its span, and the job's trace, unfinished.
                async with contextlib.aclosing(self._render_events(job, driver)) as events:
                    async for event in events:
                        await self._on_event(job, event, driver)
            except BudgetRefused as refused:
                wait = await self._budget_refused(job, refused, driver)
                if wait is not None:
                    return wait  # waits, queued
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
        return None

    async def _on_event(
        self, job: gateway_pb2.RenderJob, event: event_pb2.RenderEvent, driver: Drive
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
        if event.HasField("routed") and event.routed.rerender:
            driver.rerender_attempt = event.attempt
        if event.HasField("charged") and not event.charged.account:
            event.charged.account = self._account(job, event.attempt, driver)
        message, update = _apply(event)
        if event.HasField("charged") and event.charged.account not in ("", job.tenant_id):
            message += f" (the free re-render: {event.charged.account} pays)"
        if event.HasField("routed") and event.routed.reserved.amount_micros:
            # The budget the attempt draws on: the tenant's, or the company's for the free re-render.
            message += await self._spending.level_note(event.routed.account or job.tenant_id)
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
        self, job: gateway_pb2.RenderJob, refused: BudgetRefused, driver: Drive
    ) -> float | None:
        """The budget policy for a job today's budget cannot pay: fails it with BUDGET_EXHAUSTED (None),
        or leaves it queued and says how long it waits at most before it is tried again. A waiting job
        gets one event, whose time starts its wait: the limit holds across restarts."""
        policy = self._budget_policy
        started = job.HasField("budget_wait_start_time")
        waited = time.time() - job.budget_wait_start_time.ToNanoseconds() / 1e9 if started else 0.0
        if not policy.wait or (policy.max_wait_seconds is not None and waited >= policy.max_wait_seconds):
            why = f"{refused} (after {waited:.0f} s waiting for budget)" if policy.wait else str(refused)
            await self._record(
                driver, job.job_id, f"budget refused: {why}", _failed(Reason.BUDGET_EXHAUSTED, why)
            )
            return None
        if not started:
            log.info("job waits for budget", job_id=job.job_id, why=str(refused))
            await self._record(driver, job.job_id, f"waiting for budget: {refused}", _waiting_for_budget)
        delay = policy.retry_seconds
        if policy.max_wait_seconds is not None:
            delay = min(delay, policy.max_wait_seconds - waited)
        return delay

    async def after_lost(self, job_id: str, driver: Drive) -> None:
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
                if not charge.account:
                    charge.account = self._account(job, driver.attempt, driver)
                await record_charge(self._store, job_id, driver.attempt, charge, driver.handle)
                self._settlement.charged()

    def _account(self, job: gateway_pb2.RenderJob, attempt: int, driver: Drive) -> str:
        """The ledger account an attempt of the job draws on: the company's for its free re-render."""
        return self._guarantees.account if attempt == driver.rerender_attempt else job.tenant_id

    async def _rerender_attempt(self, job: gateway_pb2.RenderJob) -> int | None:
        """The attempt the job's log records as its free re-render, if any."""
        if self._guarantees.of(job) is None:
            return None
        found = None
        for recorded in await self._store.events_after(job.job_id, 0):
            if recorded.HasField("render") and recorded.render.routed.rerender:
                found = recorded.render.attempt
        return found

    async def _render_events(
        self, job: gateway_pb2.RenderJob, driver: Drive
    ) -> AsyncIterator[event_pb2.RenderEvent]:
        shot = job.plan.shots[0]
        guarantee = self._guarantees.of(job)
        driver.rerender_attempt = await self._rerender_attempt(job)
        if job.HasField("handle"):
            request = router_pb2.ResumeRenderRequest(
                job_id=job.job_id,
                handle=job.handle,
                shot=shot,
                constraints=quoted_constraints(job),
                attempt=job.attempt,
                tenant_id=job.tenant_id,
                guarantee=guarantee,
                # Granted for the resumed attempt or an earlier one; one routed after it and never
                # started is granted again by the router, for the same attempt and ledger line.
                rerender_granted=driver.rerender_attempt is not None
                and driver.rerender_attempt <= job.attempt,
            )
            stream = self._router.ResumeRender(request)
        else:
            request = router_pb2.ExecuteRenderRequest(
                job_id=job.job_id,
                shot=shot,
                constraints=quoted_constraints(job),
                idempotency_key=job.job_id,
                tenant_id=job.tenant_id,
                guarantee=guarantee,
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
