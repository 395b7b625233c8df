"""The budget's actions through the real mesh, with the sandbox's providers making the money real:
70% notify, 90% economy, 100% no new jobs, and what becomes of a queued job the budget cannot pay
(the gateway's budget policy: wait, or fail with BUDGET_EXHAUSTED)."""

import itertools
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import pytest
from helpers.mesh import error_info, eventually, gateway, metrics, router, wait_terminal, watch_until
from helpers.sandbox import Sandbox, sandbox_mesh

from aiprod.common.v1 import backend_pb2, event_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.metrics.v1 import metrics_pb2
from aiprod.router.v1 import router_pb2
from aiprod_kit.failures import Reason
from aiprod_kit.mesh import DEVELOPMENT_TENANT, Mesh, ServiceStartError
from aiprod_kit.money import usd

USD = 1_000_000
# The sandbox's Replicate model renders 6 s only. List prices of those 6 s: Replicate 0.05, Runway
# (gen4.5) 0.12, Veo 0.20 USD/s.
SECONDS = 6
REPLICATE_COST, RUNWAY_COST, VEO_COST = 300_000, 720_000, 1_200_000
FLOOR = 0.6  # the default preset's
GATEWAY_DEFAULTS = {
    "AIPROD_GATEWAY_BUDGET_POLICY": "wait",
    "AIPROD_GATEWAY_BUDGET_RETRY_SECONDS": "1",
    "AIPROD_GATEWAY_BUDGET_MAX_WAIT_SECONDS": "0",
}
ENVIRONMENT = {
    "AIPROD_METRICS_DAILY_CAP_USD": "10",
    # Best quality first while 0.5 USD is left: what economy mode overrides.
    "AIPROD_ROUTER_QUALITY_FIRST_BUDGET_USD": "0.5",
    # Each job's quote ranked on the budget as it is this instant: these tests change budgets and
    # create a job at once, and assert which backend its quote chose (the default shares a ranking
    # for a second, README: AIPROD_GATEWAY_ROUTE_CACHE_SECONDS).
    "AIPROD_GATEWAY_ROUTE_CACHE_SECONDS": "0",
    **GATEWAY_DEFAULTS,
}
LOCAL, RUNWAY, VEO, REPLICATE = (
    backend_pb2.BACKEND_LOCAL,
    backend_pb2.BACKEND_RUNWAY,
    backend_pb2.BACKEND_VEO,
    backend_pb2.BACKEND_REPLICATE,
)
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    job_pb2.JOB_STATE_QUEUED,
    job_pb2.JOB_STATE_RUNNING,
    job_pb2.JOB_STATE_SUCCEEDED,
    job_pb2.JOB_STATE_FAILED,
    job_pb2.JOB_STATE_CANCELLED,
)
WAITING = "waiting for budget: "


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with sandbox_mesh(tmp_path_factory.mktemp("budget"), ENVIRONMENT) as running:
        yield running


@pytest.fixture
def sandbox(mesh: Mesh) -> Sandbox:
    control = Sandbox(mesh.address("sandbox"))
    control.reset(render_seconds=1)
    return control


def configure_gateway(mesh: Mesh, **settings: str) -> None:
    """Restarts the gateway with these budget settings (over the defaults) unless it runs with them."""
    wanted = {**GATEWAY_DEFAULTS, **settings}
    if all(mesh.environment.get(name) == value for name, value in wanted.items()):
        return
    mesh.environment.update(wanted)
    mesh.stop_service("gateway")
    mesh.start_service("gateway")


def budgets(mesh: Mesh) -> metrics_pb2.GetBudgetResponse:
    """The budgets of the development tenant, whose key the tests' jobs are created with, and everyone's."""
    return metrics(mesh).GetBudget(metrics_pb2.GetBudgetRequest(tenant_id=DEVELOPMENT_TENANT))


