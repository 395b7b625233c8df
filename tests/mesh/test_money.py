"""Every provider dollar recorded once, through the real mesh against the provider sandbox: each attempt
is a line on its job and in the ledger, and once its jobs are settled the ledger's committed spend
equals what the sandbox's providers billed, to the micro-dollar (a QC fallback, a cancelled Runway task
and Veo render, a safety refusal, the metrics service and the gateway SIGKILLed mid-flight).

The ledger is not reset between tests: each test compares the spend it adds with what the sandbox,
reset at its start, billed.
"""

import json
from collections.abc import Iterator

import pytest
from helpers.mesh import budget, eventually, gateway, wait_terminal, watch_until
from helpers.sandbox import Sandbox, sandbox_mesh, settled_sandbox

from aiprod.common.v1 import backend_pb2, event_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_kit.failures import SAFETY_REASONS, Reason
from aiprod_kit.mesh import Mesh

RUNWAY, VEO, REPLICATE = backend_pb2.BACKEND_RUNWAY, backend_pb2.BACKEND_VEO, backend_pb2.BACKEND_REPLICATE
SUCCEEDED, FAILED, CANCELLED = (
    job_pb2.JOB_STATE_SUCCEEDED,
    job_pb2.JOB_STATE_FAILED,
    job_pb2.JOB_STATE_CANCELLED,
)
COMMIT, RELEASE = event_pb2.CHARGE_OUTCOME_COMMIT, event_pb2.CHARGE_OUTCOME_RELEASE

# A Replicate model that renders its default shape (16:9, 5 s) whatever it is asked: the renderer maps
# our aspect ratio and duration to inputs the model does not have. Asked for 2 s of 9:16 it delivers a
# paid video that QC scores 0.6 (wrong length, wrong orientation), under a 0.75 floor that Replicate's
# nominal quality (0.75) still meets.
ODD_MODEL = "sandbox/fixed-shape"
ODD_MAPPING = {"prompt": "prompt", "aspect_ratio": "ratio", "duration_seconds": "length"}
FLOOR = 0.75
# The renderer charges the asked 2 s at its 0.05 USD/s; the sandbox bills the 5 s the model rendered at
# the model's price there, set to 0.02 USD/s: both 0.10 USD.
ODD_MODEL_SANDBOX_PRICE = 0.02
ODD_MODEL_COST = 100_000
# Runway gen4.5: 12 credits (0.12 USD) a second.
RUNWAY_PER_SECOND = 120_000
# Veo's default model without audio: 0.20 USD a second.
VEO_PER_SECOND = 200_000

ENVIRONMENT = {
    "AIPROD_REPLICATE_MODEL": ODD_MODEL,
    "AIPROD_REPLICATE_INPUT_MAPPING": json.dumps(ODD_MAPPING),
}
# Long enough for the money of a settlement retried with backoff (up to 10 s apart) to land.
SETTLE_SECONDS = 60


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with sandbox_mesh(tmp_path_factory.mktemp("money"), ENVIRONMENT) as running:
        yield running


@pytest.fixture
def sandbox(mesh: Mesh) -> Sandbox:
    """The sandbox, reset once the ledger holds nothing in flight from earlier tests."""
    control = settled_sandbox(mesh, SETTLE_SECONDS)
    control.reset(provider="replicate", prices={ODD_MODEL: ODD_MODEL_SANDBOX_PRICE})
    return control


def spent(mesh: Mesh) -> int:
    return budget(mesh).spent.amount_micros


def create(
    mesh: Mesh,
    prompt: str,
    backend: int,
    seconds: float = 2,
    aspect_ratio: int = render_pb2.ASPECT_RATIO_16_9,
    floor: float = 0.0,
) -> gateway_pb2.RenderJob:
    spec = render_pb2.RenderSpec(
        prompt=prompt,
        duration_seconds=seconds,
        aspect_ratio=aspect_ratio,
        constraints=render_pb2.RenderConstraints(preferred_backend=backend, quality_floor=floor),
    )
    return gateway(mesh).CreateRenderJob(gateway_pb2.CreateRenderJobRequest(spec=spec), timeout=30).job


