"""Gateway replicas on one PostgreSQL job store, with the provider sandbox so that every render can be
counted: each job is driven by exactly one replica; a replica killed mid-render has its job taken over
by another within about the lease, rendered once; a cancel sent to the replica that does not drive the
job ends it and its render; a wrong lease setting stops the gateway, naming it."""

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import psycopg
import pytest
from helpers.mesh import eventually, wait_terminal, watch_until
from helpers.postgres import assert_runs_on_its_store, fresh_schema
from helpers.sandbox import Sandbox, sandbox_mesh

from aiprod.common.v1 import backend_pb2, event_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.apikeys import with_api_key
from aiprod_kit.mesh import Mesh, ServiceStartError

LEASE_SECONDS = 2.0
HOSTS = ("127.0.0.1", "127.0.0.2")
REPLICAS = ("gateway", "gateway@127.0.0.2")
ENVIRONMENT = {
    "AIPROD_GATEWAY_JOB_LEASE_SECONDS": str(LEASE_SECONDS),
    # Two jobs at once per replica: with more jobs than that, some wait queued.
    "AIPROD_DISPATCH_MAX_IN_FLIGHT": "2",
}


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    with fresh_schema() as url:
        yield url


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[Mesh]:
    environment = {**ENVIRONMENT, "AIPROD_DATABASE_URL": database_url}
    with sandbox_mesh(tmp_path_factory.mktemp("replicas"), environment) as running:
        running.start_replica("gateway", HOSTS[1])
        for replica in REPLICAS:
            assert_runs_on_its_store(running, replica, environment)
        yield running


@pytest.fixture
def sandbox(mesh: Mesh) -> Sandbox:
    for host, replica in zip(HOSTS, REPLICAS, strict=True):
        if mesh.services[replica].process.poll() is not None:  # killed by an earlier test
            mesh.start_service("gateway", host=host)
    control = Sandbox(mesh.address("sandbox"))
    control.reset(render_seconds=1)
    return control


def stub(mesh: Mesh, replica: str) -> gateway_pb2_grpc.GatewayServiceStub:
    channel = with_api_key(grpc.insecure_channel(mesh.address(replica)), mesh.api_key)
    return gateway_pb2_grpc.GatewayServiceStub(channel)


def create(gateway: gateway_pb2_grpc.GatewayServiceStub, prompt: str) -> gateway_pb2.RenderJob:
    spec = render_pb2.RenderSpec(
        prompt=prompt,
        duration_seconds=4,
        constraints=render_pb2.RenderConstraints(preferred_backend=backend_pb2.BACKEND_RUNWAY),
    )
    return gateway.CreateRenderJob(gateway_pb2.CreateRenderJobRequest(spec=spec)).job


def is_submitted(event: gateway_pb2.JobEvent) -> bool:
    return event.render.HasField("submitted")


def claim_owner(database_url: str, job_id: str) -> str | None:
    """Who holds the job's claim in the store: a gateway process, "host-pid-random"."""
    with psycopg.connect(database_url) as connection:
        row = connection.execute("SELECT claim_owner FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
    return row[0] if row else None


def driving(mesh: Mesh, database_url: str, job_id: str) -> str:
    """The replica that drives the job now."""
    owner = claim_owner(database_url, job_id)
    assert owner is not None, f"nobody drives {job_id}"
    pid = int(owner.rsplit("-", 2)[1])
    return next(replica for replica in REPLICAS if mesh.services[replica].process.pid == pid)


def log_records(mesh: Mesh, replica: str, offset: int = 0) -> list[dict]:
    with mesh.services[replica].log_path.open("rb") as log:
        log.seek(offset)
        lines = log.read().splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def log_size(mesh: Mesh, replica: str) -> int:
    return mesh.services[replica].log_path.stat().st_size


def events(gateway: gateway_pb2_grpc.GatewayServiceStub, job_id: str) -> list[gateway_pb2.JobEvent]:
    return watch_until(gateway, job_id, lambda event: False)


def test_a_replica_killed_mid_render_has_its_job_taken_over_by_the_other_and_rendered_once(
    mesh, sandbox, database_url
):
    sandbox.reset(render_seconds=8)
    job = create(stub(mesh, "gateway"), "Outlives the replica that drove it")
    watch_until(stub(mesh, "gateway"), job.job_id, is_submitted)
    victim = driving(mesh, database_url, job.job_id)
    survivor = next(replica for replica in REPLICAS if replica != victim)
    gateway = stub(mesh, survivor)

    mesh.kill(victim)
    killed = time.monotonic()
    last = gateway.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job.job_id)).job.last_sequence
    # The survivor's first event for the job: it took the job over, without any restart.
    watch_until(gateway, job.job_id, lambda event: True, after_sequence=last)
    # Well before the default lease (30 s) would have let it: the test's lease and a loaded box's slack.
    assert time.monotonic() - killed < 5 * LEASE_SECONDS
    assert driving(mesh, database_url, job.job_id) == survivor

    done = wait_terminal(gateway, job.job_id)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
    # Re-attached to the render the dead replica started: one create at the provider.
    assert sandbox.creates("runway") == {f"{job.job_id}.shot0:1": 1}
    log = events(gateway, job.job_id)
    assert [event.sequence for event in log] == list(range(1, len(log) + 1))
    assert [event.render.submitted.task_id for event in log if is_submitted(event)] == [done.handle.task_id]
    assert claim_owner(database_url, job.job_id) is None  # ended: nobody's