@contextmanager
def budget_left(mesh: Mesh, micros: int, tenant: str = DEVELOPMENT_TENANT) -> Iterator[Callable[[], None]]:
    """Reserves all of today's budget but `micros`: of the development tenant's budget (its jobs', the
    one the router reads for them), or, as another tenant, of the global budget alone. Yields the
    release, which also runs on the way out."""
    # Jobs of earlier tests settle just after their last event.
    assert eventually(lambda: budgets(mesh).global_budget.reserved.amount_micros == 0)
    response = budgets(mesh)
    left = (
        response.budget if tenant == DEVELOPMENT_TENANT else response.global_budget
    ).remaining.amount_micros
    assert left > micros, "earlier tests spent too much of the cap"
    key = f"filler-{uuid.uuid4().hex}"
    metrics(mesh).ReserveBudget(
        metrics_pb2.ReserveBudgetRequest(
            reservation_key=key, tenant_id=tenant, amount=usd(left - micros), job_id=key
        )
    )

    def release() -> None:
        metrics(mesh).ReleaseBudget(metrics_pb2.ReleaseBudgetRequest(reservation_key=key))

    try:
        yield release
    finally:
        release()


def shot() -> render_pb2.Shot:
    return render_pb2.Shot(
        prompt="A budget", duration_seconds=SECONDS, aspect_ratio=render_pb2.ASPECT_RATIO_16_9
    )


def create(
    mesh: Mesh, prompt: str, preferred: int = 0, preset: str = "", request_id: str = ""
) -> gateway_pb2.RenderJob:
    spec = render_pb2.RenderSpec(
        prompt=prompt,
        preset=preset,
        duration_seconds=SECONDS,
        constraints=render_pb2.RenderConstraints(preferred_backend=preferred),
    )
    request = gateway_pb2.CreateRenderJobRequest(request_id=request_id, spec=spec)
    return gateway(mesh).CreateRenderJob(request).job


def get(mesh: Mesh, job_id: str) -> gateway_pb2.RenderJob:
    return gateway(mesh).GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job_id)).job


def events(mesh: Mesh, job_id: str) -> list[gateway_pb2.JobEvent]:
    """Every event of a job, once it has ended."""
    return watch_until(gateway(mesh), job_id, lambda event: False)


def wait_for_waiting(mesh: Mesh, job_id: str) -> gateway_pb2.JobEvent:
    """The job's event saying that it waits for budget."""
    return watch_until(gateway(mesh), job_id, lambda event: event.message.startswith(WAITING))[-1]


def never_reserved(mesh: Mesh, job: gateway_pb2.RenderJob) -> bool:
    """Whether the job's first attempt never got a line in the ledger."""
    try:
        metrics(mesh).ReleaseBudget(metrics_pb2.ReleaseBudgetRequest(reservation_key=f"{job.job_id}.shot0:1"))
    except grpc.RpcError as error:
        return error.code() == grpc.StatusCode.NOT_FOUND
    return False


def level_notes(mesh: Mesh, job_id: str) -> list[str]:
    """The job's events that say how much of today's budget is used (its attempts' reservations)."""
    return [event.message for event in events(mesh, job_id) if "today's budget is" in event.message]


def first_choice(mesh: Mesh) -> int:
    """The backend the router ranks first for the shot, as PlanRoute tells."""
    plan = router(mesh).PlanRoute(
        router_pb2.PlanRouteRequest(
            shot=shot(),
            constraints=render_pb2.RenderConstraints(quality_floor=FLOOR),
            tenant_id=DEVELOPMENT_TENANT,
        )
    )
    return next(candidate.backend for candidate in plan.candidates if candidate.eligible)


# The three budget levels ------------------------------------------------------------------------------


