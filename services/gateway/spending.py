"""The gateway's view of today's budget: CreateRenderJob is refused once it is spent, operators are told
when it passes a level, and a job's events say so from the notify level on.

The money itself moves per attempt: the router reserves each attempt before its provider is called
(and refuses to start one the budget cannot pay), and the gateway's settlement outbox
(`aiprod_gateway.settlement`) commits or releases it when the attempt ends. A job the budget cannot
pay before anything was spent on it is refused here, in one place (`BudgetRefused`); the dispatcher
decides what becomes of it (the gateway's budget policy)."""

import time

import grpc
import structlog

from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod_kit.errors import ErrorReason, ResourceExhausted
from aiprod_kit.sharing import SharedReads

log = structlog.get_logger()

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
        # The level each tenant's budgets were last read at (the warnings say each new one once).
        self._levels: dict[str, int] = {}
        # The jobs routed while a tenant's budgets are read share the reading.
        self._read_budget = SharedReads(self._ask_budget)

    async def _ask_budget(self, tenant_id: str) -> metrics_pb2.GetBudgetResponse | None:
        """Today's budgets of the tenant ("": the ledger's default one) and of everyone (None when the
        ledger cannot answer). The first read past the notify level, and each higher level after it, is
        logged as a warning: the 70% action tells operators."""
        try:
            response = await self._metrics.GetBudget(
                metrics_pb2.GetBudgetRequest(tenant_id=tenant_id), timeout=_TIMEOUT
            )
        except grpc.aio.AioRpcError:
            return None
        level = max(response.budget.level, response.global_budget.level)
        if level > self._levels.get(tenant_id, 0) and level >= metrics_pb2.BUDGET_LEVEL_NOTIFY:
            log.warning("budget level reached", tenant_id=tenant_id, **_level_fields(response))
        self._levels[tenant_id] = level
        if not tenant_id:
            self._level = level
            self._last = response
            self._level_read_at = time.monotonic()
        return response

    async def refuse_when_exhausted(self) -> None:
        """For CreateRenderJob: RESOURCE_EXHAUSTED once today's budget is spent. A ledger that cannot
        answer does not block orders; each attempt's reservation still protects the budget."""
        if time.monotonic() - self._level_read_at >= _LEVEL_FRESH_SECONDS:
            await self._read_budget("")
        if self._level == metrics_pb2.BUDGET_LEVEL_EXHAUSTED:
            raise ResourceExhausted(
                "today's render budget is spent: no new jobs until it resets",
                reason=ErrorReason.BUDGET_EXHAUSTED,
                metadata=_exhausted_metadata(self._last),
            )

    async def level_note(self, tenant_id: str = "") -> str:
        """From the notify level on, how much of today's budget is used (the tenant's whose job it is,
        or everyone's, the fuller), for the event of an attempt's reservation (the 70% action, on the
        job as well as in the log); empty below it."""
        response = await self._read_budget(tenant_id)
        if response is None or max(response.budget.level, response.global_budget.level) < (
            metrics_pb2.BUDGET_LEVEL_NOTIFY
        ):
            return ""
        fields = _level_fields(response)
        return f"; today's budget is {fields['used']} used ({fields['level']})"


def _level_fields(response: metrics_pb2.GetBudgetResponse) -> dict[str, str]:
    """The fuller of the tenant's and the global budget: its level and share used, for people."""
    budget = max((response.budget, response.global_budget), key=lambda budget: budget.level)
    level = metrics_pb2.BudgetLevel.Name(budget.level).removeprefix("BUDGET_LEVEL_").lower()
    return {"level": level, "used": f"{budget.used_fraction:.0%}"}


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
