"""The gateway's view of today's budget: CreateRenderJob is refused once it is spent. (The ledger warns
operators when a budget reaches a level; a job's routed events say so from the notify level on, as the
ledger answered the attempt's reservation.)

The money itself moves per attempt: the router reserves each attempt before its provider is called
(and refuses to start one the budget cannot pay), and the gateway's settlement outbox
(`aiprod_gateway.settlement`) commits or releases it when the attempt ends. A job the budget cannot
pay before anything was spent on it is refused here, in one place (`BudgetRefused`); the dispatcher
decides what becomes of it (the gateway's budget policy)."""

import time

import grpc

from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod_kit.errors import ErrorReason, ResourceExhausted
from aiprod_kit.sharing import SharedReads

_TIMEOUT = 5.0
# How long a budget level read for CreateRenderJob stays good: one ledger call per second, not per job.
_LEVEL_FRESH_SECONDS = 1.0


class BudgetRefused(Exception):
    """Today's budget cannot pay for this job's first attempt: the ledger refused its reservation, or the
    router found every backend that could take it over the budget left. The message says how much is
    left and needed."""


class Spending:
    def __init__(self, metrics: metrics_pb2_grpc.MetricsServiceStub) -> None:
        self._metrics = metrics
        self._level = metrics_pb2.BUDGET_LEVEL_UNSPECIFIED
        self._level_read_at = -_LEVEL_FRESH_SECONDS
        self._last: metrics_pb2.GetBudgetResponse | None = None
        # The creates that find the level stale at once share one reading.
        self._read_level = SharedReads(self._ask_level)

    async def _ask_level(self, key: str) -> None:
        """Reads today's budgets (the ledger's default tenant's and everyone's); keeps the old level
        when the ledger cannot answer."""
        try:
            response = await self._metrics.GetBudget(metrics_pb2.GetBudgetRequest(), timeout=_TIMEOUT)
        except grpc.aio.AioRpcError:
            return
        self._level = max(response.budget.level, response.global_budget.level)
        self._last = response
        self._level_read_at = time.monotonic()

    async def refuse_when_exhausted(self) -> None:
        """For CreateRenderJob: RESOURCE_EXHAUSTED once today's budget is spent. A ledger that cannot
        answer does not block orders; each attempt's reservation still protects the budget."""
        if time.monotonic() - self._level_read_at >= _LEVEL_FRESH_SECONDS:
            await self._read_level("")
        if self._level == metrics_pb2.BUDGET_LEVEL_EXHAUSTED:
            raise ResourceExhausted(
                "today's render budget is spent: no new jobs until it resets",
                reason=ErrorReason.BUDGET_EXHAUSTED,
                metadata=_exhausted_metadata(self._last),
            )


def _exhausted_metadata(response: metrics_pb2.GetBudgetResponse | None) -> dict[str, object]:
    """For a caller's program: which budget is spent (everyone's, or else the tenant's), its day, its cap
    and what is left of it."""
    if response is None:
        return {}
    tenant = response.global_budget.level != metrics_pb2.BUDGET_LEVEL_EXHAUSTED
    budget = response.budget if tenant else response.global_budget
    return {
        "scope": "tenant" if tenant else "global",
        "tenant_id": budget.tenant_id if tenant else "",
        "day": budget.day,
        "remaining_micros": budget.remaining.amount_micros,
        "cap_micros": budget.cap.amount_micros,
    }
