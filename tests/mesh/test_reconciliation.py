"""Attempts whose end nobody saw, through the real mesh against the sandbox: their money is held, never
freed; one whose backend can tell later is reconciled to what its provider billed, one that nobody can
tell counts as spent at its worst case once its reservation expires. A renderer that hangs without
closing its connections (SIGSTOP) is found out by gRPC keepalive, not waited on for ever."""

import os
import signal
from collections.abc import Iterator

import pytest
from helpers.mesh import budget, eventually, gateway, wait_terminal, watch_until
from helpers.sandbox import Sandbox, sandbox_mesh

from aiprod.common.v1 import backend_pb2, event_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_kit.failures import Reason
from aiprod_kit.mesh import Mesh

RUNWAY = backend_pb2.BACKEND_RUNWAY
# Runway gen4.5: 0.12 USD a second; the jobs here render 2 s.
SECONDS = 2
RUNWAY_COST = 240_000
TTL_SECONDS = 8
ENVIRONMENT = {
    # A renderer gone this long mid-render leaves its attempt uncertain.
    "AIPROD_ROUTER_REATTACH_SECONDS": "1",
    "AIPROD_METRICS_RESERVATION_TTL_SECONDS": str(TTL_SECONDS),
    "AIPROD_METRICS_EXPIRY_SWEEP_SECONDS": "0.5",
    # A peer that stops answering is given up within about two seconds.
    "AIPROD_GRPC_KEEPALIVE_SECONDS": "1",
    "AIPROD_GRPC_KEEPALIVE_TIMEOUT_SECONDS": "1",
}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with sandbox_mesh(tmp_path_factory.mktemp("reconcile"), ENVIRONMENT) as running:
        yield running


@pytest.fixture
def sandbox(mesh: Mesh) -> Sandbox:
    control = Sandbox(mesh.address("sandbox"))
    control.reset(render_seconds=1)
    return control


def create(mesh: Mesh, prompt: str) -> gateway_pb2.RenderJob:
    spec = render_pb2.RenderSpec(
        prompt=prompt,
        duration_seconds=SECONDS,
        constraints=render_pb2.RenderConstraints(preferred_backend=RUNWAY),
    )
    return gateway(mesh).CreateRenderJob(gateway_pb2.CreateRenderJobRequest(spec=spec), timeout=30).job


def get(mesh: Mesh, job_id: str) -> gateway_pb2.RenderJob:
    return gateway(mesh).GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job_id), timeout=10).job


@pytest.mark.parametrize("vanishes", ["killed", "hung"])
def test_an_uncertain_render_is_reconciled_to_what_its_provider_billed(mesh, sandbox, vanishes):
    sandbox.reset(provider="runway", render_seconds=6)
    spent_before = budget(mesh).spent.amount_micros
    job = create(mesh, "A render whose renderer vanishes")
    watch_until(gateway(mesh), job.job_id, lambda event: event.render.HasField("progress"))
    renderer = mesh.services["renderer-runway"].process
    if vanishes == "killed":
        mesh.kill("renderer-runway")
    else:
        # Its connections stay open and silent: only keepalive tells the router it is gone.
        os.kill(renderer.pid, signal.SIGSTOP)
    done = wait_terminal(gateway(mesh), job.job_id)
    # Nobody saw its end: the job fails uncertain, and the attempt's money stays reserved.
    assert (done.state, done.error.reason) == (job_pb2.JOB_STATE_FAILED, Reason.RENDER_UNCERTAIN)
    [attempt] = done.attempts
    assert attempt.charge.outcome == event_pb2.CHARGE_OUTCOME_HOLD
    # Reserved, or, once the reservation expired, spent at its worst case as uncertain money.
    held = budget(mesh)
    assert held.reserved.amount_micros + held.uncertain.amount_micros >= RUNWAY_COST
    if vanishes == "killed":
        mesh.start_service("renderer-runway")
    else:
        os.kill(renderer.pid, signal.SIGCONT)
    # Back, the renderer follows the task to its end; the gateway asks, and records what it cost.
    assert eventually(lambda: len(sandbox.bills("runway").tasks) == 1, timeout=60)
    assert eventually(
        lambda: (
            get(mesh, job.job_id).attempts[0].charge.outcome == event_pb2.CHARGE_OUTCOME_COMMIT
            and get(mesh, job.job_id).attempts[0].settled
        ),
        timeout=90,
        interval=0.2,
    ), get(mesh, job.job_id)
    reconciled = get(mesh, job.job_id).attempts[0].charge
    billed = sandbox.bills("runway").total_micros
    assert reconciled.billed.amount_micros == billed == RUNWAY_COST
    assert reconciled.output.video.uri  # the paid video is kept, though the job had failed
    assert budget(mesh).spent.amount_micros - spent_before == billed
    assert eventually(lambda: budget(mesh).reserved.amount_micros == 0, timeout=30)


def test_a_create_nobody_can_account_for_counts_at_its_worst_case_once_expired(mesh, sandbox):
    before = budget(mesh)
    # The task is created, but its answer never reaches the renderer: whether it bills is unknown.
    sandbox.fault("runway", "create", "drop", times=1, phase="after")
    done = wait_terminal(gateway(mesh), create(mesh, "A create whose answer is lost").job_id)
    assert (done.state, done.error.reason) == (job_pb2.JOB_STATE_FAILED, Reason.PROVIDER_UNCERTAIN)
    [attempt] = done.attempts
    assert attempt.charge.outcome == event_pb2.CHARGE_OUTCOME_HOLD
    # Never freed: reserved, then, once expired, spent at its full amount and shown as uncertain.
    assert eventually(
        lambda: budget(mesh).uncertain.amount_micros - before.uncertain.amount_micros == RUNWAY_COST,
        timeout=TTL_SECONDS * 4,
        interval=0.2,
    ), budget(mesh)
    after = budget(mesh)
    assert after.spent.amount_micros - before.spent.amount_micros == RUNWAY_COST
    assert after.reserved.amount_micros == before.reserved.amount_micros
    # What the sandbox really billed for it: the worst case held was the bill.
    assert eventually(lambda: sandbox.bills("runway").total_micros == RUNWAY_COST, timeout=30)
    # And the create was never sent again under its key.
    assert sandbox.counters()["create_requests"]["runway"] == {attempt.reservation_key: 1}
