"""The chain's free re-render: an output under the service level's minimum earns one re-render on a
backend of better nominal quality, reserved under the company's account. Renderers and the ledger are
fakes; the chain and the routing policy are the real ones."""

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from fake_streams import watch_renders
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from aiprod.common.v1 import backend_pb2, event_pb2, render_pb2
from aiprod.metrics.v1 import metrics_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod.router.v1 import router_pb2
from aiprod_kit.breaker import CircuitBreaker
from aiprod_kit.errors import ErrorReason, ServiceError
from aiprod_kit.failures import Reason
from aiprod_kit.money import usd, usd_from_units
from aiprod_kit.settings import RouterSettings
from aiprod_router.backends import Renderer
from aiprod_router.chain import RenderChain, RenderJob
from aiprod_router.stats import BackendStats
from aiprod_router.telemetry import RouterMetrics

RUNWAY, VEO, REPLICATE = backend_pb2.BACKEND_RUNWAY, backend_pb2.BACKEND_VEO, backend_pb2.BACKEND_REPLICATE
COMPANY = "aiprod-sla"
TENANT = "acme"
# Nominal quality and price a second.
BACKENDS = {REPLICATE: (0.75, 0.05), VEO: (0.92, 0.20), RUNWAY: (0.95, 0.12)}


class RendererStub:
    """A renderer whose renders succeed at once with the QC scores it is given, in turn."""

    def __init__(self, backend: int, scores: list[float]) -> None:
        self.backend = backend
        self.scores = list(scores)
        self.started: list[str] = []
        self._renders: dict[str, renderer_pb2.Render] = {}

    async def StartRender(self, request, timeout=None):
        task_id = f"{backend_pb2.Backend.Name(self.backend)}-{len(self.started)}"
        self.started.append(request.idempotency_key)
        score = self.scores.pop(0) if self.scores else 0.99
        handle = backend_pb2.RenderHandle(
            backend=self.backend, task_id=task_id, idempotency_key=request.idempotency_key
        )
        price = BACKENDS[self.backend][1]
        cost = usd_from_units(price * request.shot.duration_seconds)
        output = render_pb2.RenderOutput(
            video=render_pb2.VideoArtifact(
                uri=f"file:///{task_id}.mp4", duration_seconds=request.shot.duration_seconds
            ),
            qc=render_pb2.QcReport(score=score),
            cost=cost,
        )
        self._renders[task_id] = renderer_pb2.Render(
            handle=handle, state=renderer_pb2.RENDER_STATE_SUCCEEDED, output=output, charge=cost
        )
        return renderer_pb2.StartRenderResponse(
            render=renderer_pb2.Render(handle=handle, state=renderer_pb2.RENDER_STATE_RUNNING)
        )

    def WatchRenders(self, requests):
        return watch_renders(requests, self._statuses)

    async def _statuses(self, task_id: str) -> AsyncIterator[renderer_pb2.Render]:
        yield self._renders[task_id]


@dataclass
class Ledger:
    """ReserveBudget and GetBudget as the metrics service answers them, for a few accounts."""

    caps: dict[str, int] = field(default_factory=dict)
    reservations: dict[str, metrics_pb2.Reservation] = field(default_factory=dict)

    def used(self, tenant: str) -> int:
        return sum(r.amount.amount_micros for r in self.reservations.values() if r.tenant_id == tenant)

    async def ReserveBudget(self, request, timeout=None):
        existing = self.reservations.get(request.reservation_key)
        if existing is not None:
            if existing.tenant_id != request.tenant_id:
                raise _status_error(grpc.StatusCode.ALREADY_EXISTS, ErrorReason.RESERVATION_KEY_CONFLICT)
            return metrics_pb2.ReserveBudgetResponse(reservation=existing, existing=True)
        cap = self.caps.get(request.tenant_id, 0)
        if cap and self.used(request.tenant_id) + request.amount.amount_micros > cap:
            raise _status_error(grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorReason.BUDGET_EXHAUSTED)
        reservation = metrics_pb2.Reservation(
            reservation_key=request.reservation_key,
            tenant_id=request.tenant_id,
            amount=request.amount,
            backend=request.backend,
            job_id=request.job_id,
        )
        self.reservations[request.reservation_key] = reservation
        return metrics_pb2.ReserveBudgetResponse(reservation=reservation)

    async def GetBudget(self, request, timeout=None):
        cap = self.caps.get(request.tenant_id, 0)
        used = self.used(request.tenant_id)
        budget = metrics_pb2.Budget(
            tenant_id=request.tenant_id, cap=usd(cap), remaining=usd(max(cap - used, 0) if cap else 0)
        )
        return metrics_pb2.GetBudgetResponse(budget=budget, global_budget=metrics_pb2.Budget())


def _status_error(code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    """An error status as the metrics service sends it, its ErrorInfo naming the reason."""
    details = ServiceError("refused", reason=reason).details()
    status = rpc_status.to_status(
        status_pb2.Status(code=getattr(code_pb2, code.name), message="refused", details=details)
    )
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata), "refused"
    )


