"""The SLA tier's free re-render, end to end through the real mesh against the provider sandbox: an
output under the tenant's quality minimum is rendered again, once, on a backend of better nominal
quality, and the ledger records that attempt under the company's account, not the tenant's; the
ledger's lines equal what the sandbox's providers billed.

The router is called directly, as the gateway calls it, and the test settles the charges as the
gateway's outbox does (commit what each attempt's charge says, by its reservation key); then a GOLD
tenant's job goes through the gateway, whose job shows the company's cost apart from the tenant's.
"""

import json
import os
import uuid
from collections.abc import Iterator

import pytest
from helpers.mesh import eventually, gateway, metrics, router, wait_terminal
from helpers.sandbox import Sandbox, sandbox_mesh

from aiprod.common.v1 import backend_pb2, event_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import admin_pb2, gateway_pb2
from aiprod.metrics.v1 import metrics_pb2
from aiprod.router.v1 import router_pb2
from aiprod_kit.failures import Reason
from aiprod_kit.mesh import Mesh

RUNWAY, REPLICATE = backend_pb2.BACKEND_RUNWAY, backend_pb2.BACKEND_REPLICATE
COMMIT = event_pb2.CHARGE_OUTCOME_COMMIT
# As tests/mesh/test_money.py: a Replicate model that renders its default shape whatever it is asked, so
# that 2 s of 9:16 come back as a paid video that QC scores 0.6, from a backend of nominal quality 0.75.
ODD_MODEL = "sandbox/fixed-shape"
ODD_MAPPING = {"prompt": "prompt", "aspect_ratio": "ratio", "duration_seconds": "length"}
ODD_MODEL_SANDBOX_PRICE = 0.02
ODD_MODEL_COST = 100_000
RUNWAY_PER_SECOND = 120_000
COMPANY = "aiprod-sla-e2e"
MINIMUM = 0.75

GOLD_MINIMUM = 0.7
# The test meshes' GOLD tier without its limits (conftest.py), but with its quality minimum.
TIERS = json.loads(os.environ.get("AIPROD_GATEWAY_TIERS") or "{}")
TIERS["GOLD"] = {**TIERS.get("GOLD", {}), "quality_minimum": GOLD_MINIMUM}

ENVIRONMENT = {
    "AIPROD_REPLICATE_MODEL": ODD_MODEL,
    "AIPROD_REPLICATE_INPUT_MAPPING": json.dumps(ODD_MAPPING),
    "AIPROD_GATEWAY_TIERS": json.dumps(TIERS),
}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with sandbox_mesh(tmp_path_factory.mktemp("sla"), ENVIRONMENT) as running:
        yield running


@pytest.fixture
def sandbox(mesh: Mesh) -> Sandbox:
    control = Sandbox(mesh.address("sandbox"))
    control.reset(render_seconds=1)
    control.reset(provider="replicate", prices={ODD_MODEL: ODD_MODEL_SANDBOX_PRICE})
    return control


def budget(mesh: Mesh, tenant: str) -> metrics_pb2.Budget:
    return metrics(mesh).GetBudget(metrics_pb2.GetBudgetRequest(tenant_id=tenant), timeout=10).budget


def execute(mesh: Mesh, tenant: str, floor: float, guarantee: bool = True) -> list[event_pb2.RenderEvent]:
    """A 2 s 9:16 render preferring Replicate, as the gateway would ask for a job of the tenant."""
    request = router_pb2.ExecuteRenderRequest(
        job_id=f"job_{uuid.uuid4().hex}",
        shot=render_pb2.Shot(
            prompt="A heron in the reeds", duration_seconds=2, aspect_ratio=render_pb2.ASPECT_RATIO_9_16
        ),
        constraints=render_pb2.RenderConstraints(preferred_backend=REPLICATE, quality_floor=floor),
        idempotency_key=f"sla-{uuid.uuid4().hex}",
        tenant_id=tenant,
    )
    if guarantee:
        request.guarantee.CopyFrom(router_pb2.QualityGuarantee(quality_minimum=MINIMUM, account=COMPANY))
    return [response.event for response in router(mesh).ExecuteRender(request, timeout=180)]


