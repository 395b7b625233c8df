"""Whose money each attempt of a job is: the driver names the job's tenant and its SLA tier's quality
guarantee to the router, says on a resumed render whether the free re-render was granted, names the
account of every charge it records, and the job's cost counts only what its tenant pays (the free
re-render in company_cost). Against a real job store (SQLite) and a scripted router."""

from collections.abc import AsyncIterator

import grpc
import pytest
from fake_streams import execute_renders

from aiprod.common.v1 import backend_pb2, event_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import admin_pb2, gateway_pb2
from aiprod.metrics.v1 import metrics_pb2
from aiprod.router.v1 import router_pb2
from aiprod_gateway import attempts
from aiprod_gateway.driving import BudgetPolicy, Drive, Guarantees, JobDriver
from aiprod_gateway.reporting import MetricsReporter
from aiprod_gateway.settlement import Settlement
from aiprod_gateway.store import SqlJobStore
from aiprod_gateway.tiers import DEFAULT_TIERS
from aiprod_kit.database import SqliteDatabase
from aiprod_kit.money import usd

TENANT, COMPANY, OWNER = "acme", "aiprod-sla", "this-replica"
RUNWAY, REPLICATE = backend_pb2.BACKEND_RUNWAY, backend_pb2.BACKEND_REPLICATE
COMMIT = event_pb2.CHARGE_OUTCOME_COMMIT
GOLD_MINIMUM = DEFAULT_TIERS[admin_pb2.SLA_TIER_GOLD].quality_minimum


def charge(backend: int, attempt: int, micros: int, account: str) -> event_pb2.AttemptCharge:
    return event_pb2.AttemptCharge(
        reservation_key=f"job_a:{attempt}",
        backend=backend,
        outcome=COMMIT,
        billed=usd(micros),
        account=account,
    )


def test_the_jobs_cost_is_its_tenants_and_the_free_rerender_the_companys():
    job = gateway_pb2.RenderJob(job_id="job_a", tenant_id=TENANT)
    attempts.charged(job, 0, 1, charge(REPLICATE, 1, 100_000, TENANT))
    assert (job.cost.amount_micros, job.HasField("company_cost")) == (100_000, False)
    attempts.charged(job, 0, 2, charge(RUNWAY, 2, 240_000, COMPANY))
    attempts.charged(job, 0, 3, charge(RUNWAY, 3, 50_000, ""))  # no account named: the tenant's
    assert (job.cost.amount_micros, job.company_cost.amount_micros) == (150_000, 240_000)
    # A later charge that names no account (a reconciliation) keeps the one the attempt had.
    again = charge(RUNWAY, 2, 240_000, "")
    attempts.charged(job, 0, 2, again)
    assert job.attempts[1].charge.account == COMPANY and not again.account
    assert (job.cost.amount_micros, job.company_cost.amount_micros) == (150_000, 240_000)


class Router:
    """Scripted: each ExecuteRender or ResumeRender plays the next script, and keeps its request."""

    def __init__(self, *scripts: list[event_pb2.RenderEvent | Exception]) -> None:
        self._scripts = list(scripts)
        self.requests: list[object] = []

    def _play(self, request: object) -> "Stream":
        self.requests.append(request)
        return Stream(self._scripts.pop(0))

    ExecuteRender = ResumeRender = _play

    def ExecuteRenders(self, requests):
        return execute_renders(self, requests)


class Stream:
    def __init__(self, script: list[event_pb2.RenderEvent | Exception]) -> None:
        self._script = script

    async def __aiter__(self) -> AsyncIterator[router_pb2.ExecuteRenderResponse]:
        for item in self._script:
            if isinstance(item, Exception):
                raise item
            yield router_pb2.ExecuteRenderResponse(event=item)

    def cancel(self) -> bool:
        return True


class Metrics:
    async def RecordJobEvent(self, request, timeout=None):
        return metrics_pb2.RecordJobEventResponse()

    async def GetBudget(self, request, timeout=None):
        return metrics_pb2.GetBudgetResponse()


def routed(attempt: int, backend: int, account: str, rerender: bool = False) -> event_pb2.RenderEvent:
    decision = event_pb2.RouteDecision(
        backend=backend,
        reservation_key=f"job_a:{attempt}",
        reserved=usd(1),
        account=account,
        rerender=rerender,
    )
    return event_pb2.RenderEvent(attempt=attempt, routed=decision)


def submitted(attempt: int, backend: int) -> event_pb2.RenderEvent:
    handle = backend_pb2.RenderHandle(
        backend=backend, task_id=f"task-{attempt}", idempotency_key=f"job_a:{attempt}"
    )
    return event_pb2.RenderEvent(attempt=attempt, submitted=handle)


