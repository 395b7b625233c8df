"""GetUsage for the calling tenant: its jobs by state, its approval rate, what its finished jobs cost
against their quotes (the job store), and its spend today, over a range of days, reserved and left
(the ledger: the metrics service's GetBudget and GetSpend for the tenant).

The range's days are "YYYY-MM-DD" in the ledger's time zone: an empty first_day is the ledger's today,
an empty last_day the first day; at most 366 days apart, the last not before the first. What is left
today is the tenant's own cap less what it spent and reserved, or, for a tenant with no cap of its own,
what everyone's cap leaves (the one that binds it).
"""

import re
from datetime import date

import grpc

from aiprod.gateway.v1 import gateway_pb2
from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod_gateway.store import JobStore
from aiprod_gateway.tenancy import Tenant
from aiprod_kit.errors import ErrorReason, InvalidArgument, Unavailable

_TIMEOUT = 5.0
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
# The longest range of days the ledger sums (GetSpend's limit).
MAX_RANGE_DAYS = 366


def _day(field: str, value: str) -> tuple[date | None, list[tuple[str, str]]]:
    if not value:
        return None, []
    try:
        if not _DAY.fullmatch(value):
            raise ValueError(value)
        return date.fromisoformat(value), []
    except ValueError:
        return None, [(field, f'{value[:32]!r} is not a day, "YYYY-MM-DD" (or empty: today)')]


def days(request: gateway_pb2.GetUsageRequest, today: str | None) -> tuple[str, str]:
    """The range's first and last days, checked; today: the ledger's (None: not asked yet, and only
    the fields' shapes are checked). Raises InvalidArgument naming the field."""
    first, violations = _day("first_day", request.first_day)
    last, more = _day("last_day", request.last_day)
    violations += more
    if violations:
        raise InvalidArgument(violations)
    if today is None:
        return "", ""
    first = first or date.fromisoformat(today)
    last = last or first
    if last < first:
        raise InvalidArgument([("last_day", f"must not be before first_day ({first.isoformat()})")])
    if (last - first).days > MAX_RANGE_DAYS:
        raise InvalidArgument(
            [("last_day", f"must be at most {MAX_RANGE_DAYS} days after first_day ({first.isoformat()})")]
        )
    return first.isoformat(), last.isoformat()


def _budget_left(response: metrics_pb2.GetBudgetResponse) -> int:
    """What the tenant may still spend today: under its own cap, else under everyone's (0: no cap)."""
    if response.budget.cap.amount_micros > 0:
        return response.budget.remaining.amount_micros
    return response.global_budget.remaining.amount_micros


async def tenant_usage(
    store: JobStore,
    metrics: metrics_pb2_grpc.MetricsServiceStub,
    tenant: Tenant,
    request: gateway_pb2.GetUsageRequest,
) -> gateway_pb2.GetUsageResponse:
    days(request, None)  # bad input is refused before anything is read
    counts = await store.count_by_state(tenant.tenant_id)
    usage = await store.usage_figures(tenant.tenant_id)
    try:
        budgets = await metrics.GetBudget(
            metrics_pb2.GetBudgetRequest(tenant_id=tenant.tenant_id), timeout=_TIMEOUT
        )
        first_day, last_day = days(request, budgets.budget.day)
        spend = await metrics.GetSpend(
            metrics_pb2.GetSpendRequest(tenant_id=tenant.tenant_id, first_day=first_day, last_day=last_day),
            timeout=_TIMEOUT,
        )
    except grpc.aio.AioRpcError as error:
        raise Unavailable(
            f"the metrics service cannot report spend now ({error.code().name})",
            reason=ErrorReason.LEDGER_UNAVAILABLE,
        ) from error
    budget = budgets.budget
    usage.jobs.extend(
        gateway_pb2.JobStateCount(state=state, count=count) for state, count in sorted(counts.items())
    )
    usage.tenant_id = tenant.tenant_id
    usage.tier = tenant.tier
    usage.spend_today.CopyFrom(budget.spent)
    usage.reserved.CopyFrom(budget.reserved)
    usage.daily_budget.CopyFrom(budget.cap)
    usage.budget_left.CopyFrom(budget.remaining)
    usage.budget_left.amount_micros = _budget_left(budgets)
    usage.spend_in_range.CopyFrom(spend.spent)
    usage.first_day, usage.last_day = first_day, last_day
    return usage
