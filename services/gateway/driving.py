"""Driving one job: its render events from the router, recorded in its log and on the job, fenced by
this replica's claim; its budget policy; and what a driver that lost its job still owes it.

A job's plan is a list of shots; each shot is its own render (its own key at the backend, its own
attempts and ledger lines, QC and fallback), and the shots render side by side, up to
AIPROD_GATEWAY_SHOT_CONCURRENCY and the tenant's tier's concurrent jobs; a continuous shot waits for
the shot before it and starts from its last frame. A job of one shot ends with its shot; a job of
several ends once every shot has: with the film of its shots (aiprod_gateway.films), or failed with
the first shot that failed, its other shots' videos kept on the job. Shots not started when one fails
are not started.

A shot whose render handle was recorded is re-attached with ResumeRender; one without is executed
again under the same render key, which the renderer answers with the render it already started. A
finished shot is never rendered again: a driver that resumes a job after a crash renders only the
unfinished ones, then stitches again.

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
from typing import TypeVar

import grpc
import structlog
from opentelemetry import propagate, trace

from aiprod.common.v1 import backend_pb2, event_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_gateway import attempts
from aiprod_gateway.films import Films
from aiprod_gateway.quoting import quoted_constraints
from aiprod_gateway.reporting import MetricsReporter
from aiprod_gateway.router_renders import RouterRenders
from aiprod_gateway.settlement import Settlement, record_charge
from aiprod_gateway.spending import BudgetRefused
from aiprod_gateway.store import TERMINAL_STATES, Claimed, ClaimLost, Entry, JobStore, JobUpdate
from aiprod_gateway.tiers import TierPolicy, parse_tiers
from aiprod_kit.capabilities import backend_name
from aiprod_kit.errors import error_reason
from aiprod_kit.failures import Reason, failure, reason_name
from aiprod_kit.rendering.stitching import StitchError
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


def render_key(job_id: str, shot: int) -> str:
    """A shot's render key: its idempotency key at the backend and, with ":<attempt>", its attempts'
    ledger lines."""
    return f"{job_id}.shot{shot}"


def shot_status(job: gateway_pb2.RenderJob, index: int) -> gateway_pb2.ShotStatus:
    """The shot's status on the job, listed (every shot of the plan, QUEUED) the first time one is needed."""
    for missing in range(len(job.shots), len(job.plan.shots)):
        job.shots.add(
            index=missing, state=job_pb2.JOB_STATE_QUEUED, render_key=render_key(job.job_id, missing)
        )
    return job.shots[index]


def _overall_progress(job: gateway_pb2.RenderJob) -> float:
    """The job's progress: its shots', each weighted by its duration."""
    total = sum(shot.duration_seconds for shot in job.plan.shots) or 1.0
    done = sum(status.progress * job.plan.shots[status.index].duration_seconds for status in job.shots)
    return min(done / total, 1.0)


def _shot_failed(job: gateway_pb2.RenderJob, index: int, error: render_pb2.RenderFailure) -> None:
    """A shot failed for good; a job of one shot fails with it (one of several, once the rest settled)."""
    status = shot_status(job, index)
    status.state = job_pb2.JOB_STATE_FAILED
    status.error.CopyFrom(error)
    if len(job.plan.shots) == 1:
        job.state = job_pb2.JOB_STATE_FAILED
        job.error.CopyFrom(error)