class Pool:
    def __init__(self, scores: dict[int, list[float]], backends: dict[int, tuple[float, float]] = BACKENDS):
        self.renderers: dict[int, Renderer] = {}
        for backend, (quality, price) in backends.items():
            capabilities = renderer_pb2.Capabilities(
                min_duration_seconds=1,
                max_duration_seconds=10,
                aspect_ratios=[render_pb2.ASPECT_RATIO_16_9],
                price_per_second=usd_from_units(price),
                nominal_quality=quality,
            )
            self.renderers[backend] = Renderer(
                backend,
                "fake",
                None,  # type: ignore[arg-type]
                RendererStub(backend, scores.get(backend, [])),  # type: ignore[arg-type]
                serving=True,
                capabilities=capabilities,
                stats=BackendStats(),
                breaker=CircuitBreaker(3, 30.0),
            )

    def get(self, backend: int) -> Renderer | None:
        return self.renderers.get(backend)


_keys = itertools.count()


def job(
    floor: float = 0.5,
    minimum: float = 0.8,
    preferred: int = REPLICATE,
    rerender_granted: bool = False,
    max_cost: float | None = None,
) -> RenderJob:
    constraints = render_pb2.RenderConstraints(quality_floor=floor, preferred_backend=preferred)
    if max_cost is not None:
        constraints.max_cost.CopyFrom(usd_from_units(max_cost))
    guarantee = router_pb2.QualityGuarantee(quality_minimum=minimum, account=COMPANY) if minimum else None
    return RenderJob(
        "job-1",
        render_pb2.Shot(prompt="a heron", duration_seconds=4, aspect_ratio=render_pb2.ASPECT_RATIO_16_9),
        constraints,
        f"job-{next(_keys)}",
        tenant_id=TENANT,
        guarantee=guarantee,
        rerender_granted=rerender_granted,
    )


def chain(pool: Pool, ledger: Ledger, max_attempts: int = 3) -> RenderChain:
    settings = RouterSettings(router_max_attempts=max_attempts)
    return RenderChain(pool, ledger, settings, RouterMetrics(lambda: pool.renderers.values()))  # type: ignore[arg-type]


async def events(chain: RenderChain, render: RenderJob, **resume) -> list[event_pb2.RenderEvent]:
    return [item async for item in chain.run(render, **resume)]


def of(items: list[event_pb2.RenderEvent], kind: str) -> list:
    return [getattr(item, kind) for item in items if item.WhichOneof("kind") == kind]


async def test_an_output_under_the_minimum_earns_one_rerender_on_a_better_backend_paid_by_the_company():
    pool, ledger = Pool({REPLICATE: [0.6]}), Ledger()
    items = await events(chain(pool, ledger), job())

    routed, charged = of(items, "routed"), of(items, "charged")
    assert [(r.backend, r.rerender, r.account) for r in routed] == [
        (REPLICATE, False, TENANT),
        (RUNWAY, True, COMPANY),  # better than Replicate's 0.75, and cheaper than Veo
    ]
    assert "free re-render" in routed[1].reason
    assert [(c.backend, c.account) for c in charged] == [(REPLICATE, TENANT), (RUNWAY, COMPANY)]
    assert charged[0].failure.reason == Reason.QC_UNDER_FLOOR and charged[0].output.qc.score == 0.6
    assert "minimum 0.80" in charged[0].failure.message
    assert items[-1].succeeded.qc.score == 0.99
    # The ledger: the first attempt the tenant's, the re-render the company's.
    assert {key: r.tenant_id for key, r in ledger.reservations.items()} == {
        routed[0].reservation_key: TENANT,
        routed[1].reservation_key: COMPANY,
    }


async def test_only_one_rerender_per_job_and_it_may_pass_the_attempt_limit():
    # A limit of one attempt: Replicate delivers 0.6 (earning it), the re-render at Runway (one attempt
    # past the limit) 0.7, under the minimum too: no second free re-render; the better output is the job's.
    pool, ledger = Pool({REPLICATE: [0.6], RUNWAY: [0.7]}), Ledger()
    items = await events(chain(pool, ledger, max_attempts=1), job())
    assert [(r.backend, r.rerender) for r in of(items, "routed")] == [(REPLICATE, False), (RUNWAY, True)]
    assert items[-1].succeeded.qc.score == 0.7
    # Under the floor after the re-render: the usual fallback at the tenant's cost, within the limit
    # plus the re-render's extra attempt.
    pool, ledger = Pool({REPLICATE: [0.6], RUNWAY: [0.55], VEO: [0.5]}), Ledger()
    items = await events(chain(pool, ledger, max_attempts=2), job(floor=0.65))
    routed = of(items, "routed")
    assert [(r.backend, r.rerender, r.account) for r in routed] == [
        (REPLICATE, False, TENANT),
        (RUNWAY, True, COMPANY),
        (VEO, False, TENANT),
    ]
    # Nothing beat the output that earned the re-render: it stays the job's.
    assert items[-1].succeeded.qc.score == 0.6
    assert [c.account for c in of(items, "charged")] == [TENANT, COMPANY, TENANT]