def get(mesh: Mesh, job_id: str) -> gateway_pb2.RenderJob:
    return gateway(mesh).GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job_id), timeout=10).job


def submitted(mesh: Mesh, job_id: str) -> None:
    """Returns once the job's render was accepted by its backend."""
    events = watch_until(gateway(mesh), job_id, lambda event: event.render.HasField("submitted"))
    assert events and events[-1].render.HasField("submitted"), events[-1:]


def running(mesh: Mesh, job_id: str) -> None:
    """Returns once the job's render has reported progress from its provider (the task runs)."""
    events = watch_until(gateway(mesh), job_id, lambda event: event.render.HasField("progress"))
    assert events and events[-1].render.HasField("progress"), events[-1:]


def is_settled(job: gateway_pb2.RenderJob) -> bool:
    return bool(job.attempts) and all(a.HasField("charge") and a.settled for a in job.attempts)


def settled(mesh: Mesh, job_id: str, timeout: float = SETTLE_SECONDS) -> gateway_pb2.RenderJob:
    """The job once the ledger has every one of its attempts' settlements."""
    assert eventually(lambda: is_settled(get(mesh, job_id)), timeout=timeout, interval=0.2), get(mesh, job_id)
    return get(mesh, job_id)


def billed_settles(sandbox: Sandbox, count: int) -> None:
    """Waits until the sandbox has billed `count` tasks (a task is billed at its final state)."""
    assert eventually(lambda: len(sandbox.bills().tasks) >= count, timeout=SETTLE_SECONDS), sandbox.bills()


def assert_each_attempt_as_billed(job: gateway_pb2.RenderJob, sandbox: Sandbox) -> None:
    """Each attempt's billed amount is its task's bill at the sandbox, and the job's cost their sum."""
    bills = sandbox.bills()
    for attempt in job.attempts:
        charge = attempt.charge
        # The attempt's reservation key is its render's idempotency key at the provider: one task each.
        tasks = [task_id for task_id, bill in bills.tasks.items() if bill["key"] == attempt.reservation_key]
        assert len(tasks) <= 1, (attempt, bills)
        assert charge.billed.amount_micros == bills.by_key.get(attempt.reservation_key, 0), (charge, bills)
        # Task ids as the sandbox names them: Vertex's operation name ends with it.
        assert all(charge.task_id.endswith(task_id) for task_id in tasks), (charge, bills)
    assert job.cost.amount_micros == sum(a.charge.billed.amount_micros for a in job.attempts)


# 1. A paid output under the quality floor ---------------------------------------------------------------


def test_a_qc_fallback_is_paid_twice_and_recorded_twice(mesh, sandbox):
    before = spent(mesh)
    job = create(
        mesh,
        "A heron in the reeds",
        REPLICATE,
        seconds=2,
        aspect_ratio=render_pb2.ASPECT_RATIO_9_16,
        floor=FLOOR,
    )
    done = wait_terminal(gateway(mesh), job.job_id)
    assert done.state == SUCCEEDED, done.error
    assert done.backend == RUNWAY
    done = settled(mesh, job.job_id)

    first, second = done.attempts  # two attempts, no more
    assert (first.attempt, first.backend, second.attempt, second.backend) == (1, REPLICATE, 2, RUNWAY)
    assert first.reservation_key != second.reservation_key
    assert first.reservation_key.endswith(":1") and second.reservation_key.endswith(":2")
    for attempt in (first, second):
        assert attempt.charge.outcome == COMMIT, attempt
        assert attempt.charge.task_id == attempt.handle.task_id
    # The first attempt's paid output stays listed on its charge, with the QC that replaced it.
    assert first.charge.failure.reason == Reason.QC_UNDER_FLOOR
    assert first.charge.output.video.uri
    assert first.charge.output.qc.score < FLOOR
    assert first.charge.billed.amount_micros == ODD_MODEL_COST
    assert second.charge.billed.amount_micros == 2 * RUNWAY_PER_SECOND
    assert done.result.video.uri and done.result.video.uri != first.charge.output.video.uri

    assert_each_attempt_as_billed(done, sandbox)
    assert done.cost.amount_micros == ODD_MODEL_COST + 2 * RUNWAY_PER_SECOND
    bills = sandbox.bills()
    assert bills.total_micros == done.cost.amount_micros
    assert spent(mesh) - before == bills.total_micros