def test_at_70_percent_the_jobs_reservation_tells_that_the_budget_is_at_notify(mesh, sandbox):
    with budget_left(mesh, 2_500_000):
        assert budgets(mesh).budget.level == metrics_pb2.BUDGET_LEVEL_NOTIFY
        done = wait_terminal(gateway(mesh), create(mesh, "At notify").job_id)
    assert done.state == SUCCEEDED, done.error
    # Not economy yet: the best quality, as 0.5 USD or more is left.
    assert done.backend == RUNWAY
    # The attempt reserved its own worst case, at the backend it went to, and paid what Runway bills.
    assert done.reserved.amount_micros == RUNWAY_COST
    [attempt] = done.attempts
    assert attempt.reservation_key == f"{done.job_id}.shot0:1"
    assert (attempt.charge.outcome, attempt.charge.billed.amount_micros) == (
        event_pb2.CHARGE_OUTCOME_COMMIT,
        RUNWAY_COST,
    )
    assert done.cost.amount_micros == RUNWAY_COST
    [note] = level_notes(mesh, done.job_id)
    assert note.startswith("routed to runway") and note.endswith("today's budget is 82% used (notify)")


def test_at_90_percent_economy_the_router_goes_for_the_cheapest(mesh, sandbox):
    with budget_left(mesh, 2_500_000):
        assert first_choice(mesh) == RUNWAY  # best quality first: 2.50 USD left
    with budget_left(mesh, 850_000):
        assert budgets(mesh).budget.level == metrics_pb2.BUDGET_LEVEL_ECONOMY
        # Still over the quality-first threshold, but economy mode: the cheapest that meets the floor.
        assert first_choice(mesh) == REPLICATE
        done = wait_terminal(gateway(mesh), create(mesh, "In economy").job_id)
    assert done.state == SUCCEEDED, done.error
    assert done.backend == REPLICATE
    assert done.result.cost.amount_micros == REPLICATE_COST
    notes = level_notes(mesh, done.job_id)
    assert len(notes) == 1 and notes[0].endswith("(economy)"), notes


def test_at_100_percent_new_jobs_are_refused_and_a_retry_of_an_earlier_one_finds_its_job(mesh, sandbox):
    # A preset that awaits approval: these jobs spend nothing.
    before = create(mesh, "Before the cap", preset="brand_campaign", request_id="before-the-cap")
    tries = itertools.count()
    with budget_left(mesh, 0):
        assert budgets(mesh).budget.level == metrics_pb2.BUDGET_LEVEL_EXHAUSTED

        def refused() -> bool:
            # A new request each time: one accepted before the gateway's view of the level catches up
            # awaits approval, spending nothing.
            try:
                create(mesh, "At the cap", preset="brand_campaign", request_id=f"at-the-cap-{next(tries)}")
            except grpc.RpcError as error:
                return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False

        assert eventually(refused, timeout=10, interval=0.2)
        # A retry of a request whose job exists is that job, not a new one refused.
        again = create(mesh, "Before the cap", preset="brand_campaign", request_id="before-the-cap")
        assert again.job_id == before.job_id
        with pytest.raises(grpc.RpcError) as raised:
            create(mesh, "Another one at the cap")
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(raised.value)
        assert info.reason == "BUDGET_EXHAUSTED"
        spent = budgets(mesh).global_budget
        assert dict(info.metadata) == {
            "scope": "global",
            "tenant_id": "",
            "day": spent.day,
            "remaining_micros": "0",
            "cap_micros": str(spent.cap.amount_micros),
        }


# The router: exclusion codes, its failure, each attempt's own reservation -----------------------------