def _apply(event: event_pb2.RenderEvent, job: gateway_pb2.RenderJob) -> tuple[str, JobUpdate]:
    """The message and the job change that one render event (of one of the job's shots) makes."""
    kind = event.WhichOneof("kind")
    index, several = event.shot, len(job.plan.shots) > 1

    def update(job: gateway_pb2.RenderJob) -> None:
        status = shot_status(job, index)
        if kind == "routed":
            status.backend = event.routed.backend
            status.state = job_pb2.JOB_STATE_RUNNING
            if index == 0 or not job.backend:
                job.backend = event.routed.backend
            attempts.routed(job, index, event.attempt, event.routed)
            if job.state == job_pb2.JOB_STATE_QUEUED:
                # Running once its first attempt is paid for: a job the budget cannot pay stays queued.
                job.state = job_pb2.JOB_STATE_RUNNING
        elif kind == "submitted":
            status.handle.CopyFrom(event.submitted)
            status.attempt = event.attempt
            job.handle.CopyFrom(event.submitted)
            job.attempt = event.attempt
            attempts.submitted(job, index, event.attempt, event.submitted)
        elif kind == "charged":
            attempts.charged(job, index, event.attempt, event.charged)
        elif kind == "progress":
            status.progress = event.progress.fraction
            job.progress = _overall_progress(job)
        elif kind == "succeeded":
            status.state = job_pb2.JOB_STATE_SUCCEEDED
            status.progress = 1.0
            status.output.CopyFrom(event.succeeded)
            if several:
                job.progress = _overall_progress(job)
            else:
                job.state = job_pb2.JOB_STATE_SUCCEEDED
                job.progress = 1.0
                job.result.CopyFrom(event.succeeded)
        elif kind == "failed":
            _shot_failed(job, index, event.failed)

    messages = {
        "routed": lambda: (
            f"routed to {backend_name(event.routed.backend)}: {event.routed.reason}"
            + _elsewhere(job, event.routed)
        ),
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
    message = messages[kind]()
    if several:
        message = f"shot {index + 1} of {len(job.plan.shots)}: {message}"
    return message, update


def _elsewhere(job: gateway_pb2.RenderJob, decision: event_pb2.RouteDecision) -> str:
    """For a shot of a long video routed away from the job's backend (its look may differ): says so."""
    if len(job.plan.shots) < 2 or not job.quote.backend or decision.backend == job.quote.backend:
        return ""
    return f" (not {backend_name(job.quote.backend)}, the job's backend for its other shots)"


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
        return cls(
            settings.gateway_budget_policy == "wait",
            settings.gateway_budget_retry_seconds,
            settings.gateway_budget_max_wait_seconds or None,
        )


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

    # The render each shot's driver follows, as its stream named it (recorded on the job or not yet),
    # with its attempt's number.
    renders: dict[int, tuple[backend_pb2.RenderHandle, int]] = field(default_factory=dict)
    # The driver recorded the job's end itself (which ended its claim) and is settling it.
    ended: bool = False
    # The job as that write left it, once committed: an ended job's state never changes again, so the
    # drive goes on from it rather than reading the job back (two reads a job).
    final: gateway_pb2.RenderJob | None = None
    # Stopped for a cancel made here: the canceller records the end.
    cancelled: bool = False
    # An attempt of this run was charged or held: money went out, whatever the budget says next.
    charged: bool = False
    # Each shot's attempt that is its free re-render, once routed (from the job's log, then its stream).
    rerenders: dict[int, int] = field(default_factory=dict)
    # The job's scheduling priority (gateway_pb2.Priority), once the driver has read the job: its place
    # in the dispatcher's queue when it is queued again.
    priority: int = 0
    # A shot failed for good: shots not started yet are not started (the job fails once the others
    # settled).
    shot_failed: bool = False
    # The job was recorded running (reported once).
    running: bool = False
    task: asyncio.Task[None] = field(init=False)


class JobDriver:
    def __init__(
        self,
        store: JobStore,
        router: router_pb2_grpc.RouterServiceStub,
        reporter: MetricsReporter,
        settlement: Settlement,
        budget_policy: BudgetPolicy,
        owner: str,
        guarantees: Guarantees | None = None,
        films: Films | None = None,
        shot_concurrency: int | None = None,
    ) -> None:
        self._store = store
        self._router = router
        # Each shot's render at the router: over shared streams, not a call each.
        self._renders = RouterRenders(router)
        self._reporter = reporter
        self._settlement = settlement
        self._budget_policy = budget_policy
        self._owner = owner
        # By default the tiers, the account, the video store and the shots at once as the process's
        # settings (its environment) say.
        settings = GatewaySettings()
        self._guarantees = guarantees or Guarantees.from_settings(settings)
        self._films = films or Films.from_settings(settings)
        self._shot_concurrency = shot_concurrency or settings.gateway_shot_concurrency

    async def close(self) -> None:
        """Closes the streams to the router (the jobs' drives have stopped)."""
        await self._renders.close()

    async def drive(self, claimed: Claimed, driver: Drive) -> float | None:
        """Drives the job, as its claim found it, inside its own trace, the one its CreateRenderJob
        started: the router, renderer and provider calls join it, also when the job is resumed after a
        restart. Returns how long to wait before driving it again when it waits for budget (None: it
        ended, or was lost: ClaimLost)."""
        job, trace_context = claimed
        with _tracer.start_as_current_span(
            "dispatch job", context=propagate.extract(trace_context), attributes={"aiprod.job_id": job.job_id}
        ):
            return await self._drive(job, driver)

    async def _record(
        self, driver: Drive, job_id: str, message: str, update: JobUpdate
    ) -> gateway_pb2.RenderJob:
        """Appends one of the driver's events, fenced by this replica's claim (ClaimLost: stop); the job
        as the event wrote it."""
        return await self._record_all(driver, job_id, [Entry(message, update)])

    async def _record_all(self, driver: Drive, job_id: str, entries: list[Entry]) -> gateway_pb2.RenderJob:
        """Appends the driver's events in one transaction, as _record does one."""

        def ending(update: JobUpdate) -> JobUpdate:
            def recorded(job: gateway_pb2.RenderJob) -> None:
                update(job)
                if job.state in TERMINAL_STATES:
                    # Known before the commit that ends the claim: a renewal that finds it gone knows why.
                    driver.ended = True

            return recorded

        fenced = [entry._replace(update=ending(entry.update)) for entry in entries]
        written = await self._store.append_events(job_id, fenced, owner=self._owner)
        if written.state in TERMINAL_STATES:
            driver.final = written
        return written

    async def _latest(self, job_id: str, driver: Drive) -> gateway_pb2.RenderJob:
        """The job as it is now: as the driver's own write that ended it left it, else as stored."""
        if driver.final is not None:
            return driver.final
        job = await self._store.get_job(job_id)
        assert job is not None
        return job

    async def _drive(self, job: gateway_pb2.RenderJob, driver: Drive) -> float | None:
        """Renders every unfinished shot (finished ones are never rendered again), each as its own chain
        of attempts, side by side up to the shot concurrency; then ends the job: its one shot's video,
        its shots' film, or the first shot that failed. job: as claimed (queued or running)."""
        job_id = job.job_id
        driver.priority = job.priority
        driver.rerenders = await self._rerender_attempts(job)
        tier = self._guarantees.tiers.get(job.tier)
        concurrency = self._shot_concurrency
        if tier is not None and tier.concurrent_jobs >= 1:
            concurrency = min(concurrency, int(tier.concurrent_jobs))
        slots = asyncio.Semaphore(concurrency)
        shots = len(job.plan.shots)
        settled = [asyncio.Event() for _ in range(shots)]
        try:
            async with asyncio.TaskGroup() as group:
                for index in range(shots):
                    group.create_task(self._drive_shot(job, index, driver, slots, settled))
        except BaseExceptionGroup as errors:
            # A lost claim stops the job here; a budget refusal (nothing spent) goes to the budget policy.
            lost = _first(errors, ClaimLost)
            if lost is not None:
                raise lost from None
            refused = _first(errors, BudgetRefused)
            if refused is None:
                if len(errors.exceptions) == 1:
                    raise errors.exceptions[0] from None  # the crash as it is, for its log and backoff
                raise
            wait = await self._budget_refused(job, refused, driver)
            if wait is not None:
                return wait  # waits, queued
        job = await self._latest(job_id, driver)
        if job.state not in TERMINAL_STATES:
            await self._end_film(job, driver)
            job = await self._latest(job_id, driver)
        if not driver.ended:
            # It ended elsewhere while this driver recorded nothing (a cancel while the router was away).
            raise ClaimLost(f"job {job_id} ended elsewhere")
        self._reporter.job_changed(job)
        return None

    async def _drive_shot(
        self,
        job: gateway_pb2.RenderJob,
        index: int,
        driver: Drive,
        slots: asyncio.Semaphore,
        settled: list[asyncio.Event],
    ) -> None:
        """Renders one shot until it has ended, re-attached to its recorded render when it has one.
        job: as the drive read it (each shot's render goes by the store's record of it once it ends)."""
        job_id = job.job_id
        try:
            shot = job.plan.shots[index]
            if _shot_ended(job, index):
                return
            if shot.continuous and index > 0 and not _has_image(shot.first_frame):
                # Starts from the shot before's last frame: once that one has its video.
                await settled[index - 1].wait()
                job = await self._store.get_job(job_id)
                assert job is not None
                before = shot_status(job, index - 1)
                if before.state != job_pb2.JOB_STATE_SUCCEEDED:
                    return  # the job fails with that shot
                continued = render_pb2.Shot()
                continued.CopyFrom(shot)
                try:
                    continued.first_frame.CopyFrom(await self._films.last_frame(before.output, index - 1))
                except StitchError as error:
                    why = failure(
                        Reason.INTERNAL, f"no first frame from the shot before: {error}", retryable=False
                    )
                    await self._record(
                        driver, job_id, _shot_prefix(job, index) + why.message, _shot_failing(index, why)
                    )
                    driver.shot_failed = True
                    return
                shot = continued
            if job.spec.reference_images and not shot.reference_images:
                # The spec's reference images, for every shot without its own: given as it renders,
                # rather than copied into every shot of the stored plan.
                referenced = render_pb2.Shot()
                referenced.CopyFrom(shot)
                referenced.reference_images.extend(job.spec.reference_images)
                shot = referenced
            async with slots:
                if driver.shot_failed and not shot_status(job, index).HasField("handle"):
                    return  # not started: the job fails with the shot that did
                await self._render_shot(job, index, shot, driver)
        finally:
            settled[index].set()

    async def _render_shot(
        self, job: gateway_pb2.RenderJob, index: int, shot: render_pb2.Shot, driver: Drive
    ) -> None:
        delay = _BACKOFF[0]
        while True:
            try:
                # Read to the stream's end (the router ends it after the final event): a call left open
                # would keep its span, and the job's trace, unfinished.
                async with contextlib.aclosing(self._render_events(job, index, shot, driver)) as batches:
                    async for events in batches:
                        await self._on_events(job, events, driver)
            except grpc.aio.AioRpcError as error:
                if error.code() not in _TRANSIENT:
                    await self._record(
                        driver,
                        job.job_id,
                        _shot_prefix(job, index) + f"render refused: {error.details()}",
                        _shot_refused(index, error.details() or ""),
                    )
                else:
                    log.warning(
                        "router call broke; will resume",
                        job_id=job.job_id,
                        shot=index,
                        code=error.code().name,
                        reason=error_reason(error),
                        details=error.details(),
                    )
            job = await self._latest(job.job_id, driver)
            if job.state in TERMINAL_STATES or _shot_ended(job, index):
                if shot_status(job, index).state == job_pb2.JOB_STATE_FAILED:
                    driver.shot_failed = True
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF[1])

    async def _end_film(self, job: gateway_pb2.RenderJob, driver: Drive) -> None:
        """Ends a job of several shots once every shot has ended: with the film of its shots, or failed
        with the first shot that failed (the others' videos stay listed on the job)."""
        unfinished = [status for status in job.shots if status.state != job_pb2.JOB_STATE_SUCCEEDED]
        # The first shot that failed; else the first one not rendered.
        failed = next((status for status in unfinished if status.state == job_pb2.JOB_STATE_FAILED), None)
        failed = failed or next(iter(unfinished), None)
        if failed is None and len(job.shots) == len(job.plan.shots):
            try:
                film = await self._films.stitch(job)
            except StitchError as error:
                why = failure(Reason.INTERNAL, f"the shots could not be stitched: {error}", retryable=False)
                await self._record(driver, job.job_id, f"stitching failed: {error}", _failed_with(why))
                return
            video = film.video

            def stitched(job: gateway_pb2.RenderJob) -> None:
                job.state = job_pb2.JOB_STATE_SUCCEEDED
                job.progress = 1.0
                job.result.CopyFrom(film)
                job.result.cost.CopyFrom(job.cost)

            await self._record(
                driver,
                job.job_id,
                f"stitched {len(job.shots)} shots into one {video.duration_seconds:.2f} s video "
                f"({video.width}x{video.height}, {video.frame_rate:g} fps), technical QC score "
                f"{film.qc.score:.2f}",
                stitched,
            )
            return
        index = failed.index if failed is not None else len(job.shots)
        error = render_pb2.RenderFailure()
        if failed is not None:
            error.CopyFrom(failed.error)
        error.message = f"shot {index + 1} of {len(job.plan.shots)} failed: {error.message or 'not rendered'}"
        await self._record(driver, job.job_id, f"render failed: {error.message}", _failed_with(error))

    async def _on_events(
        self, job: gateway_pb2.RenderJob, events: list[event_pb2.RenderEvent], driver: Drive
    ) -> None:
        """Records render events of one shot that came together, in one write (job: as it was when its
        stream began); a budget refusal stops the events there, those before it recorded."""
        entries: list[Entry] = []
        refused = None
        started, charged = False, driver.charged
        for event in events:
            if (
                event.HasField("failed")
                and event.failed.reason == Reason.BUDGET_EXHAUSTED
                and not attempts.may_have_billed(job)
                and not charged
            ):
                # Nothing was spent on it: the budget policy decides (wait, or fail).
                refused = BudgetRefused(event.failed.message)
                break
            entries.append(self._entry(job, event, driver))
            if event.HasField("charged"):
                charged = charged or event.charged.outcome != event_pb2.CHARGE_OUTCOME_RELEASE
            started = started or (
                not driver.running and job.state == job_pb2.JOB_STATE_QUEUED and event.HasField("routed")
            )
        if entries:
            written = await self._record_all(driver, job.job_id, entries)
            recorded = events[: len(entries)]
            if any(event.HasField("charged") for event in recorded):
                driver.charged = charged
                self._settlement.charged(written)
            for event in recorded:
                if event.HasField("fallback"):
                    self._reporter.backend_failed(job, event.fallback)
            if started:
                driver.running = True
                running = gateway_pb2.RenderJob()
                running.CopyFrom(job)
                running.state = job_pb2.JOB_STATE_RUNNING
                self._reporter.job_changed(running)
        if refused is not None:
            raise refused

    def _entry(self, job: gateway_pb2.RenderJob, event: event_pb2.RenderEvent, driver: Drive) -> Entry:
        """One render event as the job's log records it."""
        index = event.shot
        if event.HasField("submitted"):
            # Known before it is recorded: should the job be cancelled elsewhere meanwhile, this
            # replica cancels the render.
            driver.renders[index] = (event.submitted, event.attempt)
        if event.HasField("routed") and event.routed.rerender:
            driver.rerenders[index] = event.attempt
        if event.HasField("charged") and not event.charged.account:
            event.charged.account = self._account(job, index, event.attempt, driver)
        message, update = _apply(event, job)
        if event.HasField("charged") and event.charged.account not in ("", job.tenant_id):
            message += f" (the free re-render: {event.charged.account} pays)"
        if event.HasField("routed") and event.routed.budget_note:
            # The budget the attempt draws on (the tenant's, or the company's for the free re-render),
            # as the ledger answered its reservation.
            message += f"; today's budget is {event.routed.budget_note}"
        return Entry(message, update, event)

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
        job ended elsewhere, cancelled by a replica that settled it and cancelled the renders it found
        recorded."""
        job = await self._store.get_job(job_id)
        if job is None or job.state != job_pb2.JOB_STATE_CANCELLED:
            log.info("job claimed by another replica; stopped driving it", job_id=job_id)
            return
        log.info("job cancelled elsewhere; stopped driving it", job_id=job_id)
        for index, (handle, attempt) in driver.renders.items():
            recorded = job.shots[index].handle if index < len(job.shots) else None
            if recorded is not None and handle.task_id == recorded.task_id:
                continue
            # A render this driver saw start but could not record: nobody else knows to cancel it, nor
            # to record what it costs.
            charge = await cancel_render(self._router, job_id, handle)
            if charge is not None:
                if not charge.account:
                    charge.account = self._account(job, index, attempt, driver)
                self._settlement.charged(
                    await record_charge(self._store, job_id, index, attempt, charge, handle)
                )

    def _account(self, job: gateway_pb2.RenderJob, shot: int, attempt: int, driver: Drive) -> str:
        """The ledger account an attempt of the job draws on: the company's for its free re-render."""
        return self._guarantees.account if driver.rerenders.get(shot) == attempt else job.tenant_id

    async def _rerender_attempts(self, job: gateway_pb2.RenderJob) -> dict[int, int]:
        """Each shot's attempt the job's log records as its free re-render (none before any attempt)."""
        if self._guarantees.of(job) is None or not job.attempts:
            return {}
        found = {}
        for recorded in await self._store.events_after(job.job_id, 0):
            if recorded.HasField("render") and recorded.render.routed.rerender:
                found[recorded.render.shot] = recorded.render.attempt
        return found

    async def _render_events(
        self, job: gateway_pb2.RenderJob, index: int, shot: render_pb2.Shot, driver: Drive
    ) -> AsyncIterator[list[event_pb2.RenderEvent]]:
        guarantee = self._guarantees.of(job)
        constraints = _shot_constraints(job, index)
        status = job.shots[index] if index < len(job.shots) else None
        if status is not None and status.HasField("handle"):
            granted = driver.rerenders.get(index)
            request = router_pb2.ResumeRenderRequest(
                job_id=job.job_id,
                handle=status.handle,
                shot=shot,
                constraints=constraints,
                attempt=status.attempt,
                tenant_id=job.tenant_id,
                guarantee=guarantee,
                # Granted for the resumed attempt or an earlier one; one routed after it and never
                # started is granted again by the router, for the same attempt and ledger line.
                rerender_granted=granted is not None and granted <= status.attempt,
            )
        else:
            request = router_pb2.ExecuteRenderRequest(
                job_id=job.job_id,
                shot=shot,
                constraints=constraints,
                idempotency_key=render_key(job.job_id, index),
                tenant_id=job.tenant_id,
                guarantee=guarantee,
            )
        # Left early (the claim lost, a write failed): the router stops following it for this driver.
        async with contextlib.aclosing(self._renders.run(request, _followed_at_once)) as batches:
            async for events in batches:
                for event in events:
                    event.shot = index
                yield events