def of(events: list[event_pb2.RenderEvent], kind: str) -> list:
    return [getattr(item, kind) for item in events if item.WhichOneof("kind") == kind]


def settle(mesh: Mesh, charges: list[event_pb2.AttemptCharge]) -> None:
    """What the gateway's outbox does with each attempt's charge."""
    stub = metrics(mesh)
    for charge in charges:
        if charge.outcome == COMMIT:
            request = metrics_pb2.CommitSpendRequest(
                reservation_key=charge.reservation_key, actual=charge.billed
            )
            stub.CommitSpend(request, timeout=10)
        else:
            stub.ReleaseBudget(
                metrics_pb2.ReleaseBudgetRequest(reservation_key=charge.reservation_key), timeout=10
            )


def test_an_output_under_the_minimum_is_rendered_again_on_a_better_backend_at_the_companys_cost(
    mesh, sandbox
):
    tenant = f"acme-{uuid.uuid4().hex[:8]}"
    company_before = budget(mesh, COMPANY).spent.amount_micros
    # The floor under Replicate's 0.6: without the guarantee the output would be delivered as it is.
    events = execute(mesh, tenant, floor=0.5)

    routed, charged = of(events, "routed"), of(events, "charged")
    assert [(r.backend, r.rerender, r.account) for r in routed] == [
        (REPLICATE, False, tenant),
        (RUNWAY, True, COMPANY),  # nominal 0.95 over Replicate's 0.75
    ]
    assert [(c.backend, c.account, c.outcome) for c in charged] == [
        (REPLICATE, tenant, COMMIT),
        (RUNWAY, COMPANY, COMMIT),
    ]
    first, second = charged
    assert first.output.qc.score < MINIMUM and first.failure.reason == Reason.QC_UNDER_FLOOR
    assert first.billed.amount_micros == ODD_MODEL_COST
    assert second.billed.amount_micros == 2 * RUNWAY_PER_SECOND
    (fallback,) = of(events, "fallback")
    assert (fallback.from_backend, fallback.to_backend) == (REPLICATE, RUNWAY)
    delivered = events[-1].succeeded
    assert delivered.video.uri == second.output.video.uri != first.output.video.uri
    assert delivered.qc.score >= MINIMUM

    # Reserved before anything was settled: each attempt on its own account's budget.
    assert budget(mesh, tenant).reserved.amount_micros == routed[0].reserved.amount_micros
    assert budget(mesh, COMPANY).reserved.amount_micros == routed[1].reserved.amount_micros
    settle(mesh, charged)
    tenant_budget, company_budget = budget(mesh, tenant), budget(mesh, COMPANY)
    assert (tenant_budget.spent.amount_micros, tenant_budget.reserved.amount_micros) == (ODD_MODEL_COST, 0)
    assert company_budget.spent.amount_micros - company_before == 2 * RUNWAY_PER_SECOND
    spend = metrics(mesh).GetSpend(
        metrics_pb2.GetSpendRequest(
            tenant_id=tenant, first_day=tenant_budget.day, last_day=tenant_budget.day
        ),
        timeout=10,
    )
    assert (spend.spent.amount_micros, spend.reserved.amount_micros) == (ODD_MODEL_COST, 0)

    # The sandbox billed what the ledger holds, line by line.
    bills = sandbox.bills()
    assert bills.by_key == {
        first.reservation_key: ODD_MODEL_COST,
        second.reservation_key: 2 * RUNWAY_PER_SECOND,
    }
    assert (
        bills.total_micros
        == tenant_budget.spent.amount_micros + company_budget.spent.amount_micros - company_before
    )