# 2. Cancels of tasks their providers bill -----------------------------------------------------------


def test_a_cancelled_running_runway_job_commits_what_runway_bills_for_it(mesh, sandbox):
    sandbox.reset(provider="runway", render_seconds=120)
    before = spent(mesh)
    job = create(mesh, "A long Runway render to cancel", RUNWAY, seconds=4)
    submitted(mesh, job.job_id)
    running(mesh, job.job_id)
    task_id = get(mesh, job.job_id).handle.task_id
    cancelled = gateway(mesh).CancelRenderJob(gateway_pb2.CancelRenderJobRequest(job_id=job.job_id)).job
    assert cancelled.state == CANCELLED

    done = settled(mesh, job.job_id)
    billed_settles(sandbox, 1)
    (attempt,) = done.attempts
    assert attempt.charge.outcome == COMMIT, attempt
    assert attempt.charge.task_id == task_id
    # Runway bills a task cancelled while running at its full estimate.
    assert attempt.charge.billed.amount_micros == 4 * RUNWAY_PER_SECOND
    bills = sandbox.bills()
    assert bills.tasks[task_id]["state"].lower() == "cancelled", bills  # billed at its full estimate
    assert_each_attempt_as_billed(done, sandbox)
    assert bills.total_micros == done.cost.amount_micros == 4 * RUNWAY_PER_SECOND
    assert spent(mesh) - before == bills.total_micros


def test_a_cancelled_veo_job_commits_the_full_price_as_vertex_cannot_cancel(mesh, sandbox):
    # Vertex has no cancel: the operation runs to its end and is billed then.
    sandbox.reset(provider="veo", render_seconds=3)
    before = spent(mesh)
    job = create(mesh, "A Veo render to cancel", VEO, seconds=4)
    submitted(mesh, job.job_id)
    task_id = get(mesh, job.job_id).handle.task_id
    cancelled = gateway(mesh).CancelRenderJob(gateway_pb2.CancelRenderJobRequest(job_id=job.job_id)).job
    assert cancelled.state == CANCELLED

    done = settled(mesh, job.job_id)
    (attempt,) = done.attempts
    assert attempt.charge.outcome == COMMIT, attempt
    assert attempt.charge.billed.amount_micros == 4 * VEO_PER_SECOND
    billed_settles(sandbox, 1)
    bills = sandbox.bills()
    assert attempt.charge.task_id == task_id and task_id.rsplit("/", 1)[-1] in bills.tasks, bills
    assert_each_attempt_as_billed(done, sandbox)
    assert bills.total_micros == done.cost.amount_micros == 4 * VEO_PER_SECOND
    assert spent(mesh) - before == bills.total_micros


# 3. A failure that bills nothing --------------------------------------------------------------------


def test_a_job_refused_for_safety_commits_nothing_and_releases_its_reservation(mesh, sandbox):
    before = budget(mesh)
    job = create(mesh, "A refused prompt [sandbox:safety]", RUNWAY, seconds=4)
    done = wait_terminal(gateway(mesh), job.job_id)
    assert done.state == FAILED
    assert done.error.reason in SAFETY_REASONS, done.error
    done = settled(mesh, job.job_id)

    assert done.attempts
    for attempt in done.attempts:
        assert attempt.reserved.amount_micros > 0  # reserved before the provider was called
        assert attempt.charge.outcome == RELEASE, attempt
        assert attempt.charge.billed.amount_micros == 0
    assert done.cost.amount_micros == 0
    after = budget(mesh)
    assert after.reserved.amount_micros == 0
    assert after.spent.amount_micros == before.spent.amount_micros
    billed_settles(sandbox, len(done.attempts))
    assert sandbox.bills().total_micros == 0