def charged(attempt: int, backend: int, micros: int, account: str) -> event_pb2.RenderEvent:
    return event_pb2.RenderEvent(attempt=attempt, charged=charge(backend, attempt, micros, account))


def succeeded(attempt: int) -> event_pb2.RenderEvent:
    return event_pb2.RenderEvent(
        attempt=attempt, succeeded=render_pb2.RenderOutput(qc=render_pb2.QcReport(score=0.9))
    )


BROKEN = grpc.aio.AioRpcError(
    grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "router away"
)


@pytest.fixture
async def store(tmp_path) -> AsyncIterator[SqlJobStore]:
    opened = await SqlJobStore.open(SqliteDatabase(tmp_path / "jobs.sqlite3", "jobs"))
    yield opened
    await opened.close()


async def drive(store: SqlJobStore, router: Router, tier: int) -> gateway_pb2.RenderJob:
    job = gateway_pb2.RenderJob(
        job_id="job_a",
        request_id="job_a",
        tenant_id=TENANT,
        tier=tier,
        state=job_pb2.JOB_STATE_QUEUED,
        plan=render_pb2.RenderPlan(shots=[render_pb2.Shot(prompt="p", duration_seconds=2)]),
    )
    await store.create_job(job, "f")
    claimed = await store.claim("job_a", OWNER, 30)
    assert claimed is not None
    metrics = Metrics()
    driver = JobDriver(
        store,
        router,  # type: ignore[arg-type]
        MetricsReporter(metrics),  # type: ignore[arg-type]
        Settlement(store, metrics, router),  # type: ignore[arg-type]
        BudgetPolicy(),
        OWNER,
        Guarantees(DEFAULT_TIERS, COMPANY),
    )
    assert await driver.drive(claimed, Drive()) is None
    done = await store.get_job("job_a")
    assert done is not None
    return done


async def test_the_router_hears_the_tenant_and_its_guarantee_and_a_resumed_render_the_granted_rerender(store):
    router = Router(
        # The first run: Replicate under the minimum, the free re-render started at Runway, then the
        # router's stream breaks.
        [
            routed(1, REPLICATE, TENANT),
            submitted(1, REPLICATE),
            charged(1, REPLICATE, 100_000, TENANT),
            routed(2, RUNWAY, COMPANY, rerender=True),
            submitted(2, RUNWAY),
            BROKEN,
        ],
        # Resumed: the router cannot say whose the resumed attempt is; the driver knows.
        [charged(2, RUNWAY, 240_000, ""), succeeded(2)],
    )
    done = await drive(store, router, admin_pb2.SLA_TIER_GOLD)

    first, resumed = router.requests
    assert isinstance(first, router_pb2.ExecuteRenderRequest)
    assert first.tenant_id == TENANT
    assert (first.guarantee.quality_minimum, first.guarantee.account) == (GOLD_MINIMUM, COMPANY)
    assert isinstance(resumed, router_pb2.ResumeRenderRequest)
    assert (resumed.tenant_id, resumed.attempt, resumed.rerender_granted) == (TENANT, 2, True)
    assert resumed.guarantee == first.guarantee

    assert done.state == job_pb2.JOB_STATE_SUCCEEDED
    assert [a.charge.account for a in done.attempts] == [TENANT, COMPANY]
    assert (done.cost.amount_micros, done.company_cost.amount_micros) == (100_000, 240_000)
    recorded = [
        e.render.charged.account for e in await store.events_after("job_a", 0) if e.render.HasField("charged")
    ]
    assert recorded == [TENANT, COMPANY]


async def test_a_rerender_routed_but_never_started_is_not_yet_granted_on_resume(store):
    router = Router(
        [
            routed(1, REPLICATE, TENANT),
            submitted(1, REPLICATE),
            routed(2, RUNWAY, COMPANY, rerender=True),  # reserved, not started: the router went away
            BROKEN,
        ],
        [charged(1, REPLICATE, 100_000, TENANT), charged(2, RUNWAY, 240_000, COMPANY), succeeded(2)],
    )
    await drive(store, router, admin_pb2.SLA_TIER_GOLD)
    resumed = router.requests[1]
    # Resumed at attempt 1: the router grants the re-render again, for attempt 2, on its ledger line.
    assert (resumed.attempt, resumed.rerender_granted) == (1, False)


async def test_a_job_without_a_tier_has_no_guarantee(store):
    router = Router([routed(1, REPLICATE, TENANT), charged(1, REPLICATE, 100_000, TENANT), succeeded(1)])
    done = await drive(store, router, admin_pb2.SLA_TIER_UNSPECIFIED)
    (request,) = router.requests
    assert request.tenant_id == TENANT and not request.HasField("guarantee")
    assert (done.cost.amount_micros, done.HasField("company_cost")) == (100_000, False)
