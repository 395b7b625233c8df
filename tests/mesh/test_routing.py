"""The router with real processes and the sandbox: fallback when a renderer dies, health and breaker
driven routing, and a render that survives the gateway and the router both being killed."""

from collections.abc import Iterator

import pytest
from helpers.mesh import eventually, gateway, router, wait_terminal, watch_until
from helpers.sandbox import NOT_SERVING, SERVING, Sandbox, health_watch, sandbox_mesh, wait_for_status

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.router.v1 import router_pb2
from aiprod_kit.failures import Reason
from aiprod_kit.mesh import Mesh

ENVIRONMENT = {
    "AIPROD_RUNWAY_BREAKER_COOLDOWN_SECONDS": "1",
    # The breaker under test is the router's: Replicate's own renderer keeps serving through failures.
    "AIPROD_REPLICATE_BREAKER_FAILURES": "100",
    # Long enough to route a job while it is open, short enough to wait out.
    "AIPROD_ROUTER_BREAKER_COOLDOWN_SECONDS": "10",
    "AIPROD_LOCAL_RENDER_PACE_FPS": "24",
}
RUNWAY, VEO, REPLICATE, LOCAL = (
    backend_pb2.BACKEND_RUNWAY,
    backend_pb2.BACKEND_VEO,
    backend_pb2.BACKEND_REPLICATE,
    backend_pb2.BACKEND_LOCAL,
)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with sandbox_mesh(tmp_path_factory.mktemp("routing"), ENVIRONMENT) as running:
        yield running


@pytest.fixture
def sandbox(mesh: Mesh) -> Sandbox:
    control = Sandbox(mesh.address("sandbox"))
    control.reset(render_seconds=1)
    return control


def create(mesh: Mesh, prompt: str, seconds: float, preferred: int = 0) -> gateway_pb2.RenderJob:
    spec = render_pb2.RenderSpec(
        prompt=prompt,
        duration_seconds=seconds,
        constraints=render_pb2.RenderConstraints(preferred_backend=preferred),
    )
    return gateway(mesh).CreateRenderJob(gateway_pb2.CreateRenderJobRequest(spec=spec)).job


def render_events(mesh: Mesh, job_id: str) -> list:
    return [e.render for e in watch_until(gateway(mesh), job_id, lambda event: False) if e.HasField("render")]


def backend_status(mesh: Mesh, backend: int) -> router_pb2.BackendStatus:
    backends = router(mesh).ListBackends(router_pb2.ListBackendsRequest()).backends
    return next(status for status in backends if status.backend == backend)


def test_a_renderer_killed_mid_render_falls_back_and_the_events_say_why(mesh, sandbox):
    job = create(mesh, "A lantern procession at night", 4, preferred=LOCAL)
    watch_until(gateway(mesh), job.job_id, lambda event: event.render.WhichOneof("kind") == "progress")
    mesh.kill("renderer-local")
    try:
        done = wait_terminal(gateway(mesh), job.job_id)
        assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
        assert done.backend == RUNWAY  # the cheapest provider that renders 4 s and meets the floor
        fallbacks = [
            event.fallback for event in render_events(mesh, job.job_id) if event.HasField("fallback")
        ]
        assert len(fallbacks) == 1
        assert (fallbacks[0].from_backend, fallbacks[0].to_backend) == (LOCAL, RUNWAY)
        assert fallbacks[0].cause.reason == Reason.RENDER_LOST
    finally:
        mesh.start_service("renderer-local")


def test_a_not_serving_renderer_gets_no_work_until_it_recovers(mesh, sandbox):
    with health_watch(mesh, "runway") as statuses:
        wait_for_status(statuses, SERVING)
        # Rejected credentials: the create, then probes (one a second), until the faults are used up: long
        # enough for the next job to be routed while Runway is down, on a loaded box too.
        sandbox.fault("runway", "*", "401", times=6)
        refused = create(mesh, "Refused at Runway", 4, preferred=RUNWAY)
        wait_for_status(statuses, NOT_SERVING)
        assert eventually(
            lambda: backend_status(mesh, RUNWAY).health == router_pb2.BACKEND_HEALTH_NOT_SERVING
        )
        while_down = wait_terminal(
            gateway(mesh), create(mesh, "While Runway is down", 4, preferred=RUNWAY).job_id
        )
        assert while_down.state == job_pb2.JOB_STATE_SUCCEEDED
        assert while_down.backend == VEO
        wait_for_status(statuses, SERVING)
    assert eventually(lambda: backend_status(mesh, RUNWAY).health == router_pb2.BACKEND_HEALTH_SERVING)
    after = wait_terminal(gateway(mesh), create(mesh, "Runway is back", 4, preferred=RUNWAY).job_id)
    assert after.backend == RUNWAY
    assert wait_terminal(gateway(mesh), refused.job_id).state == job_pb2.JOB_STATE_SUCCEEDED