async def test_no_better_backend_delivers_the_output_as_it_is():
    # Runway (the best) delivered under the minimum: nothing is better; over the floor, it is delivered.
    pool, ledger = Pool({RUNWAY: [0.85]}), Ledger()
    items = await events(chain(pool, ledger), job(minimum=0.9, preferred=RUNWAY))
    assert [r.backend for r in of(items, "routed")] == [RUNWAY]
    (charge,) = of(items, "charged")
    assert not charge.HasField("failure") and charge.account == TENANT
    assert items[-1].succeeded.qc.score == 0.85
    # Under the floor as well: the usual fallback applies, at the tenant's cost.
    pool, ledger = Pool({RUNWAY: [0.6], VEO: [0.95]}), Ledger()
    items = await events(chain(pool, ledger), job(floor=0.8, minimum=0.9, preferred=RUNWAY))
    assert [(r.backend, r.rerender, r.account) for r in of(items, "routed")] == [
        (RUNWAY, False, TENANT),
        (VEO, False, TENANT),
    ]
    assert "under the floor 0.80" in of(items, "charged")[0].failure.message


async def test_the_company_budget_ranks_the_rerender_and_the_tenants_cost_limit_does_not():
    # The company's budget fits Runway (0.48 USD) but not Veo; the tenant's max cost (0.25 USD) would
    # not fit Runway, but the re-render is not the tenant's money.
    pool, ledger = Pool({REPLICATE: [0.6]}), Ledger(caps={COMPANY: 500_000})
    items = await events(chain(pool, ledger), job(max_cost=0.25))
    assert [(r.backend, r.rerender) for r in of(items, "routed")] == [(REPLICATE, False), (RUNWAY, True)]
    # Nothing left of the company's budget: no re-render, the output is delivered.
    pool, ledger = Pool({REPLICATE: [0.6]}), Ledger(caps={COMPANY: 100_000})
    items = await events(chain(pool, ledger), job())
    assert [r.backend for r in of(items, "routed")] == [REPLICATE]
    assert items[-1].succeeded.qc.score == 0.6


async def test_without_a_guarantee_or_once_granted_nothing_is_free():
    pool, ledger = Pool({REPLICATE: [0.6]}), Ledger()
    items = await events(chain(pool, ledger), job(minimum=0))
    assert [(r.backend, r.rerender) for r in of(items, "routed")] == [(REPLICATE, False)]
    assert items[-1].succeeded.qc.score == 0.6
    # Resumed after the re-render was granted: no second one; the resumed attempt's account is left to
    # the caller, which recorded whose it was.
    pool, ledger = Pool({REPLICATE: [0.6]}), Ledger()
    render = job(rerender_granted=True)
    start = await pool.get(REPLICATE).stub.StartRender(
        renderer_pb2.StartRenderRequest(idempotency_key=f"{render.idempotency_key}:3", shot=render.shot)
    )
    items = await events(chain(pool, ledger), render, resume=start.render.handle, resume_attempt=3)
    assert of(items, "routed") == []
    assert [c.account for c in of(items, "charged")] == [""]
    assert items[-1].succeeded.qc.score == 0.6


async def test_a_key_reserved_under_the_company_before_a_restart_stays_the_rerender():
    """A router that restarted after reserving the re-render, resumed on the attempt before it without
    knowing the re-render was granted and routing it otherwise now: the ledger's line decides."""
    # The company's budget: exactly the re-render reserved before the restart, so that now no better
    # backend fits it and the chain routes attempt 2 as the tenant's usual fallback from the floor.
    pool, ledger = Pool({REPLICATE: [0.6]}), Ledger(caps={COMPANY: 480_000})
    render = job(floor=0.7)
    key = f"{render.idempotency_key}:2"
    ledger.reservations[key] = metrics_pb2.Reservation(
        reservation_key=key, tenant_id=COMPANY, amount=usd(480_000), backend=RUNWAY, job_id="job-1"
    )
    start = await pool.get(REPLICATE).stub.StartRender(
        renderer_pb2.StartRenderRequest(idempotency_key=f"{render.idempotency_key}:1", shot=render.shot)
    )
    items = await events(chain(pool, ledger), render, resume=start.render.handle, resume_attempt=1)
    (routed,) = of(items, "routed")
    assert (routed.backend, routed.account, routed.rerender, routed.reservation_key) == (
        RUNWAY,
        COMPANY,
        True,
        key,
    )
    assert [c.account for c in of(items, "charged")] == [TENANT, COMPANY]
    assert len(ledger.reservations) == 1  # nothing reserved twice, nor under the tenant
    assert items[-1].succeeded.qc.score == 0.99


@pytest.mark.parametrize("minimum", [0.0, 0.8])
async def test_a_tenant_budget_is_what_ranks_its_attempts(minimum):
    pool, ledger = Pool({}), Ledger(caps={TENANT: 300_000})
    items = await events(chain(pool, ledger), job(minimum=minimum, preferred=RUNWAY))
    # Runway (0.48 USD) is over what the tenant has left: Replicate (0.20 USD) is the route.
    assert [(r.backend, r.account) for r in of(items, "routed")] == [(REPLICATE, TENANT)]