def test_without_a_guarantee_the_output_is_delivered_and_the_tenant_pays_it(mesh, sandbox):
    tenant = f"bravo-{uuid.uuid4().hex[:8]}"
    events = execute(mesh, tenant, floor=0.5, guarantee=False)
    assert [(r.backend, r.rerender, r.account) for r in of(events, "routed")] == [(REPLICATE, False, tenant)]
    (charge,) = of(events, "charged")
    assert charge.account == tenant and events[-1].succeeded.qc.score < MINIMUM
    settle(mesh, [charge])
    assert budget(mesh, tenant).spent.amount_micros == sandbox.bills().total_micros == ODD_MODEL_COST


# Through the gateway ------------------------------------------------------------------------------------

SLA_ACCOUNT = "aiprod-sla"  # the gateway's default AIPROD_GATEWAY_SLA_ACCOUNT


def test_a_gold_tenants_job_gets_its_free_rerender_and_the_company_pays_for_it(mesh, sandbox):
    tenant = f"gold-{uuid.uuid4().hex[:8]}"
    stub = gateway(mesh, key=mesh.create_api_key(tenant, admin_pb2.SLA_TIER_GOLD, "sla test"))
    company_before = budget(mesh, SLA_ACCOUNT).spent.amount_micros
    spec = render_pb2.RenderSpec(
        prompt="A heron in the reeds",
        duration_seconds=2,
        aspect_ratio=render_pb2.ASPECT_RATIO_9_16,
        constraints=render_pb2.RenderConstraints(preferred_backend=REPLICATE),
    )
    job = stub.CreateRenderJob(gateway_pb2.CreateRenderJobRequest(spec=spec), timeout=30).job
    assert job.tier == admin_pb2.SLA_TIER_GOLD
    done = wait_terminal(stub, job.job_id)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error

    def settled() -> gateway_pb2.RenderJob | None:
        now = stub.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job.job_id), timeout=10).job
        return now if now.attempts and all(a.HasField("charge") and a.settled for a in now.attempts) else None

    assert eventually(lambda: settled() is not None, timeout=60, interval=0.2)
    done = settled()
    assert done is not None
    first, second = done.attempts
    assert (first.backend, first.charge.account) == (REPLICATE, tenant)
    assert (second.backend, second.charge.account) == (RUNWAY, SLA_ACCOUNT)
    assert first.charge.output.qc.score < GOLD_MINIMUM
    assert done.result.video.uri == second.charge.output.video.uri
    # The job's cost is its tenant's; the re-render is the company's.
    assert done.cost.amount_micros == ODD_MODEL_COST
    assert done.company_cost.amount_micros == 2 * RUNWAY_PER_SECOND
    events = stub.WatchRenderJob(gateway_pb2.WatchRenderJobRequest(job_id=job.job_id), timeout=10)
    routed = [
        m.event.render.routed for m in events if m.HasField("event") and m.event.render.HasField("routed")
    ]
    assert [(r.rerender, r.account) for r in routed] == [(False, tenant), (True, SLA_ACCOUNT)]

    # The ledger: each account's line, and together what the sandbox billed.
    assert budget(mesh, tenant).spent.amount_micros == ODD_MODEL_COST
    assert budget(mesh, SLA_ACCOUNT).spent.amount_micros - company_before == 2 * RUNWAY_PER_SECOND
    assert sandbox.bills().total_micros == ODD_MODEL_COST + 2 * RUNWAY_PER_SECOND

    # The tenant's usage: its own spend only.
    usage = stub.GetUsage(gateway_pb2.GetUsageRequest(), timeout=10)
    assert (usage.tenant_id, usage.tier) == (tenant, admin_pb2.SLA_TIER_GOLD)
    assert [(c.state, c.count) for c in usage.jobs] == [(job_pb2.JOB_STATE_SUCCEEDED, 1)]
    assert usage.spend_today.amount_micros == usage.spend_in_range.amount_micros == ODD_MODEL_COST
    assert usage.actual_total.amount_micros == ODD_MODEL_COST
    assert usage.quoted_total.amount_micros == done.quote.price.amount_micros
    assert usage.first_day == usage.last_day == budget(mesh, tenant).day
