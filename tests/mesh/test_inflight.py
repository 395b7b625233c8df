"""500 jobs in flight at once, all succeed: a job waiting on its provider holds no gateway worker.

The whole mesh against the sandbox, with its providers holding every task queued (the sandbox's
`max_concurrent: 0`) until all 500 renders were created there: each job is then routed, reserved and
submitted, waiting on its provider, at the same time as the 499 others. The providers are then let go
and every job must succeed, with its one attempt committed. No timing is asserted (`make bench`
measures the figures); the test waits on the sandbox's counters and the jobs' states.
"""

import uuid
from collections.abc import Iterator

import pytest
from helpers.mesh import eventually, gateway
from helpers.sandbox import Sandbox, provider_settings, sandbox_mesh

from aiprod.common.v1 import event_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_kit.mesh import Mesh

JOBS = 500
PROVIDERS = ("runway", "veo", "replicate")
# Generous bounds, never reached on a machine that works: each a wait for an event, not a timing goal.
CREATED_SECONDS = 240.0
FINISHED_SECONDS = 300.0

ENVIRONMENT = {
    # No cap and no tier limit: the test is about jobs in flight, not money or the limiter.
    "AIPROD_METRICS_DAILY_CAP_USD": "0",
    "AIPROD_GATEWAY_TIERS": '{"GOLD": {"concurrent_jobs": 1000000, "requests_per_minute": 1000000}}',
    "AIPROD_SANDBOX_VIDEO_SHORT_SIDE": "180",
    **provider_settings(POLL_SECONDS="1", REQUESTS_PER_MINUTE="1000000", MAX_CONCURRENT_TASKS=str(JOBS)),
}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with sandbox_mesh(tmp_path_factory.mktemp("inflight"), ENVIRONMENT) as running:
        yield running


def tasks_created(sandbox: Sandbox) -> int:
    creates = sandbox.counters()["creates"]
    return sum(sum(creates.get(provider, {}).values()) for provider in PROVIDERS)


def jobs_in(mesh: Mesh, state: int) -> int:
    usage = gateway(mesh).GetUsage(gateway_pb2.GetUsageRequest(), timeout=30)
    return sum(count.count for count in usage.jobs if count.state == state)


def test_five_hundred_jobs_in_flight_at_once_all_succeed(mesh):
    sandbox = Sandbox(mesh.address("sandbox"))
    sandbox.reset(render_seconds=1)
    for provider in PROVIDERS:
        sandbox.configure(provider=provider, max_concurrent=0)
    stub = gateway(mesh)
    spec = render_pb2.RenderSpec(
        prompt="Five hundred paper boats on a pond",
        preset="quick_social",
        duration_seconds=4,
        aspect_ratio=render_pb2.ASPECT_RATIO_16_9,
    )
    calls = [
        stub.CreateRenderJob.future(
            gateway_pb2.CreateRenderJobRequest(request_id=f"inflight-{uuid.uuid4().hex}", spec=spec),
            timeout=120,
        )
        for _ in range(JOBS)
    ]
    job_ids = [call.result().job.job_id for call in calls]
    assert len(set(job_ids)) == JOBS

    # Every render created at its provider, none let run yet: all 500 are in flight together.
    assert eventually(lambda: tasks_created(sandbox) == JOBS, timeout=CREATED_SECONDS, interval=0.5), (
        f"{tasks_created(sandbox)} of {JOBS} renders created at the providers"
    )
    # A job is running once the gateway has recorded its route, which may come after its provider's create.
    assert eventually(lambda: jobs_in(mesh, job_pb2.JOB_STATE_RUNNING) == JOBS, timeout=60, interval=0.5), (
        f"{jobs_in(mesh, job_pb2.JOB_STATE_RUNNING)} of {JOBS} jobs running"
    )

    for provider in PROVIDERS:
        sandbox.configure(provider=provider, max_concurrent=None)
    assert eventually(
        lambda: jobs_in(mesh, job_pb2.JOB_STATE_SUCCEEDED) == JOBS, timeout=FINISHED_SECONDS, interval=0.5
    ), {state: jobs_in(mesh, state) for state in (job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_FAILED)}

    # Each job paid once: one attempt, committed, and one task created under its render's key.
    for job_id in job_ids:
        job = stub.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job_id), timeout=30).job
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job
        assert [attempt.charge.outcome for attempt in job.attempts] == [event_pb2.CHARGE_OUTCOME_COMMIT], job
    creates = sandbox.counters()["creates"]
    assert all(count == 1 for provider in PROVIDERS for count in creates.get(provider, {}).values())
