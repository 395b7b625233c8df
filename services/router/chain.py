"""The fallback chain of one render: route, reserve, start, follow, and on a retryable failure or a
QC score under the floor, move to the next backend, within the job's attempt and cost limits.

Paying once: an attempt ends at its backend (succeeded, failed, cancelled, or known never started)
before the next one starts. A renderer that vanishes mid-render is waited for and re-attached to; the
local renderer's renders die with its process, so there the attempt is known to have ended. A render
that may still run somewhere unseen is reported as uncertain and never sent again.

Recording every dollar: each attempt at a paid backend reserves its worst case in the ledger under its
own key (the render's idempotency key) before its provider is called; the chain never starts an
attempt it cannot reserve. A repeated reservation (this attempt was started before a restart) names
the backend it was made for, and the attempt goes there again, so one key never reaches two backends.
When an attempt ends the chain says what it costs (a `charged` event: commit what the provider bills,
release when it is known not to bill, hold when nobody can know); the gateway records that and settles
the ledger, durably.

Whose money: each attempt is reserved under the job's tenant (its budget also ranks the backends), but
for the free re-render a tenant's service level grants. An attempt that delivers an output whose QC
score is under the guarantee's quality minimum earns the job one re-render (one per job, ever: a
resumed render says whether it was granted already), routed only to a backend of higher nominal
quality than the one that delivered it, reserved under the guarantee's account (the company's) and
allowed one attempt past the attempt limit. Its `routed` event says so (rerender, account), and every
`charged` event names the account that pays, but the resumed attempt's after the re-render was granted
(the router cannot know which attempt that was; the caller, which recorded the routed events, does).
The output that earned it stays the job's if nothing better comes; when no better backend qualifies
(or the company's budget cannot pay), the output is delivered as it is, or the usual fallback from an
output under the floor applies. A key reserved before a restart under the other account is the
attempt as it was reserved: its account and backend are kept.
"""

import asyncio
import enum
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import structlog
from google.protobuf import timestamp_pb2
from opentelemetry import propagate, trace

from aiprod.common.v1 import backend_pb2, event_pb2, render_pb2
from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod.renderer.v1 import renderer_pb2
from aiprod.router.v1 import router_pb2
from aiprod_kit.capabilities import backend_name
from aiprod_kit.errors import ErrorReason, Unavailable, error_reason
from aiprod_kit.exclusions import budget_alone_blocks
from aiprod_kit.failures import Reason, failure, reason_name
from aiprod_kit.money import budget_level_name, usd
from aiprod_kit.settings import RouterSettings
from aiprod_kit.sharing import SharedReads
from aiprod_router.backends import Renderer, RendererPool
from aiprod_router.policy import Candidate, RouteRequest, describe, rank_backends, views_of
from aiprod_router.stats import Outcome
from aiprod_router.telemetry import RouterMetrics
from aiprod_router.watches import FINAL_RENDER_STATES, WatchBroken

log = structlog.get_logger()
_tracer = trace.get_tracer("aiprod.router")

# A renderer's answers that say the render itself is wrong: no retry there can help.
_REFUSALS = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE}
)
_BUDGET_TIMEOUT = 2.0
_LEDGER_TIMEOUT = 5.0
# Accounts of the attempts this router reserved recently, for a cancel or a reconciliation to name.
_KNOWN_ACCOUNTS = 10_000
# A StartRender waits for a task slot at its renderer and for the provider's create: long, but bounded.
_START_TIMEOUT = 300.0
# Between a renderer's AT_CAPACITY (it waited for a task slot, AIPROD_<PROVIDER>_SLOT_WAIT_SECONDS) and
# the next StartRender of the same attempt.
_SLOT_RETRY_SECONDS = 0.5
# A render's progress is passed on once it moved this much since the last passed on, or moved at all this
# long after it: each is an event in the job's log, a write there and a message to every watcher. The
# first counts from 0% and the follow's start (a render at 0% says nothing its submission did not).
_PROGRESS_STEP = 0.05 - 1e-9  # (as floats add up: 0.15 - 0.10 < 0.05)
_PROGRESS_SECONDS = 10.0
# Asking a renderer for the render under a key. It waits while a create under the key is under way;
# past this, the chain waits for the renderer and asks StartRender again, which waits for it too.
_LOOKUP_TIMEOUT = 10.0
# Failures of an attempt that created nothing and may pass on another try: the provider or its renderer
# was busy or briefly down (the renderer's own retries of the create ran out meanwhile).
_TRANSIENT_REFUSALS = frozenset(
    {Reason.PROVIDER_UNAVAILABLE, Reason.PROVIDER_RATE_LIMITED, Reason.RENDERER_UNAVAILABLE}
)
# Before a render goes round again to backends that only refused it (see RenderChain.run).
_ROUND_AGAIN_SECONDS = 1.0


def event(attempt: int, **kind: object) -> event_pb2.RenderEvent:
    time_now = timestamp_pb2.Timestamp()
    time_now.GetCurrentTime()
    return event_pb2.RenderEvent(time=time_now, attempt=attempt, **kind)  # type: ignore[arg-type]


def attempt_key(idempotency_key: str, attempt: int) -> str:
    """An attempt's key: its render's idempotency key at the backend and its line in the ledger."""
    return f"{idempotency_key}:{attempt}"