def test_the_router_fails_budget_exhausted_and_reserves_each_attempt_itself(mesh, sandbox):
    constraints = render_pb2.RenderConstraints(quality_floor=FLOOR)

    def render() -> list:
        request = router_pb2.ExecuteRenderRequest(
            job_id="job-direct",
            shot=shot(),
            constraints=constraints,
            idempotency_key=f"direct-{uuid.uuid4().hex}",
            tenant_id=DEVELOPMENT_TENANT,
        )
        return [response.event for response in router(mesh).ExecuteRender(request, timeout=120)]

    with budget_left(mesh, 100_000):
        plan = router(mesh).PlanRoute(
            router_pb2.PlanRouteRequest(shot=shot(), constraints=constraints, tenant_id=DEVELOPMENT_TENANT)
        )
        assert {candidate.backend: list(candidate.exclusions) for candidate in plan.candidates} == {
            LOCAL: [router_pb2.EXCLUSION_UNDER_QUALITY_FLOOR],
            REPLICATE: [router_pb2.EXCLUSION_OVER_BUDGET],
            RUNWAY: [router_pb2.EXCLUSION_OVER_BUDGET],
            VEO: [router_pb2.EXCLUSION_OVER_BUDGET],
        }
        unpaid = render()
        assert [event.WhichOneof("kind") for event in unpaid] == ["failed"]
        assert unpaid[0].failed.reason == Reason.BUDGET_EXHAUSTED
        assert "over the budget left 0.10 USD" in unpaid[0].failed.message
    with budget_left(mesh, 400_000):
        # Replicate fits: the router reserves the attempt before its provider is called, and says
        # what it cost once it ended; settling is the caller's (the gateway's) part.
        paid = render()
        assert paid[-1].HasField("succeeded"), paid[-1]
        [routed] = [event.routed for event in paid if event.HasField("routed")]
        assert (routed.backend, routed.reserved.amount_micros) == (REPLICATE, REPLICATE_COST)
        [charged] = [event.charged for event in paid if event.HasField("charged")]
        assert charged.reservation_key == routed.reservation_key
        assert (charged.outcome, charged.billed.amount_micros) == (
            event_pb2.CHARGE_OUTCOME_COMMIT,
            REPLICATE_COST,
        )
        assert budgets(mesh).budget.reserved.amount_micros >= REPLICATE_COST
        metrics(mesh).CommitSpend(
            metrics_pb2.CommitSpendRequest(reservation_key=charged.reservation_key, actual=charged.billed)
        )


# The wait policy --------------------------------------------------------------------------------------


def test_a_job_the_ledger_refuses_waits_queued_through_a_restart_and_renders_once_paid(mesh, sandbox):
    configure_gateway(mesh)
    # Another tenant took the global budget: the router, reading the job's tenant's, sees plenty,
    # and the ledger refuses the reservation.
    with budget_left(mesh, 100_000, tenant="other") as release:
        job = create(mesh, "Waits for the ledger")
        waiting = wait_for_waiting(mesh, job.job_id)
        assert waiting.state == QUEUED
        assert "0.10 USD left of 10.00 USD, 0.72 USD asked" in waiting.message
        assert get(mesh, job.job_id).HasField("budget_wait_start_time")
        mesh.stop_service("gateway")
        mesh.start_service("gateway")
        assert get(mesh, job.job_id).state == QUEUED
        release()
        done = wait_terminal(gateway(mesh), job.job_id)
    assert done.state == SUCCEEDED, done.error
    assert done.reserved.amount_micros == RUNWAY_COST
    log = events(mesh, job.job_id)
    assert sum(event.message.startswith(WAITING) for event in log) == 1  # once, restart or not
    states = [event.state for event in log]
    assert states.index(RUNNING) > next(i for i, e in enumerate(log) if e.message.startswith(WAITING))
    assert set(states[: states.index(RUNNING)]) == {QUEUED}


def test_cancelling_a_waiting_job_ends_it_and_reserves_nothing(mesh, sandbox):
    configure_gateway(mesh)
    with budget_left(mesh, 100_000):
        job = create(mesh, "Cancelled while waiting")
        waiting = wait_for_waiting(mesh, job.job_id)
        assert "replicate: cost 0.30 USD over the budget left 0.10 USD" in waiting.message
        reserved = budgets(mesh).budget.reserved.amount_micros
        cancelled = gateway(mesh).CancelRenderJob(gateway_pb2.CancelRenderJobRequest(job_id=job.job_id)).job
        assert cancelled.state == CANCELLED
        assert budgets(mesh).budget.reserved.amount_micros == reserved
    # With money free again, a job that renders outlasts the waiting job's retry interval: the
    # cancelled one was not tried again.
    assert wait_terminal(gateway(mesh), create(mesh, "After the cancel").job_id).state == SUCCEEDED
    assert never_reserved(mesh, job)
    log = events(mesh, job.job_id)
    assert log[-1].state == CANCELLED and log[-1].message.startswith("cancelled")
    assert RUNNING not in {event.state for event in log}


