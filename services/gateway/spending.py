"""The gateway's side of the spend ledger: a job reserves its worst-case cost before it renders, and
settles when it ends (the actual cost committed, the rest released). Nothing is spent unreserved.

A job the budget cannot pay is refused here, in one place, whether the ledger refuses its reservation
or the router already finds every backend that could take it over the budget left; the dispatcher
decides what becomes of it (the gateway's budget policy)."""

import asyncio
import contextlib
import time
from collections.abc import Sequence

import grpc
import structlog

from aiprod.common.v1 import job_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_kit.capabilities import backend_name
from aiprod_kit.errors import ResourceExhausted
from aiprod_kit.exclusions import budget_alone_blocks, over_budget_alone
from aiprod_kit.money import usd

log = structlog.get_logger()

_TIMEOUT = 5.0
# How long a budget level read for CreateRenderJob stays good: one ledger call per second, not per job.
_LEVEL_FRESH_SECONDS = 1.0


# Failures after which a provider task may exist that nobody follows.
UNCERTAIN_REASONS = frozenset({"RENDER_UNCERTAIN", "PROVIDER_UNCERTAIN"})


class BudgetRefused(Exception):
    """Today's budget cannot pay for this job: the ledger refused its reservation, or the router found
    every backend that could take it over the budget left. The message says how much is left and needed."""


def reservation_key(job: gateway_pb2.RenderJob) -> str:
    return f"{job.job_id}:render"


class Spending:
    def __init__(
        self, metrics: metrics_pb2_grpc.MetricsServiceStub, router: router_pb2_grpc.RouterServiceStub
    ) -> None:
        self._metrics = metrics
        self._router = router
        self._level = metrics_pb2.BUDGET_LEVEL_UNSPECIFIED
        self._level_read_at = -_LEVEL_FRESH_SECONDS
        # Set, then replaced, each time a job settles: what jobs waiting for money wait on.
        self._settled = asyncio.Event()

    async def _read_budget(self) -> metrics_pb2.GetBudgetResponse | None:
        """Today's budgets (None when the ledger cannot answer). The first read past the notify level,
        and each higher level after it, is logged as a warning: the 70% action tells operators."""
        try:
            response = await self._metrics.GetBudget(metrics_pb2.GetBudgetRequest(), timeout=_TIMEOUT)
        except grpc.aio.AioRpcError:
            return None
        level = max(response.budget.level, response.global_budget.level)
        if level > self._level and level >= metrics_pb2.BUDGET_LEVEL_NOTIFY:
            log.warning("budget level reached", **_level_fields(response))
        self._level = level
        self._level_read_at = time.monotonic()
        return response

    async def refuse_when_exhausted(self) -> None:
        """For CreateRenderJob: RESOURCE_EXHAUSTED once today's budget is spent. A ledger that cannot
        answer does not block orders; the reservation before rendering still protects the budget."""
        if time.monotonic() - self._level_read_at >= _LEVEL_FRESH_SECONDS:
            await self._read_budget()
        if self._level == metrics_pb2.BUDGET_LEVEL_EXHAUSTED:
            raise ResourceExhausted("today's render budget is spent: no new jobs until it resets")

    async def reserve(self, job: gateway_pb2.RenderJob) -> int:
        """Reserves the job's worst case, the dearest backend that could take it (idempotent: a resumed
        job finds its reservation); returns the amount, 0 for a free render. Raises BudgetRefused when
        the budget cannot pay, grpc errors when the router or the ledger is away."""
        plan = await self._router.PlanRoute(
            router_pb2.PlanRouteRequest(shot=job.plan.shots[0], constraints=job.spec.constraints),
            timeout=_TIMEOUT,
        )
        candidates = plan.candidates
        if budget_alone_blocks(candidate.exclusions for candidate in candidates):
            raise BudgetRefused(f"no backend within the budget left: {_cheapest_over_budget(candidates)}")
        amount = max((c.estimated_cost.amount_micros for c in candidates if c.eligible), default=0)
        if amount == 0:
            # A free render, or none possible: the router's own failure will say why.
            return 0
        request = metrics_pb2.ReserveBudgetRequest(
            reservation_key=reservation_key(job), amount=usd(amount), job_id=job.job_id
        )
        try:
            await self._metrics.ReserveBudget(request, timeout=_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise BudgetRefused(error.details() or "budget exhausted") from error
            raise
        return amount

    async def describe_reservation(self, amount_micros: int) -> str:
        """The job event of a reservation; from the notify level on it says how much of today's budget
        is used (the 70% action, on the job as well as in the log)."""
        message = f"budget reserved: {amount_micros / 1e6:.2f} USD"
        response = await self._read_budget()
        if response is None or self._level < metrics_pb2.BUDGET_LEVEL_NOTIFY:
            return message
        fields = _level_fields(response)
        return f"{message}; today's budget is {fields['used']} used ({fields['level']})"

    async def money_freed(self, timeout: float) -> None:
        """Returns when a job of this gateway has settled (money may be free again), or after timeout."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), timeout)

    async def settle(self, job: gateway_pb2.RenderJob) -> None:
        """Commits what a finished job cost and releases the rest; best effort, logged when it fails
        (the ledger expires a reservation nobody settles). A job that reserved nothing (a free render)
        has nothing to settle."""
        key = reservation_key(job)
        if job.error.reason in UNCERTAIN_REASONS:
            # The render may still run, and cost, at its provider: the money stays reserved until the
            # attempt is reconciled (or the reservation expires, which the ledger reports).
            log.warning(
                "reservation held for an uncertain render", job_id=job.job_id, reason=job.error.reason
            )
            return
        try:
            if job.state == job_pb2.JOB_STATE_SUCCEEDED:
                await self._metrics.CommitSpend(
                    metrics_pb2.CommitSpendRequest(reservation_key=key, actual=job.result.cost),
                    timeout=_TIMEOUT,
                )
            else:
                await self._metrics.ReleaseBudget(
                    metrics_pb2.ReleaseBudgetRequest(reservation_key=key), timeout=_TIMEOUT
                )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("reservation not settled", job_id=job.job_id, code=error.code().name)
            return
        self._settled.set()
        self._settled = asyncio.Event()


def _level_fields(response: metrics_pb2.GetBudgetResponse) -> dict[str, str]:
    """The fuller of the tenant's and the global budget: its level and share used, for people."""
    budget = max((response.budget, response.global_budget), key=lambda budget: budget.level)
    level = metrics_pb2.BudgetLevel.Name(budget.level).removeprefix("BUDGET_LEVEL_").lower()
    return {"level": level, "used": f"{budget.used_fraction:.0%}"}


def _cheapest_over_budget(candidates: Sequence[router_pb2.RouteCandidate]) -> str:
    """The cheapest backend the budget alone excludes, in the router's words: what it needs against
    the budget left."""
    over = [candidate for candidate in candidates if over_budget_alone(candidate.exclusions)]
    cheapest = min(over, key=lambda candidate: candidate.estimated_cost.amount_micros)
    name = backend_name(cheapest.backend)
    return f"{name}: {cheapest.reasons[0]}"
