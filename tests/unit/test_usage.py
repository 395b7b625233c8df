"""GetUsage's figures for one tenant: the job store's approval rate and actual against quoted (on SQLite
and PostgreSQL), kept by the database as jobs change and summed once for a store from before; and the
usage answer put together from the store and the ledger (a fake metrics service), its range of days
checked."""

import random

import grpc
import pytest

from aiprod.common.v1 import job_pb2
from aiprod.gateway.v1 import admin_pb2, gateway_pb2
from aiprod.metrics.v1 import metrics_pb2
from aiprod_gateway.store import JobStore, SqlJobStore
from aiprod_gateway.tenancy import Tenant
from aiprod_gateway.usage import tenant_usage
from aiprod_kit.errors import InvalidArgument
from aiprod_kit.money import usd

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


@pytest.fixture
async def store(open_database) -> JobStore:
    return await SqlJobStore.open(await open_database("jobs", private=True))


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


async def figures_from_the_jobs(store: JobStore, tenant: str) -> tuple[dict[int, int], float, int, int]:
    """The tenant's jobs by state, approval rate, quoted and actual totals, from every job's blob,
    revisions and log: what GetUsage summed at every call before the store kept them."""
    jobs: list[gateway_pb2.RenderJob] = []
    before = None
    while True:
        page = await store.list_jobs(tenant, [], 100, before)
        jobs += page.jobs
        if page.next_cursor is None:
            break
        before = page.next_cursor
    counts: dict[int, int] = {}
    approved = cancelled = quoted = actual = 0
    for job in jobs:
        counts[job.state] = counts.get(job.state, 0) + 1
        if await store.revisions(job.job_id):
            if job.state in (QUEUED, RUNNING, SUCCEEDED, FAILED):
                approved += 1
            elif job.state == CANCELLED:
                events = await store.events_after(job.job_id, 0)
                if any(event.HasField("approved") for event in events):
                    approved += 1
                else:
                    cancelled += 1
        if job.state in (SUCCEEDED, FAILED) and job.quote.price.amount_micros > 0:
            quoted += job.quote.price.amount_micros
            actual += job.cost.amount_micros
    rate = approved / (approved + cancelled) if approved + cancelled else 0.0
    return counts, rate, quoted, actual


async def kept_figures(store: JobStore, tenant: str) -> tuple[dict[int, int], float, int, int]:
    figures = await store.usage_figures(tenant)
    return (
        await store.count_by_state(tenant),
        figures.approval_rate,
        figures.quoted_total.amount_micros,
        figures.actual_total.amount_micros,
    )


async def change_jobs_at_random(store: JobStore, rng: random.Random, steps: int, check=None) -> set[str]:
    """Creates jobs (in review or not, quoted or not) of two tenants and moves them as the gateway
    does: plans revised and quotes changed in review, approvals, progress that changes no figure,
    runs, ends with a cost, cancellations; check() after each step. Returns what it did."""
    unended: dict[str, int] = {}  # job id -> state
    approved: set[str] = set()
    done: set[str] = set()
    for step in range(steps):
        action = rng.choice(["create", "create", "revise", "approve", "progress", "run", "end", "cancel"])
        if action == "create" or not unended:
            job_id = f"job-{step}"
            state = rng.choice([AWAITING, QUEUED])
            await create(
                store,
                job_id,
                state,
                tenant=rng.choice(["acme", "bravo"]),
                quoted=rng.choice([0, 250_000, 400_000]),
            )
            unended[job_id] = state
        else:
            job_id = rng.choice(sorted(unended))
            state = unended[job_id]
            if action == "revise" and state == AWAITING:
                price = rng.choice([0, 300_000, 600_000])

                def requote(job: gateway_pb2.RenderJob, price: int = price) -> None:
                    job.plan_version += 1
                    job.quote.price.CopyFrom(usd(price))

                job = await store.get_job(job_id)
                assert job is not None
                revision = gateway_pb2.PlanRevision(plan_version=job.plan_version + 1)
                await store.append_event(
                    job_id, "revised", requote, details=gateway_pb2.JobEvent(plan_updated=revision)
                )
            elif action == "approve" and state == AWAITING:
                await approve(store, job_id)
                unended[job_id] = QUEUED
                approved.add(job_id)
            elif action == "progress":
                await store.append_event(job_id, "progress", lambda job: None)
            elif action == "run" and state == QUEUED:
                await store.append_event(job_id, "running", to(RUNNING))
                unended[job_id] = RUNNING
            elif action == "end" and state == RUNNING:
                ended, cost = rng.choice([SUCCEEDED, FAILED]), rng.choice([0, 180_000, 520_000])

                def end(job: gateway_pb2.RenderJob, ended: int = ended, cost: int = cost) -> None:
                    job.state = ended
                    job.cost.CopyFrom(usd(cost))

                await store.append_event(job_id, "ended", end)
                del unended[job_id]
            elif action == "cancel":
                await cancel(store, job_id)
                del unended[job_id]
                action = "cancel approved" if job_id in approved else f"cancel {state}"
            else:
                action = "nothing"
            done.add(action)
        if check is not None:
            await check()
    return done


async def test_the_kept_figures_equal_the_jobs_own_after_every_change(store):
    async def check() -> None:
        for tenant in ("acme", "bravo", "nobody"):
            assert await kept_figures(store, tenant) == await figures_from_the_jobs(store, tenant)

    done = await change_jobs_at_random(store, random.Random(4), 160, check)
    # The walk did every kind of change and reached every state, so the check compared all of them.
    assert done >= {"revise", "approve", "progress", "run", "end", "cancel approved", f"cancel {AWAITING}"}
    counts, rate, quoted, _ = await kept_figures(store, "acme")
    assert set(counts) == {AWAITING, QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED}
    assert 0 < rate < 1 and quoted > 0


async def test_a_store_from_before_the_kept_figures_gets_them_on_opening(open_database, store):
    await change_jobs_at_random(store, random.Random(7), 120)
    expected = {tenant: await figures_from_the_jobs(store, tenant) for tenant in ("acme", "bravo")}
    # As the version before left it: no figures kept, no triggers, the jobs' columns at their defaults.
    database = await open_database("jobs", private=True)
    async with database.transaction() as transaction:
        for trigger in ("jobs_tenant_figures_insert", "jobs_tenant_figures_update"):
            await transaction.execute(
                f"DROP TRIGGER {trigger}" + (" ON jobs" if database.dialect == "postgresql" else "")
            )
        await transaction.execute("DROP TABLE tenant_job_figures")
        await transaction.execute(
            "UPDATE jobs SET reviewed = 0, approved = 0, quoted_micros = 0, cost_micros = 0"
        )
    await database.close()
    reopened = await SqlJobStore.open(await open_database("jobs", private=True))
    for tenant, figures in expected.items():
        assert await kept_figures(reopened, tenant) == figures
    # And kept from there on.
    await create(reopened, "new", SUCCEEDED, quoted=100_000, cost=90_000)
    assert await kept_figures(reopened, "acme") == await figures_from_the_jobs(reopened, "acme")


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
