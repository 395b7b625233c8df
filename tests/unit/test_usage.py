"""GetUsage's figures for one tenant: the job store's approval rate and actual against quoted (on SQLite
and PostgreSQL), and the usage answer put together from the store and the ledger (a fake metrics
service), its range of days checked."""

from collections.abc import AsyncIterator

import grpc
import pytest

from aiprod.common.v1 import job_pb2
from aiprod.gateway.v1 import admin_pb2, gateway_pb2
from aiprod.metrics.v1 import metrics_pb2
from aiprod_gateway.store import JobStore, SqlJobStore
from aiprod_gateway.tenancy import Tenant
from aiprod_gateway.usage import tenant_usage
from aiprod_kit.database import SqliteDatabase
from aiprod_kit.errors import InvalidArgument
from aiprod_kit.money import usd
from aiprod_kit.postgres import connect_postgres

AWAITING, QUEUED, RUNNING = (
    job_pb2.JOB_STATE_AWAITING_APPROVAL,
    job_pb2.JOB_STATE_QUEUED,
    job_pb2.JOB_STATE_RUNNING,
)
SUCCEEDED, FAILED, CANCELLED = (
    job_pb2.JOB_STATE_SUCCEEDED,
    job_pb2.JOB_STATE_FAILED,
    job_pb2.JOB_STATE_CANCELLED,
)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request, tmp_path) -> AsyncIterator[JobStore]:
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else ""
    if url:
        database = await connect_postgres(url, "test", connect_timeout=5)
    else:
        database = SqliteDatabase(tmp_path / "jobs.sqlite3", "jobs", private=True)
    opened = await SqlJobStore.open(database)
    yield opened
    await opened.close()


async def create(
    store: JobStore,
    job_id: str,
    state: int,
    tenant: str = "acme",
    quoted: int = 0,
    cost: int | None = None,
) -> None:
    job = gateway_pb2.RenderJob(
        job_id=job_id, request_id=job_id, state=state, tenant_id=tenant, plan_version=1
    )
    if quoted:
        job.quote.price.CopyFrom(usd(quoted))
    if cost is not None:
        job.cost.CopyFrom(usd(cost))
    revision = gateway_pb2.PlanRevision(plan_version=1) if state == AWAITING else None
    await store.create_job(job, "f", revision=revision)


def to(state: int):
    def update(job: gateway_pb2.RenderJob) -> None:
        job.state = state

    return update


async def approve(store: JobStore, job_id: str) -> None:
    details = gateway_pb2.JobEvent(approved=gateway_pb2.Approval(plan_version=1, approver="aiprod_k"))
    await store.append_event(job_id, "approved", to(QUEUED), details=details)


async def cancel(store: JobStore, job_id: str) -> None:
    details = gateway_pb2.JobEvent(cancelled=gateway_pb2.Cancellation(reason="no"))
    await store.append_event(job_id, "cancelled", to(CANCELLED), details=details)


async def test_the_approval_rate_counts_jobs_approved_over_approved_and_cancelled_in_review(store):
    for n in range(6):
        await create(store, f"review-{n}", AWAITING)
    await approve(store, "review-0")  # approved, queued
    await approve(store, "review-1")
    await store.append_event("review-1", "done", to(SUCCEEDED))  # approved, finished
    await approve(store, "review-2")
    await cancel(store, "review-2")  # approved, then cancelled: approved
    await cancel(store, "review-3")  # cancelled in review
    # review-4 and review-5 still wait: neither. Jobs never in review do not count, nor other tenants'.
    await create(store, "plain", QUEUED)
    await cancel(store, "plain")
    await create(store, "other", AWAITING, tenant="bravo")
    await cancel(store, "other")

    figures = await store.usage_figures("acme")
    assert figures.approval_rate == pytest.approx(3 / 4)
    assert (await store.usage_figures("bravo")).approval_rate == 0.0
    assert (await store.usage_figures("nobody")).approval_rate == 0.0


async def test_actual_against_quoted_sums_the_finished_jobs_that_hold_a_quote(store):
    await create(store, "a", SUCCEEDED, quoted=500_000, cost=480_000)
    await create(store, "b", FAILED, quoted=300_000, cost=100_000)
    await create(store, "c", SUCCEEDED, cost=700_000)  # no quote: left out
    await create(store, "d", CANCELLED, quoted=900_000, cost=200_000)  # cancelled: left out
    await create(store, "e", RUNNING, quoted=900_000)  # not finished
    await create(store, "f", SUCCEEDED, tenant="bravo", quoted=1_000_000, cost=1_000_000)
    figures = await store.usage_figures("acme")
    assert (figures.quoted_total.amount_micros, figures.actual_total.amount_micros) == (800_000, 580_000)
    assert figures.quoted_total.currency_code == "USD"