def test_replicas_started_together_drive_each_job_exactly_once(mesh, sandbox, database_url):
    sandbox.reset(render_seconds=6)
    mesh.kill(REPLICAS[1])
    first = stub(mesh, REPLICAS[0])
    jobs = [create(first, f"Started together {n}") for n in range(5)]
    # Two render on the one replica (its concurrency), three wait in its queue, unclaimed; then it dies.
    for job in jobs[:2]:
        watch_until(first, job.job_id, is_submitted)
    mesh.kill(REPLICAS[0])
    offsets = {replica: log_size(mesh, replica) for replica in REPLICAS}

    with ThreadPoolExecutor(len(HOSTS)) as pool:
        list(pool.map(lambda host: mesh.start_service("gateway", host=host), HOSTS))

    gateway = stub(mesh, REPLICAS[1])
    for job in jobs:
        done = wait_terminal(gateway, job.job_id)
        assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
    creates = sandbox.creates("runway")
    taken_over = [
        job_id
        for replica in REPLICAS
        for record in log_records(mesh, replica, offsets[replica])
        if record.get("event") == "took over jobs nobody drove"
        for job_id in record["job_ids"]
    ]
    for job in jobs:
        # Each job taken over by one of the two, once.
        assert taken_over.count(job.job_id) == 1, taken_over
        assert {key: count for key, count in creates.items() if key.startswith(job.job_id)} == {
            f"{job.job_id}.shot0:1": 1
        }
        log = events(gateway, job.job_id)
        assert [event.sequence for event in log] == list(range(1, len(log) + 1))
        kinds = [event.render.WhichOneof("kind") for event in log if event.HasField("render")]
        assert kinds.count("routed") == kinds.count("submitted") == kinds.count("succeeded") == 1, kinds
        assert kinds.count("charged") == 1, kinds


def test_a_cancel_sent_to_the_replica_not_driving_the_job_ends_it_and_its_render(mesh, sandbox, database_url):
    sandbox.reset(render_seconds=60)
    job = create(stub(mesh, "gateway"), "Cancelled through the other replica")
    watch_until(stub(mesh, "gateway"), job.job_id, is_submitted)
    driver = driving(mesh, database_url, job.job_id)
    canceller = next(replica for replica in REPLICAS if replica != driver)
    offset = log_size(mesh, driver)

    cancelled = (
        stub(mesh, canceller)
        .CancelRenderJob(gateway_pb2.CancelRenderJobRequest(job_id=job.job_id, reason="not wanted"))
        .job
    )
    assert cancelled.state == job_pb2.JOB_STATE_CANCELLED
    assert cancelled.error.message == "not wanted"
    task_id = cancelled.handle.task_id
    # The render is cancelled at its backend, and at the provider.
    with grpc.insecure_channel(mesh.address("renderer-runway")) as channel:
        renderer = renderer_pb2_grpc.RendererServiceStub(channel)
        render = renderer.GetRender(renderer_pb2.GetRenderRequest(task_id=task_id)).render
    assert render.state == renderer_pb2.RENDER_STATE_CANCELLED
    assert sandbox.counters()["tasks"]["runway"][task_id]["cancels"] == 1
    # The replica that drove it finds the job ended and stops, recording nothing more.
    assert eventually(
        lambda: any(
            record.get("event") == "job cancelled elsewhere; stopped driving it"
            and record.get("job_id") == job.job_id
            for record in log_records(mesh, driver, offset)
        ),
        timeout=5 * LEASE_SECONDS,
    )
    gateway = stub(mesh, driver)
    log = events(gateway, job.job_id)
    assert log[-1].state == job_pb2.JOB_STATE_CANCELLED
    assert log[-1].message == "cancelled: not wanted"
    stored = gateway.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job.job_id)).job
    # After the cancel, one more line on the ended job: what Runway bills for the cancelled task.
    assert (stored.state, stored.last_sequence) == (job_pb2.JOB_STATE_CANCELLED, log[-1].sequence + 1)
    [attempt] = stored.attempts
    assert attempt.charge.outcome == event_pb2.CHARGE_OUTCOME_COMMIT
    assert sandbox.creates("runway") == {f"{job.job_id}.shot0:1": 1}
    assert claim_owner(database_url, job.job_id) is None


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_a_wrong_lease_stops_the_gateway_naming_it(tmp_path, value):
    gateway_only = Mesh(
        tmp_path, free_ports=True, only=("gateway",), environment={"AIPROD_GATEWAY_JOB_LEASE_SECONDS": value}
    )
    with pytest.raises(ServiceStartError) as stopped:
        gateway_only.start()
    assert "AIPROD_GATEWAY_JOB_LEASE_SECONDS" in str(stopped.value)