@dataclass(frozen=True)
class RenderJob:
    """What a chain needs of the job."""

    job_id: str
    shot: render_pb2.Shot
    constraints: render_pb2.RenderConstraints
    idempotency_key: str
    # The ledger tenant whose budget pays for the attempts ("": the ledger's default tenant).
    tenant_id: str = ""
    # The tenant's service level's quality promise, if any.
    guarantee: router_pb2.QualityGuarantee | None = None
    # The job's free re-render was granted before (a resumed render).
    rerender_granted: bool = False

    @property
    def quality_minimum(self) -> float:
        """The quality minimum whose miss earns a re-render; 0: no guarantee."""
        return self.guarantee.quality_minimum if self.guarantee is not None else 0.0


@dataclass
class _Guarantee:
    """A chain's free re-render: whether it was granted, and the output that earned it."""

    granted: bool
    # The output under the minimum that earned it: the job's if nothing better comes.
    kept: render_pb2.RenderOutput | None = None


class _BudgetRefused(Exception):
    """The ledger would not reserve an attempt: the chain stops rather than start it unpaid."""


@dataclass(frozen=True)
class _Reserved:
    """An attempt's line in the ledger, as the attempt starts with it."""

    # The renderer to start it at (the backend a reservation made before a restart names).
    renderer: Renderer
    # Its reservation key; "" for a free render.
    key: str
    amount: int
    # The account it draws on, and whether it is the free re-render.
    account: str
    rerender: bool
    # Today's budget use from the notify level on, for the routed event (`budget_note`).
    budget_note: str = ""


class _KeyConflict(Exception):
    """The attempt's key was reserved under another tenant (or job)."""


class _Record(enum.Enum):
    """A renderer's record of a key, when it has no render under it to show."""

    # No create was ever claimed under the key: nothing reached the provider.
    NONE = "none"
    # The renderer cannot say now.
    UNKNOWN = "unknown"


@dataclass
class Cause:
    backend: int
    failure: render_pb2.RenderFailure
    # A finished output under the floor, kept in case nothing better comes.
    output: render_pb2.RenderOutput | None = None
    # The output is under the guarantee's minimum and the job's free re-render is still to be granted.
    earns_rerender: bool = False
    # The output is under the job's quality floor (else only under the guarantee's minimum).
    under_floor: bool = False
    # The nominal quality of the backend that delivered it: the re-render must do better.
    quality: float = 0.0


class AttemptResult:
    """How one attempt ended: a final event for the chain, or a cause to fall back from.

    Each attempt is a span of the job's trace; the renderer's calls are made inside it (never across a
    yield: the chain is an async generator, and a span made current there would leak to its reader).
    """

    def __init__(
        self,
        attempt: int,
        renderer: Renderer,
        job: RenderJob,
        reservation_key: str,
        resumed: bool = False,
        account: str = "",
        attempt_limit: int = 0,
        may_rerender: bool = False,
    ) -> None:
        self.attempt = attempt
        # The highest attempt number the chain may reach: an output under the floor before it falls back.
        self.attempt_limit = attempt_limit
        # An output under the guarantee's minimum earns the free re-render.
        self.may_rerender = may_rerender
        self.span = _tracer.start_span(
            "render attempt",
            attributes={
                "aiprod.backend": renderer.name,
                "aiprod.attempt": attempt,
                "aiprod.job_id": job.job_id,
                "aiprod.resumed": resumed,
            },
        )
        self.final: event_pb2.RenderEvent | None = None
        self.cause: Cause | None = None
        self.cost_micros = 0
        self.seconds = 0.0
        # What the attempt costs, once it ended (the chain's `charged` event), and who pays.
        self.charge = event_pb2.AttemptCharge(
            reservation_key=reservation_key, backend=renderer.backend, account=account
        )

    @property
    def refused(self) -> bool:
        """It ended before anything was created, refused for a reason that may pass (nothing to pay)."""
        return (
            self.cause is not None
            and self.cause.failure.reason in _TRANSIENT_REFUSALS
            and not self.charge.task_id
            and self.charge.outcome == event_pb2.CHARGE_OUTCOME_RELEASE
        )

    def end(
        self,
        renderer: Renderer,
        reason: render_pb2.RenderFailure,
        seconds: float = 0.0,
        outcome: int = event_pb2.CHARGE_OUTCOME_RELEASE,
    ) -> None:
        self.cause = Cause(renderer.backend, reason)
        self.seconds = seconds
        self.charge.outcome = outcome
        self.charge.failure.CopyFrom(reason)

    @staticmethod
    def charge_of(
        renderer: Renderer, reservation_key: str, render: renderer_pb2.Render
    ) -> event_pb2.AttemptCharge:
        """What a render that ended costs, for a caller outside a chain (a cancel)."""
        charge = event_pb2.AttemptCharge(reservation_key=reservation_key, backend=renderer.backend)
        charge.failure.CopyFrom(render.failure)
        if render.state == renderer_pb2.RENDER_STATE_SUCCEEDED:
            charge.output.CopyFrom(render.output)
        _price(charge, render)
        return charge

    def ended_at_backend(self, render: renderer_pb2.Render) -> None:
        """What a render that ended at its renderer costs, by its provider's rules as the renderer
        applied them. A create whose outcome is unknown bills or not: held until reconciled."""
        self.cost_micros = _price(self.charge, render)

    def close(self) -> None:
        if self.cause is not None:
            self.span.set_attribute("aiprod.failure_reason", reason_name(self.cause.failure.reason))
            self.span.set_status(trace.StatusCode.ERROR, self.cause.failure.message)
        self.span.end()