def test_a_render_every_qualifying_provider_refused_goes_round_again_and_is_paid_once(mesh, sandbox):
    # A 4 s quick_social render qualifies at Runway and Veo only (Replicate's default model renders 6 s,
    # the local renderer is under the preset's floor). Each refuses every try of its renderer's create
    # (its four tries) as unavailable; the third attempt goes back to Runway, which takes it.
    sandbox.fault("runway", "create", "5xx", status=503, times=4)
    sandbox.fault("veo", "create", "5xx", status=503, times=4)
    spec = render_pb2.RenderSpec(
        prompt="Refused everywhere once",
        preset="quick_social",
        duration_seconds=4,
        aspect_ratio=render_pb2.ASPECT_RATIO_16_9,
        constraints=render_pb2.RenderConstraints(preferred_backend=RUNWAY),
    )
    job = gateway(mesh).CreateRenderJob(gateway_pb2.CreateRenderJobRequest(spec=spec)).job
    done = wait_terminal(gateway(mesh), job.job_id)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
    assert [attempt.backend for attempt in done.attempts] == [RUNWAY, VEO, RUNWAY]
    refusals = [attempt.charge for attempt in done.attempts[:2]]
    assert [charge.failure.reason for charge in refusals] == [Reason.PROVIDER_UNAVAILABLE] * 2
    assert all(not charge.billed.amount_micros for charge in refusals)
    routed = [event.routed for event in render_events(mesh, job.job_id) if event.HasField("routed")]
    assert routed[2].reason.startswith("again, as every backend that qualifies refused the render"), routed
    # One task created and billed, under the third attempt's key, and the job costs what it billed.
    bills = sandbox.bills()
    assert list(bills.by_key) == [done.attempts[2].reservation_key]
    assert done.cost.amount_micros == bills.total_micros > 0


def test_the_routers_breaker_opens_on_a_failing_provider_and_closes_after_its_cooldown(mesh, sandbox):
    # Jobs that prefer Replicate, whose creates are refused as unavailable until the faults run out.
    sandbox.fault("replicate", "create", "5xx", status=503, times=12)
    failing = [create(mesh, "Replicate fails 0", 6, preferred=REPLICATE).job_id]
    for n in (1, 2):
        wait_terminal(gateway(mesh), failing[-1])
        failing.append(create(mesh, f"Replicate fails {n}", 6, preferred=REPLICATE).job_id)
    # The third one's failure opens the breaker: watched for at once, and the next job routed while it
    # is open, not after the third job's fallback render (which on a slow box outlasted the cooldown).
    assert eventually(lambda: backend_status(mesh, REPLICATE).breaker == router_pb2.BREAKER_STATE_OPEN)
    open_job_id = create(mesh, "While the breaker is open", 6, preferred=REPLICATE).job_id
    for job_id in failing:
        done = wait_terminal(gateway(mesh), job_id)
        assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
        assert done.backend != REPLICATE
    open_job = wait_terminal(gateway(mesh), open_job_id)
    assert open_job.backend != REPLICATE
    events = render_events(mesh, open_job.job_id)
    assert not any(event.HasField("fallback") for event in events)  # not even tried
    # After the cooldown the next render is a trial; the faults are used up, so it succeeds there.
    assert eventually(
        lambda: backend_status(mesh, REPLICATE).breaker != router_pb2.BREAKER_STATE_OPEN, timeout=15
    )
    trial = wait_terminal(gateway(mesh), create(mesh, "After the cooldown", 6, preferred=REPLICATE).job_id)
    assert trial.backend == REPLICATE
    assert backend_status(mesh, REPLICATE).breaker == router_pb2.BREAKER_STATE_CLOSED


def test_gateway_and_router_killed_mid_render_finish_the_job_with_one_create(mesh, sandbox):
    sandbox.reset(render_seconds=4)
    job = create(mesh, "Survives two crashes", 4, preferred=RUNWAY)
    watch_until(gateway(mesh), job.job_id, lambda event: event.render.HasField("submitted"))
    mesh.kill("gateway")
    mesh.kill("router")
    mesh.start_service("router")
    mesh.start_service("gateway")
    done = wait_terminal(gateway(mesh), job.job_id)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.backend == RUNWAY
    assert sandbox.creates("runway") == {f"{job.job_id}.shot0:1": 1}
    submitted = {e.submitted.task_id for e in render_events(mesh, job.job_id) if e.HasField("submitted")}
    assert submitted == {done.handle.task_id}


def test_plan_route_explains_every_candidate(mesh, sandbox):
    shot = render_pb2.Shot(
        prompt="Explain yourself", duration_seconds=5, aspect_ratio=render_pb2.ASPECT_RATIO_16_9
    )
    plan = router(mesh).PlanRoute(
        router_pb2.PlanRouteRequest(shot=shot, constraints=render_pb2.RenderConstraints(quality_floor=0.6))
    )
    by_backend = {candidate.backend: candidate for candidate in plan.candidates}
    assert set(by_backend) == {LOCAL, RUNWAY, VEO, REPLICATE}
    assert by_backend[RUNWAY].eligible and by_backend[RUNWAY].rank == 1
    assert not by_backend[VEO].eligible
    assert any("duration_seconds" in reason for reason in by_backend[VEO].reasons)
    assert any("under the floor" in reason for reason in by_backend[LOCAL].reasons)
    assert all(candidate.reasons for candidate in plan.candidates)