def test_a_job_waits_no_longer_than_the_max_wait(mesh, sandbox):
    configure_gateway(mesh, AIPROD_GATEWAY_BUDGET_MAX_WAIT_SECONDS="1")
    with budget_left(mesh, 100_000):
        done = wait_terminal(gateway(mesh), create(mesh, "Waits too long").job_id)
    assert (done.state, done.error.reason) == (FAILED, Reason.BUDGET_EXHAUSTED)
    assert "after 1 s waiting for budget" in done.error.message
    log = events(mesh, done.job_id)
    assert [event.state for event in log] == [QUEUED, QUEUED, FAILED]
    assert log[1].message.startswith(WAITING)
    assert never_reserved(mesh, done)


def test_a_waiting_job_goes_as_soon_as_a_settled_job_frees_money(mesh, sandbox):
    # Retries far apart: only the settlement of the cancelled job can wake the waiting one in time.
    configure_gateway(mesh, AIPROD_GATEWAY_BUDGET_RETRY_SECONDS="600")
    with budget_left(mesh, 400_000):
        slow = create(mesh, "Holds the money [sandbox:never]", preferred=REPLICATE)
        watch_until(gateway(mesh), slow.job_id, lambda event: event.render.HasField("submitted"))
        # 0.40 left: the slow job's attempt reserved 0.30, and 0.10 is left.
        assert get(mesh, slow.job_id).reserved.amount_micros == REPLICATE_COST
        waiter = create(mesh, "Waits for it", preferred=REPLICATE)
        waiting = wait_for_waiting(mesh, waiter.job_id)
        assert "replicate: cost 0.30 USD over the budget left 0.10 USD" in waiting.message
        assert get(mesh, waiter.job_id).state == QUEUED
        # Replicate bills nothing for a cancelled prediction: its reservation is released.
        gateway(mesh).CancelRenderJob(gateway_pb2.CancelRenderJobRequest(job_id=slow.job_id))
        done = wait_terminal(gateway(mesh), waiter.job_id)
    assert done.state == SUCCEEDED, done.error
    assert (done.backend, done.reserved.amount_micros) == (REPLICATE, REPLICATE_COST)
    cancelled = get(mesh, slow.job_id)
    assert [attempt.charge.outcome for attempt in cancelled.attempts] == [event_pb2.CHARGE_OUTCOME_RELEASE]
    assert cancelled.cost.amount_micros == 0


# The fail policy --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tenant", "why"),
    [
        (DEVELOPMENT_TENANT, "replicate: cost 0.30 USD over the budget left 0.10 USD"),
        ("other", "0.10 USD left of 10.00 USD, 0.72 USD asked"),
    ],
    ids=["the router excludes every backend", "the ledger refuses"],
)
def test_with_the_fail_policy_a_job_the_budget_cannot_pay_fails_budget_exhausted(mesh, sandbox, tenant, why):
    configure_gateway(mesh, AIPROD_GATEWAY_BUDGET_POLICY="fail")
    with budget_left(mesh, 100_000, tenant=tenant):
        done = wait_terminal(gateway(mesh), create(mesh, "Cannot be paid").job_id)
    assert (done.state, done.error.reason) == (FAILED, Reason.BUDGET_EXHAUSTED)
    assert why in done.error.message
    assert [event.state for event in events(mesh, done.job_id)] == [QUEUED, FAILED]
    assert never_reserved(mesh, done)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("AIPROD_GATEWAY_BUDGET_RETRY_SECONDS", "0"), ("AIPROD_GATEWAY_BUDGET_MAX_WAIT_SECONDS", "-1")],
)
def test_a_wrong_budget_setting_stops_the_gateway_naming_it(tmp_path, variable, value):
    gateway_only = Mesh(tmp_path, free_ports=True, only=("gateway",), environment={variable: value})
    with pytest.raises(ServiceStartError) as stopped:
        gateway_only.start()
    assert variable in str(stopped.value)