class RenderChain:
    def __init__(
        self,
        pool: RendererPool,
        metrics: metrics_pb2_grpc.MetricsServiceStub,
        settings: RouterSettings,
        telemetry: RouterMetrics,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._settings = settings
        self._telemetry = telemetry
        # Reservation key -> the account it was reserved under, for the attempts reserved here lately.
        self._accounts: OrderedDict[str, str] = OrderedDict()
        # The renders routed while a tenant's budget is read share the reading.
        self._budget = SharedReads(self._read_budget)

    def account_of(self, reservation_key: str) -> str:
        """The account an attempt this router reserved draws on; "" when it does not know (reserved by
        another router, or before a restart)."""
        return self._accounts.get(reservation_key, "")

    def _remember(self, reservation_key: str, account: str) -> None:
        if not reservation_key:
            return
        self._accounts[reservation_key] = account
        self._accounts.move_to_end(reservation_key)
        while len(self._accounts) > _KNOWN_ACCOUNTS:
            self._accounts.popitem(last=False)

    # Ranking ------------------------------------------------------------------------------------

    async def route_request(
        self, job: RenderJob, tried: frozenset[int], spent_micros: int, rerender_above: float | None = None
    ) -> RouteRequest:
        """The request to rank the backends on. rerender_above: for the free re-render, the nominal
        quality to beat; the company's account pays it, so its budget ranks, not the job's cost limit."""
        constraints = job.constraints
        rerender = rerender_above is not None and job.guarantee is not None
        account = job.guarantee.account if rerender and job.guarantee is not None else job.tenant_id
        remaining, economy = await self._budget(account)
        max_cost = None
        if constraints.HasField("max_cost") and not rerender:
            max_cost = max(constraints.max_cost.amount_micros - spent_micros, 0)
        seconds_left = None
        if constraints.HasField("deadline"):
            # From the Timestamp's own fields: a naive datetime's timestamp() would read it as local time.
            seconds_left = constraints.deadline.seconds + constraints.deadline.nanos / 1e9 - time.time()
        return RouteRequest(
            shot=job.shot,
            quality_floor=constraints.quality_floor,
            max_cost_micros=max_cost,
            seconds_left=seconds_left,
            preferred_backend=constraints.preferred_backend,
            preferred_model=constraints.preferred_model,
            budget_remaining_micros=remaining,
            economy=economy,
            tried=tried,
            quality_first_budget_micros=round(self._settings.router_quality_first_budget_usd * 1e6) or None,
            quality_above=rerender_above if rerender else None,
        )

    async def _read_budget(self, tenant_id: str) -> tuple[int | None, bool]:
        """What is left of the tenant's budget today (None: no cap of its own, or the ledger cannot say)
        and economy mode. Everyone's cap is the ledger's to hold: a reservation it refuses stops the
        chain as a spent budget does, so a reading is advice (and shared: self._budget)."""
        try:
            budget = (
                await self._metrics.GetBudget(
                    metrics_pb2.GetBudgetRequest(tenant_id=tenant_id), timeout=_BUDGET_TIMEOUT
                )
            ).budget
        except grpc.aio.AioRpcError as error:
            log.warning("budget unknown: routing without it", code=error.code().name, tenant=tenant_id)
            return None, False
        if budget.cap.amount_micros <= 0:
            return None, False
        economy = budget.level in (metrics_pb2.BUDGET_LEVEL_ECONOMY, metrics_pb2.BUDGET_LEVEL_EXHAUSTED)
        return budget.remaining.amount_micros, economy

    def rank(self, request: RouteRequest) -> list[Candidate]:
        return rank_backends(request, views_of(self._pool.renderers.values(), request.shot.duration_seconds))

    # The chain ----------------------------------------------------------------------------------

    async def run(
        self, job: RenderJob, resume: backend_pb2.RenderHandle | None = None, resume_attempt: int = 1
    ) -> AsyncIterator[event_pb2.RenderEvent]:
        """Every event of the render, each attempt's `charged` among them, ending with exactly one final
        event (succeeded or failed).

        Each attempt goes to the best backend not tried yet. Once none is left, attempts remaining, the
        backends that only refused (busy or briefly down, nothing created) are tried again after a pause,
        once: a storm at every qualifying provider at once need not fail a job that another try saves."""
        tried: set[int] = set()
        refused: set[int] = set()
        # The backends being tried again after they refused.
        again: set[int] = set()
        # What the tenant's attempts cost so far, against the job's cost limit (the re-render is not its).
        spent = 0
        attempt = resume_attempt if resume is not None else 1
        cause: Cause | None = None
        guarantee = _Guarantee(granted=job.rerender_granted)
        # The free re-render's route, once an output earned it.
        rerender: tuple[RouteRequest, list[Candidate]] | None = None
        if resume is not None:
            renderer = self._pool.get(resume.backend)
            if renderer is None:
                yield event(
                    attempt,
                    failed=failure(Reason.UNKNOWN_BACKEND, "the recorded backend is not configured", False),
                )
                return
            # Whose the resumed attempt is: the tenant's unless the re-render was granted before the
            # restart, when it may be that re-render (the caller knows: left empty).
            account = self.account_of(resume.idempotency_key) or ("" if guarantee.granted else job.tenant_id)
            result = AttemptResult(
                attempt,
                renderer,
                job,
                resume.idempotency_key,
                resumed=True,
                account=account,
                attempt_limit=self._limit(guarantee),
                may_rerender=self._may_rerender(job, guarantee),
            )
            async for item in _spanned(result, self._follow(renderer, resume.task_id, attempt, job, result)):
                yield item
            rerender = await self._conclude(job, result, tried | {resume.backend}, spent)
            yield event(attempt, charged=result.charge)
            if result.final is not None:
                yield _delivered(result.final, guarantee)
                return
            tried.add(resume.backend)
            if account == job.tenant_id:
                spent += result.cost_micros
            cause = result.cause
            attempt += 1
        while True:
            is_rerender = rerender is not None
            if rerender is not None:
                request, candidates = rerender
                rerender = None
            else:
                request = await self.route_request(job, frozenset(tried), spent)
                candidates = self.rank(request)
                if refused and attempt <= self._limit(guarantee) and not any(c.eligible for c in candidates):
                    log.info(
                        "going round again",
                        job_id=job.job_id,
                        backends=[backend_name(b) for b in sorted(refused)],
                    )
                    tried -= refused
                    again |= refused
                    refused.clear()
                    await asyncio.sleep(_ROUND_AGAIN_SECONDS)
                    request = await self.route_request(job, frozenset(tried), spent)
                    candidates = self.rank(request)
            eligible = [candidate for candidate in candidates if candidate.eligible]
            if cause is not None and not is_rerender:
                if attempt > self._limit(guarantee) or not eligible:
                    if eligible:
                        why = "no attempts left"
                    elif budget_alone_blocks(c.exclusions for c in candidates):
                        why = "no other backend within the budget left"
                    else:
                        why = "no other backend qualifies"
                    yield _delivered(_last_word(cause, attempt - 1, why), guarantee)
                    return
            if not eligible:
                yield _delivered(event(attempt, failed=_no_backend(request, candidates)), guarantee)
                return
            chosen = eligible[0]
            # Takes a half-open breaker's one trial: granted, as ranking just saw it free with no await since.
            self._pool.get(chosen.backend).breaker.allow_request()  # type: ignore[union-attr]
            try:
                reservation = await self._reserve(job, attempt, chosen, is_rerender)
            except _BudgetRefused as refused:
                if is_rerender and cause is not None:
                    # The company's account cannot pay it now: as if no better backend qualified.
                    log.warning("free re-render refused by the ledger", job_id=job.job_id, why=str(refused))
                    cause.earns_rerender = False
                    if cause.under_floor:
                        continue
                    yield _delivered(
                        _last_word(cause, attempt - 1, "no budget for the free re-render"), guarantee
                    )
                elif cause is not None:
                    why = f"no budget for another attempt: {refused}"
                    yield _delivered(_last_word(cause, attempt - 1, why), guarantee)
                else:
                    yield event(attempt, failed=failure(Reason.BUDGET_EXHAUSTED, str(refused), False))
                return
            if reservation is None:
                # This attempt ended in an earlier run (its ledger line is settled): go on after it.
                tried.add(chosen.backend)
                if is_rerender:
                    guarantee.granted = True
                    guarantee.kept = cause.output if cause is not None else None
                attempt += 1
                continue
            renderer, key, account = reservation.renderer, reservation.key, reservation.account
            is_rerender = reservation.rerender  # a key reserved before a restart keeps its account
            self._remember(key, account)
            if is_rerender and not guarantee.granted:
                guarantee.granted = True
                if cause is not None and cause.output is not None:
                    guarantee.kept = cause.output
            if cause is not None:
                self._telemetry.fell_back(cause.backend, renderer.backend, cause.failure.reason)
                yield event(
                    attempt - 1,
                    fallback=event_pb2.Fallback(
                        from_backend=cause.backend, to_backend=renderer.backend, cause=cause.failure
                    ),
                )
            reason = describe(chosen)
            # The offer chosen; at a backend pinned by an earlier reservation, its default.
            offer = (chosen.model, chosen.resolution) if renderer.backend == chosen.backend else ("", "")
            if renderer.backend != chosen.backend:
                reason = f"the backend this attempt reserved for before a restart ({reason} now ranks first)"
            if renderer.backend in again:
                reason = f"again, as every backend that qualifies refused the render: {reason}"
            if is_rerender:
                reason = f"free re-render of an output under the service level's minimum, paid by {account}: {reason}"
            yield event(
                attempt,
                routed=event_pb2.RouteDecision(
                    backend=renderer.backend,
                    reason=reason,
                    estimated_cost=usd(chosen.list_cost_micros),
                    reservation_key=key,
                    reserved=usd(reservation.amount),
                    account=account,
                    rerender=is_rerender,
                    model=offer[0],
                    resolution=offer[1],
                    budget_note=reservation.budget_note,
                ),
            )
            result = AttemptResult(
                attempt,
                renderer,
                job,
                key,
                account=account,
                attempt_limit=self._limit(guarantee),
                may_rerender=self._may_rerender(job, guarantee),
            )
            async for item in _spanned(result, self._attempt(renderer, job, attempt, result, *offer)):
                yield item
            rerender = await self._conclude(job, result, tried | {renderer.backend}, spent)
            yield event(attempt, charged=result.charge)
            if result.final is not None:
                yield _delivered(result.final, guarantee)
                return
            tried.add(renderer.backend)
            if result.refused and renderer.backend not in again:
                refused.add(renderer.backend)
            if not is_rerender:
                spent += result.cost_micros
            cause = result.cause
            attempt += 1

    def _limit(self, guarantee: _Guarantee) -> int:
        """The highest attempt number: the configured limit, and one more once the re-render is granted."""
        return self._settings.router_max_attempts + (1 if guarantee.granted else 0)

    @staticmethod
    def _may_rerender(job: RenderJob, guarantee: _Guarantee) -> bool:
        return not guarantee.granted and job.quality_minimum > 0 and job.guarantee is not None

    async def _conclude(
        self, job: RenderJob, result: AttemptResult, tried: set[int], spent: int
    ) -> tuple[RouteRequest, list[Candidate]] | None:
        """After an attempt whose output earned the free re-render: its route (a backend of better
        quality qualifies), or, when none does, the attempt as it would have ended without the
        guarantee: its output delivered, or the usual fallback from an output under the floor."""
        cause = result.cause
        if cause is None or not cause.earns_rerender or job.guarantee is None:
            return None
        request = await self.route_request(job, frozenset(tried), spent, rerender_above=cause.quality)
        candidates = self.rank(request)
        if any(candidate.eligible for candidate in candidates):
            return request, candidates
        cause.earns_rerender = False
        log.info(
            "no better backend for the free re-render",
            job_id=job.job_id,
            score=cause.output.qc.score if cause.output is not None else None,
            reasons="; ".join(describe(candidate) for candidate in candidates),
        )
        if not cause.under_floor or result.attempt >= result.attempt_limit:
            # Delivered as it is: nothing better may be tried.
            assert cause.output is not None
            result.charge.ClearField("failure")
            result.cause = None
            result.final = event(result.attempt, succeeded=cause.output)
            return None
        # Under the floor as well: the usual fallback, at the tenant's cost.
        assert cause.output is not None
        floor = job.constraints.quality_floor
        cause.failure.message = f"QC score {cause.output.qc.score:.2f} under the floor {floor:.2f}"
        result.charge.failure.CopyFrom(cause.failure)
        return None

    async def _reserve(
        self, job: RenderJob, attempt: int, chosen: Candidate, rerender: bool = False
    ) -> _Reserved | None:
        """Reserves the attempt's worst case at the chosen backend before its provider is called, under
        the tenant's account or, for the free re-render, the guarantee's (a key reserved before a
        restart under the other account keeps it); None when the attempt's line is settled already.
        Raises _BudgetRefused, or Unavailable when the ledger is away
        (the caller tries again later: nothing starts unreserved)."""
        renderer = self._pool.get(chosen.backend)
        assert renderer is not None
        company = job.guarantee.account if job.guarantee is not None else ""
        account = company if rerender else job.tenant_id
        if chosen.list_cost_micros <= 0:
            return _Reserved(renderer, "", 0, account, rerender)
        key = attempt_key(job.idempotency_key, attempt)
        try:
            response = await self._reserve_as(job, attempt, chosen, key, account)
        except _KeyConflict:
            if not company or company == job.tenant_id:
                raise Unavailable(
                    f"attempt {attempt}'s key {key} was reserved for another job or tenant: not started",
                    reason=ErrorReason.LEDGER_UNAVAILABLE,
                ) from None
            # Reserved before a restart under the other account: the attempt stays what it was.
            rerender = not rerender
            account = company if rerender else job.tenant_id
            log.info(
                "attempt keeps the account it reserved under", job_id=job.job_id, key=key, account=account
            )
            try:
                response = await self._reserve_as(job, attempt, chosen, key, account)
            except _KeyConflict:
                raise Unavailable(
                    f"attempt {attempt}'s key {key} was reserved for another job: not started",
                    reason=ErrorReason.LEDGER_UNAVAILABLE,
                ) from None
        if response is None:
            return None
        reservation = response.reservation
        if response.existing and reservation.backend != chosen.backend:
            pinned = self._pool.get(reservation.backend)
            if pinned is not None:
                log.info(
                    "attempt goes to the backend it reserved for", job_id=job.job_id, backend=pinned.name
                )
                renderer = pinned
        return _Reserved(
            renderer, key, reservation.amount.amount_micros, account, rerender, _budget_note(response)
        )

    async def _reserve_as(
        self, job: RenderJob, attempt: int, chosen: Candidate, key: str, account: str
    ) -> metrics_pb2.ReserveBudgetResponse | None:
        """ReserveBudget under the account; None when the attempt's line is settled already. Raises
        _BudgetRefused, _KeyConflict (the key is another tenant's or job's), or Unavailable."""
        request = metrics_pb2.ReserveBudgetRequest(
            reservation_key=key,
            tenant_id=account,
            amount=usd(chosen.list_cost_micros),
            job_id=job.job_id,
            backend=chosen.backend,
        )
        try:
            return await self._metrics.ReserveBudget(request, timeout=_LEDGER_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            reason = error_reason(error)
            if reason == ErrorReason.BUDGET_EXHAUSTED:
                raise _BudgetRefused(error.details() or "today's budget is spent") from error
            if reason == ErrorReason.RESERVATION_SETTLED:
                log.info("attempt settled in an earlier run; going on after it", job_id=job.job_id, key=key)
                return None
            if reason == ErrorReason.RESERVATION_KEY_CONFLICT:
                raise _KeyConflict(error.details() or key) from error
            raise Unavailable(
                f"the spend ledger cannot reserve attempt {attempt} ({error.code().name}): not started",
                reason=ErrorReason.LEDGER_UNAVAILABLE,
            ) from error

    async def _attempt(
        self,
        renderer: Renderer,
        job: RenderJob,
        attempt: int,
        result: AttemptResult,
        model: str,
        resolution: str,
    ) -> AsyncIterator[event_pb2.RenderEvent]:
        # One key per attempt: a retried call or a restarted caller never starts a second render.
        request = renderer_pb2.StartRenderRequest(
            idempotency_key=attempt_key(job.idempotency_key, attempt), shot=job.shot, model=model
        )
        if resolution:
            # The offer's resolution, on this attempt's copy: the job's own shot keeps what it asked
            # for, so that a fallback may choose another.
            request.shot.resolution = resolution
        started = await self._start(renderer, request, result)
        if started is None:
            self._settle(renderer, result, self._settings)
            return
        if not started.handle.task_id:
            result.end(renderer, started.failure)
            result.ended_at_backend(started)
            self._settle(renderer, result, self._settings)
            return
        yield event(attempt, submitted=started.handle)
        async for item in self._follow(renderer, started.handle.task_id, attempt, job, result):
            yield item

    async def _start(
        self, renderer: Renderer, request: renderer_pb2.StartRenderRequest, result: AttemptResult
    ) -> renderer_pb2.Render | None:
        """StartRender. A call that failed (but for a refusal) may or may not have reached the provider:
        the renderer's record of the key says which (_recorded). When it cannot say, the renderer is
        waited for and asked again under the same key (its key store answers for the key: its task,
        or that the create's outcome is unknown); an attempt nobody can answer for is held. A renderer
        at its concurrent tasks (AT_CAPACITY) is asked again until a slot frees. None: the attempt
        ended without a render (result says why and what it costs)."""
        key = request.idempotency_key
        asked, waited = 0, False
        while asked < 2:
            try:
                with trace.use_span(result.span):
                    return (await renderer.stub.StartRender(request, timeout=_START_TIMEOUT)).render
            except grpc.aio.AioRpcError as error:
                if error_reason(error) == ErrorReason.AT_CAPACITY:
                    # Nothing was started and its renders at once are bounded there: the job waits its
                    # turn for the backend it was routed to (each call waits for a slot), holding its
                    # reservation, rather than failing or falling back to a dearer backend.
                    if not waited:
                        log.info("waiting for a task slot", backend=renderer.name, key=key)
                        waited = True
                    await asyncio.sleep(_SLOT_RETRY_SECONDS)  # a renderer set to wait for no slot
                    continue
                if error.code() in _REFUSALS:
                    result.end(renderer, failure(Reason.RENDER_REFUSED, error.details() or "", False))
                    return None
                broken = failure(Reason.RENDERER_UNAVAILABLE, f"{error.code().name}: {error.details()}", True)
                # A call that ran out of time may still run at the renderer (waiting for a task slot,
                # or its create under way): only the renderer answering StartRender again can tell.
                # Any other failure ended the call there too, or it never got there.
                ran_out = error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            record = _Record.UNKNOWN if ran_out else await self._recorded(renderer, key, result)
            if record is _Record.NONE:
                # Nothing reached the provider: released, and the chain falls back as after any refusal
                # before a create.
                broken.message += f"; nothing was started under key {key}"
                result.end(renderer, broken)
                return None
            if record is not _Record.UNKNOWN:
                return record
            if asked == 0 and await self._reachable(renderer, self._settings.router_reattach_seconds):
                asked += 1
                continue
            # The create may have been sent: the key is not reused and its money stays held until
            # reconciled.
            result.end(renderer, broken, outcome=event_pb2.CHARGE_OUTCOME_HOLD)
            return None
        return None

    async def _recorded(
        self, renderer: Renderer, key: str, result: AttemptResult
    ) -> renderer_pb2.Render | _Record:
        """What the renderer did under the key of a StartRender that failed and is over there: the
        render under the key (as StartRender would have answered), or its record's word. A call over
        at the renderer claimed the key before it sent a create, or never will (the renderer frees the
        key of a call whose caller went away before its create), so no claim means nothing was sent.
        Asked over the records channel: a renderer that is not serving still answers for its keys."""
        lookup = renderer_pb2.GetRenderRequest(idempotency_key=key)
        try:
            with trace.use_span(result.span):
                return (await renderer.records.GetRender(lookup, timeout=_LOOKUP_TIMEOUT)).render
        except grpc.aio.AioRpcError as error:
            # The renderer's own NOT_FOUND (it carries an ErrorInfo), not one a proxy or gRPC made up.
            if error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error):
                return _Record.NONE
            log.warning(
                "renderer cannot say what it did under a key",
                backend=renderer.name,
                key=key,
                code=error.code().name,
            )
            return _Record.UNKNOWN

    async def _follow(
        self, renderer: Renderer, task_id: str, attempt: int, job: RenderJob, result: AttemptResult
    ) -> AsyncIterator[event_pb2.RenderEvent]:
        """Follows a render to its end at its renderer, re-attaching when the renderer comes back."""
        started = time.monotonic()
        last_progress, progressed_at = 0.0, started
        # The attempt's trace, for the renderer's work on this render (a re-attach after a restart).
        trace_context: dict[str, str] = {}
        propagate.inject(trace_context, context=trace.set_span_in_context(result.span))
        while True:
            final: renderer_pb2.Render | None = None
            try:
                async for render in renderer.watches.follow(task_id, trace_context):
                    if render.state in FINAL_RENDER_STATES:
                        final = render  # the last news: the watch ends with it
                        continue
                    moved = abs(render.progress - last_progress)
                    if moved >= _PROGRESS_STEP or (
                        moved and time.monotonic() - progressed_at >= _PROGRESS_SECONDS
                    ):
                        last_progress, progressed_at = render.progress, time.monotonic()
                        yield event(attempt, progress=event_pb2.RenderProgress(fraction=render.progress))
            except WatchBroken as error:
                if error.code == grpc.StatusCode.NOT_FOUND:
                    # The renderer came back without it: the render died with the renderer's process.
                    result.end(
                        renderer,
                        failure(Reason.RENDER_LOST, "the renderer lost the render (restarted)", True),
                        outcome=_unknown(renderer),
                    )
                    self._settle(renderer, result, self._settings)
                    return
                log.warning(
                    "renderer stream broke", backend=renderer.name, task_id=task_id, code=error.code.name
                )
            if final is not None:
                async for item in self._finish(renderer, final, attempt, job, result, started):
                    yield item
                return
            if renderer.backend == backend_pb2.BACKEND_LOCAL and not await self._reachable(renderer, 0.5):
                result.end(
                    renderer, failure(Reason.RENDER_LOST, "the local renderer stopped mid-render", True)
                )
                self._settle(renderer, result, self._settings)
                return
            if not await self._reachable(renderer, self._settings.router_reattach_seconds):
                result.end(
                    renderer,
                    failure(
                        Reason.RENDER_UNCERTAIN,
                        f"the {renderer.name} renderer vanished mid-render; the task may still run at the "
                        "provider, so it is not sent again",
                        False,
                    ),
                    outcome=_unknown(renderer),
                )
                log.error("uncertain attempt", backend=renderer.name, task_id=task_id, job_id=job.job_id)
                self._telemetry.uncertain(renderer.backend)
                self._settle(renderer, result, self._settings)
                return

    async def _reachable(self, renderer: Renderer, timeout: float) -> bool:
        try:
            await renderer.stub.GetCapabilities(
                renderer_pb2.GetCapabilitiesRequest(), timeout=timeout, wait_for_ready=True
            )
        except grpc.aio.AioRpcError:
            return False
        return True

    async def _finish(
        self,
        renderer: Renderer,
        render: renderer_pb2.Render,
        attempt: int,
        job: RenderJob,
        result: AttemptResult,
        started: float,
    ) -> AsyncIterator[event_pb2.RenderEvent]:
        seconds = time.monotonic() - started
        if render.state != renderer_pb2.RENDER_STATE_SUCCEEDED:
            result.end(renderer, render.failure, seconds)
            result.ended_at_backend(render)
            self._settle(renderer, result, self._settings)
            return
        output = render.output
        yield event(attempt, qc=output.qc)
        result.ended_at_backend(render)
        # Paid for either way: kept on the job even when a later attempt replaces it.
        result.charge.output.CopyFrom(output)
        floor = job.constraints.quality_floor
        renderer.stats.record(
            Outcome(True, seconds, output.qc.score, output.cost.amount_micros, output.video.duration_seconds)
        )
        renderer.breaker.record_success()
        under_floor = output.qc.score < floor
        minimum = job.quality_minimum
        earns_rerender = result.may_rerender and output.qc.score < minimum
        self._telemetry.attempt_ended(
            renderer.backend,
            "qc_under_floor" if under_floor or earns_rerender else "succeeded",
            seconds,
            output.qc.score,
            Reason.QC_UNDER_FLOOR if under_floor or earns_rerender else Reason.UNSPECIFIED,
        )
        if earns_rerender:
            # The chain looks for a better backend next (_conclude), whatever the attempt limit.
            under = failure(
                Reason.QC_UNDER_FLOOR,
                f"QC score {output.qc.score:.2f} under the service level's minimum {minimum:.2f}: a free "
                "re-render on a better backend",
                True,
            )
            quality = renderer.capabilities.nominal_quality if renderer.capabilities is not None else 0.0
            result.cause = Cause(renderer.backend, under, output, True, under_floor, quality)
            result.charge.failure.CopyFrom(under)
            return
        if under_floor and attempt < (result.attempt_limit or self._settings.router_max_attempts):
            under = failure(
                Reason.QC_UNDER_FLOOR, f"QC score {output.qc.score:.2f} under the floor {floor:.2f}", True
            )
            result.cause = Cause(renderer.backend, under, output, under_floor=True)
            result.charge.failure.CopyFrom(under)
            return
        result.final = event(attempt, succeeded=output)

    def _settle(self, renderer: Renderer, result: AttemptResult, settings: RouterSettings) -> None:
        """Records a failed attempt and decides whether the chain may go on."""
        cause = result.cause
        assert cause is not None
        renderer.stats.record(Outcome(False, result.seconds))
        self._telemetry.attempt_ended(renderer.backend, "failed", result.seconds, None, cause.failure.reason)
        # The breaker counts what says the backend fails. A render lost says only that a renderer
        # process restarted (its health says so already), or that a caller resumed a task the renderer
        # never had: counted, a caller's mistakes would take the backend out for everyone.
        if cause.failure.retryable and cause.failure.reason != Reason.RENDER_LOST:
            renderer.breaker.record_failure()
        safety = cause.failure.reason == Reason.PROVIDER_SAFETY_INPUT
        if not cause.failure.retryable and not (safety and settings.router_fallback_on_safety):
            result.final = event(result.attempt, failed=cause.failure)


def _price(charge: event_pb2.AttemptCharge, render: renderer_pb2.Render) -> int:
    """Sets what an ended render bills on its charge, by its provider's rules as the renderer applied
    them; returns the amount. A create whose outcome is unknown bills or not: held until reconciled."""
    charge.task_id = render.handle.task_id
    charge.model = render.model
    if render.failure.reason == Reason.PROVIDER_UNCERTAIN:
        charge.outcome = event_pb2.CHARGE_OUTCOME_HOLD
        return 0
    billed = render.charge.amount_micros
    if not render.HasField("charge") and render.state == renderer_pb2.RENDER_STATE_SUCCEEDED:
        billed = render.output.cost.amount_micros
    charge.billed.CopyFrom(usd(billed))
    charge.outcome = event_pb2.CHARGE_OUTCOME_COMMIT if billed else event_pb2.CHARGE_OUTCOME_RELEASE
    return billed


def _unknown(renderer: Renderer) -> int:
    """The outcome of an attempt whose end nobody saw: the local renderer's renders die with it (free);
    a provider's task may have run on and billed."""
    if renderer.backend == backend_pb2.BACKEND_LOCAL:
        return event_pb2.CHARGE_OUTCOME_RELEASE
    return event_pb2.CHARGE_OUTCOME_HOLD


async def _spanned(
    result: AttemptResult, events: AsyncIterator[event_pb2.RenderEvent]
) -> AsyncIterator[event_pb2.RenderEvent]:
    """An attempt's events; its span ends with them, also when the reader stops early."""
    try:
        async for item in events:
            yield item
    finally:
        result.close()


def _last_word(cause: Cause, attempt: int, why: str) -> event_pb2.RenderEvent:
    """The chain's final event when it cannot go on: an output under the floor is still a video, and
    better than none; otherwise the last failure, saying why nothing more was tried."""
    if cause.output is not None:
        return event(attempt, succeeded=cause.output)
    last = render_pb2.RenderFailure()
    last.CopyFrom(cause.failure)
    last.message = f"{last.message} ({why})"
    return event(attempt, failed=last)


def _delivered(final: event_pb2.RenderEvent, guarantee: _Guarantee) -> event_pb2.RenderEvent:
    """The chain's final event, once a free re-render was granted: the output that earned it stays the
    job's when what came after it failed, or scored lower."""
    kept = guarantee.kept
    if kept is None:
        return final
    if final.HasField("failed") or (final.HasField("succeeded") and final.succeeded.qc.score < kept.qc.score):
        log.info("the output that earned the free re-render is delivered", attempt=final.attempt)
        return event(final.attempt, succeeded=kept)
    return final


def _no_backend(request: RouteRequest, candidates: list[Candidate]) -> render_pb2.RenderFailure:
    reason = Reason.NO_BACKEND
    if request.seconds_left is not None and request.seconds_left <= 0:
        reason = Reason.DEADLINE_PASSED
    elif budget_alone_blocks(c.exclusions for c in candidates):
        # The gateway's budget policy and its clients tell a spent budget from a mesh that cannot render.
        reason = Reason.BUDGET_EXHAUSTED
    elif candidates and all(
        router_pb2.EXCLUSION_DEADLINE in c.exclusions for c in candidates if not c.eligible
    ):
        reason = Reason.DEADLINE_UNMEETABLE
    return failure(reason, "; ".join(describe(candidate) for candidate in candidates) or "no backend", False)


def _budget_note(response: metrics_pb2.ReserveBudgetResponse) -> str:
    """The fuller of the account's and everyone's budget after the reservation, from the notify level
    on, for people ("82% used (notify)"); empty below it."""
    budget = max((response.budget, response.global_budget), key=lambda budget: budget.level)
    if budget.level < metrics_pb2.BUDGET_LEVEL_NOTIFY:
        return ""
    level = budget_level_name(budget.level)
    return f"{budget.used_fraction:.0%} used ({level})"