class Metrics:
    def __init__(self, tenant_cap: int = 5_000_000, global_cap: int = 90_000_000) -> None:
        self.tenant_cap, self.global_cap = tenant_cap, global_cap
        self.spend_asked: list[metrics_pb2.GetSpendRequest] = []

    async def GetBudget(self, request, timeout=None):
        return metrics_pb2.GetBudgetResponse(
            budget=metrics_pb2.Budget(
                tenant_id=request.tenant_id,
                day="2025-06-01",
                cap=usd(self.tenant_cap),
                spent=usd(1_000_000),
                reserved=usd(500_000),
                remaining=usd(max(self.tenant_cap - 1_500_000, 0) if self.tenant_cap else 0),
            ),
            global_budget=metrics_pb2.Budget(cap=usd(self.global_cap), remaining=usd(80_000_000)),
        )

    async def GetSpend(self, request, timeout=None):
        self.spend_asked.append(request)
        return metrics_pb2.GetSpendResponse(spent=usd(4_000_000), reserved=usd(500_000))


TENANT = Tenant("acme", admin_pb2.SLA_TIER_GOLD, 0, "aiprod_k")


async def test_usage_is_the_tenants_jobs_and_ledger_figures(store):
    await create(store, "a", SUCCEEDED, quoted=500_000, cost=480_000)
    await create(store, "b", QUEUED)
    await create(store, "other", QUEUED, tenant="bravo")
    metrics = Metrics()
    usage = await tenant_usage(store, metrics, TENANT, gateway_pb2.GetUsageRequest())  # type: ignore[arg-type]
    assert [(c.state, c.count) for c in usage.jobs] == [(QUEUED, 1), (SUCCEEDED, 1)]
    assert (usage.tenant_id, usage.tier) == ("acme", admin_pb2.SLA_TIER_GOLD)
    assert (usage.spend_today.amount_micros, usage.reserved.amount_micros) == (1_000_000, 500_000)
    assert (usage.daily_budget.amount_micros, usage.budget_left.amount_micros) == (5_000_000, 3_500_000)
    assert (usage.first_day, usage.last_day) == ("2025-06-01", "2025-06-01")  # today, the ledger's
    assert usage.spend_in_range.amount_micros == 4_000_000
    assert (usage.quoted_total.amount_micros, usage.actual_total.amount_micros) == (500_000, 480_000)
    (asked,) = metrics.spend_asked
    assert (asked.tenant_id, asked.first_day, asked.last_day) == ("acme", "2025-06-01", "2025-06-01")

    # A range; a tenant with no cap of its own: what everyone's cap leaves.
    metrics = Metrics(tenant_cap=0)
    request = gateway_pb2.GetUsageRequest(first_day="2025-01-01", last_day="2025-06-01")
    usage = await tenant_usage(store, metrics, TENANT, request)  # type: ignore[arg-type]
    assert (usage.first_day, usage.last_day) == ("2025-01-01", "2025-06-01")
    assert (usage.daily_budget.amount_micros, usage.budget_left.amount_micros) == (0, 80_000_000)
    # first_day alone: that day.
    usage = await tenant_usage(store, metrics, TENANT, gateway_pb2.GetUsageRequest(first_day="2025-05-01"))  # type: ignore[arg-type]
    assert (usage.first_day, usage.last_day) == ("2025-05-01", "2025-05-01")


@pytest.mark.parametrize(
    ("first_day", "last_day", "field"),
    [
        ("June 1", "", "first_day"),
        ("2025-02-30", "", "first_day"),
        ("", "2025/06/01", "last_day"),
        ("2025-06-01", "2025-05-31", "last_day"),
        ("", "2025-05-31", "last_day"),  # before today
        ("2024-01-01", "2025-06-01", "last_day"),  # over 366 days
    ],
)
async def test_a_bad_range_of_days_names_the_field(store, first_day, last_day, field):
    request = gateway_pb2.GetUsageRequest(first_day=first_day, last_day=last_day)
    with pytest.raises(InvalidArgument) as refused:
        await tenant_usage(store, Metrics(), TENANT, request)  # type: ignore[arg-type]
    assert [name for name, _ in refused.value.violations] == [field]
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
