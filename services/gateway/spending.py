"""The gateway's side of the spend ledger: a job reserves its worst-case cost before it renders, and
settles when it ends (the actual cost committed, the rest released). Nothing is spent unreserved."""

import time

import grpc
import structlog

from aiprod.common.v1 import job_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_kit.errors import ResourceExhausted
from aiprod_kit.money import usd

log = structlog.get_logger()

_TIMEOUT = 5.0
# How long a budget level read for CreateRenderJob stays good: one ledger call per second, not per job.
_LEVEL_FRESH_SECONDS = 1.0


# Failures after which a provider task may exist that nobody follows.
UNCERTAIN_REASONS = frozenset({"RENDER_UNCERTAIN", "PROVIDER_UNCERTAIN"})


class BudgetRefused(Exception):
    """The ledger refused the reservation: the budget cannot pay for this job."""


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

    async def refuse_when_exhausted(self) -> None:
        """For CreateRenderJob: RESOURCE_EXHAUSTED once today's budget is spent. A ledger that cannot
        answer does not block orders; the reservation before rendering still protects the budget."""
        if time.monotonic() - self._level_read_at >= _LEVEL_FRESH_SECONDS:
            try:
                response = await self._metrics.GetBudget(metrics_pb2.GetBudgetRequest(), timeout=_TIMEOUT)
            except grpc.aio.AioRpcError:
                return
            self._level = max(response.budget.level, response.global_budget.level)
            self._level_read_at = time.monotonic()
        if self._level == metrics_pb2.BUDGET_LEVEL_EXHAUSTED:
            raise ResourceExhausted("today's render budget is spent: no new jobs until it resets")

    async def worst_case_micros(self, job: gateway_pb2.RenderJob) -> int:
        """The most the render may cost: the dearest backend that could take it."""
        plan = await self._router.PlanRoute(
            router_pb2.PlanRouteRequest(shot=job.plan.shots[0], constraints=job.spec.constraints),
            timeout=_TIMEOUT,
        )
        costs = [
            candidate.estimated_cost.amount_micros for candidate in plan.candidates if candidate.eligible
        ]
        return max(costs, default=0)

    async def reserve(self, job: gateway_pb2.RenderJob) -> int:
        """Reserves the job's worst case (idempotent: a resumed job finds its reservation); returns the
        amount. Raises BudgetRefused when the budget cannot pay, grpc errors when the ledger is away."""
        amount = await self.worst_case_micros(job)
        if amount == 0:
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