def _followed_at_once(event: event_pb2.RenderEvent) -> bool:
    """Whether the router sends another event of the render right after this one: an attempt's charge
    after its QC (once the ledger has it), its end or next attempt after its charge."""
    return event.HasField("qc") or event.HasField("charged")


def _shot_constraints(job: gateway_pb2.RenderJob, index: int) -> render_pb2.RenderConstraints:
    """A shot's constraints: the job's quoted ones, its cost limit shared among the shots by duration."""
    constraints = quoted_constraints(job)
    if len(job.plan.shots) > 1 and constraints.HasField("max_cost"):
        total = sum(shot.duration_seconds for shot in job.plan.shots)
        share = job.plan.shots[index].duration_seconds / total
        constraints.max_cost.amount_micros = math.floor(constraints.max_cost.amount_micros * share)
    return constraints


def _shot_refused(index: int, message: str) -> JobUpdate:
    return _shot_failing(index, failure(Reason.ROUTER_REFUSED, message, retryable=False))


def _shot_failing(index: int, error: render_pb2.RenderFailure) -> JobUpdate:
    def update(job: gateway_pb2.RenderJob) -> None:
        _shot_failed(job, index, error)

    return update


E = TypeVar("E", bound=BaseException)


def _first(errors: BaseExceptionGroup, kind: type[E]) -> E | None:
    """The first of a task group's errors of a kind."""
    return next((error for error in errors.exceptions if isinstance(error, kind)), None)


def _shot_ended(job: gateway_pb2.RenderJob, index: int) -> bool:
    return index < len(job.shots) and job.shots[index].state in TERMINAL_STATES


def _shot_prefix(job: gateway_pb2.RenderJob, index: int) -> str:
    return f"shot {index + 1} of {len(job.plan.shots)}: " if len(job.plan.shots) > 1 else ""


def _has_image(image: render_pb2.Image) -> bool:
    return bool(image.data or image.uri)


def _waiting_for_budget(job: gateway_pb2.RenderJob) -> None:
    job.budget_wait_start_time.GetCurrentTime()


def _failed(reason: int, message: str) -> JobUpdate:
    return _failed_with(failure(reason, message, retryable=False))


def _failed_with(error: render_pb2.RenderFailure) -> JobUpdate:
    def update(job: gateway_pb2.RenderJob) -> None:
        job.state = job_pb2.JOB_STATE_FAILED
        job.error.CopyFrom(error)

    return update