# 4. The ledger away while jobs finish ----------------------------------------------------------------


def test_settlements_missed_while_the_metrics_service_is_down_are_retried_after_it_restarts(mesh, sandbox):
    sandbox.reset(provider="runway", render_seconds=3)
    before = spent(mesh)
    jobs = [create(mesh, f"Ends while the ledger is away {n}", RUNWAY, seconds=2) for n in range(3)]
    for job in jobs:
        submitted(mesh, job.job_id)

    mesh.kill("metrics")
    try:
        done = [wait_terminal(gateway(mesh), job.job_id) for job in jobs]
        assert [job.state for job in done] == [SUCCEEDED] * 3, [job.error for job in done]
        # Each attempt's charge is on its job, but the ledger has none of them yet.
        for job in done:
            assert all(a.HasField("charge") and not a.settled for a in job.attempts), job.attempts
    finally:
        mesh.start_service("metrics")

    done = [settled(mesh, job.job_id) for job in jobs]
    billed_settles(sandbox, 3)
    for job in done:
        (attempt,) = job.attempts
        assert attempt.charge.outcome == COMMIT
        assert_each_attempt_as_billed(job, sandbox)
    bills = sandbox.bills()
    assert bills.total_micros == sum(job.cost.amount_micros for job in done) == 3 * 2 * RUNWAY_PER_SECOND
    assert spent(mesh) - before == bills.total_micros
    assert budget(mesh).reserved.amount_micros == 0


# 5. The gateway killed mid-render ------------------------------------------------------------------


def test_a_gateway_killed_mid_render_resumes_its_job_with_one_create_at_the_provider(mesh, sandbox):
    sandbox.reset(provider="runway", render_seconds=4)
    before = spent(mesh)
    job = create(mesh, "Survives a gateway crash", RUNWAY, seconds=2)
    submitted(mesh, job.job_id)
    task_id = get(mesh, job.job_id).handle.task_id

    mesh.kill("gateway")
    mesh.start_service("gateway")

    done = wait_terminal(gateway(mesh), job.job_id)
    assert done.state == SUCCEEDED, done.error
    assert done.handle.task_id == task_id
    done = settled(mesh, job.job_id)
    (attempt,) = done.attempts
    assert attempt.charge.outcome == COMMIT and attempt.charge.task_id == task_id
    # One create at the provider, under the attempt's key, restart or not.
    assert sandbox.creates("runway") == {attempt.reservation_key: 1}
    assert_each_attempt_as_billed(done, sandbox)
    bills = sandbox.bills()
    assert bills.total_micros == done.cost.amount_micros == 2 * RUNWAY_PER_SECOND
    assert spent(mesh) - before == bills.total_micros


def test_a_settlement_missed_while_the_ledger_is_away_survives_a_gateway_restart(mesh, sandbox):
    before = spent(mesh)
    job = create(mesh, "Settled by the next gateway", RUNWAY, seconds=2)
    submitted(mesh, job.job_id)
    mesh.kill("metrics")
    try:
        done = wait_terminal(gateway(mesh), job.job_id)
        assert done.state == SUCCEEDED, done.error
        assert not is_settled(done)
        # The gateway that recorded the charge dies before the ledger is back.
        mesh.kill("gateway")
    finally:
        mesh.start_service("metrics")
    mesh.start_service("gateway")

    done = settled(mesh, job.job_id)
    billed_settles(sandbox, 1)
    assert_each_attempt_as_billed(done, sandbox)
    assert spent(mesh) - before == sandbox.bills().total_micros == 2 * RUNWAY_PER_SECOND
