"""The mesh on PostgreSQL (AIPROD_DATABASE_URL): jobs that outlive a killed gateway, gateway replicas
sharing one database, and a database setting that is wrong, which stops a service naming the variable
but never showing its password."""

import os
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from helpers.mesh import TERMINAL, start_mesh, wait_terminal, watch_until
from helpers.postgres import SERVER_URL, assert_runs_on_its_store
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from aiprod.common.v1 import job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.apikeys import with_api_key
from aiprod_kit.mesh import Mesh

PASSWORD = "pg-s3cret-never-logged"


@pytest.fixture
def postgres_mesh(tmp_path, postgres_url) -> Iterator[Mesh]:
    """The whole mesh, its gateway and metrics on one PostgreSQL schema; the renderer paced (24 frames a
    second of wall time) so that a job can be caught rendering; a short job lease, so that a killed
    gateway's jobs are taken over soon (once their claims run out: the database is shared)."""
    mesh = start_mesh(
        tmp_path,
        AIPROD_DATABASE_URL=postgres_url,
        AIPROD_LOCAL_RENDER_PACE_FPS="24",
        AIPROD_GATEWAY_JOB_LEASE_SECONDS="3",
    )
    try:
        for service in ("gateway", "metrics"):
            assert_runs_on_its_store(mesh, service, {"AIPROD_DATABASE_URL": postgres_url})
        yield mesh
    finally:
        mesh.stop()


def stub(address: str, key: str) -> gateway_pb2_grpc.GatewayServiceStub:
    return gateway_pb2_grpc.GatewayServiceStub(with_api_key(grpc.insecure_channel(address), key))


def create(gateway, prompt: str, seconds: float, request_id: str = "") -> gateway_pb2.RenderJob:
    spec = render_pb2.RenderSpec(prompt=prompt, duration_seconds=seconds)
    return gateway.CreateRenderJob(gateway_pb2.CreateRenderJobRequest(request_id=request_id, spec=spec)).job


def get(gateway, job_id: str) -> gateway_pb2.RenderJob:
    return gateway.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job_id)).job


def all_events(gateway, job_id: str) -> list[bytes]:
    return [event.SerializeToString() for event in watch_until(gateway, job_id, lambda event: False)]


def test_jobs_outlive_a_killed_gateway(postgres_mesh):
    gateway = stub(postgres_mesh.address("gateway"), postgres_mesh.api_key)
    finished = create(gateway, "done before the crash", 1)
    assert wait_terminal(gateway, finished.job_id).state == job_pb2.JOB_STATE_SUCCEEDED
    finished_events = all_events(gateway, finished.job_id)
    rendering = create(gateway, "rendering at the crash", 4)
    watch_until(gateway, rendering.job_id, lambda event: event.render.WhichOneof("kind") == "progress")
    handle = get(gateway, rendering.job_id).handle
    assert handle.task_id

    postgres_mesh.kill("gateway")
    postgres_mesh.start_service("gateway")
    gateway = stub(postgres_mesh.address("gateway"), postgres_mesh.api_key)

    # Nothing on disk held them: the gateway's SQLite file was never made.
    assert not (postgres_mesh.data_dir / "gateway" / "jobs.sqlite3").exists()
    assert get(gateway, finished.job_id).state == job_pb2.JOB_STATE_SUCCEEDED
    assert all_events(gateway, finished.job_id) == finished_events
    # The job caught rendering finishes, re-attached to its render rather than rendered again.
    done = wait_terminal(gateway, rendering.job_id)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
    events = watch_until(gateway, rendering.job_id, lambda event: False)
    assert [event.sequence for event in events] == list(range(1, len(events) + 1))
    assert {event.render.submitted.task_id for event in events if event.render.HasField("submitted")} == {
        handle.task_id
    }
    with grpc.insecure_channel(postgres_mesh.address("renderer-local")) as channel:
        renderer = renderer_pb2_grpc.RendererServiceStub(channel)
        render = renderer.GetRender(renderer_pb2.GetRenderRequest(task_id=handle.task_id)).render
    assert render.state == renderer_pb2.RENDER_STATE_SUCCEEDED


def test_gateway_replicas_on_one_database_serve_the_same_jobs(postgres_mesh):
    # Both replicas drive jobs; whichever claims this one drives it, and the other follows it in the store.
    replica = postgres_mesh.start_replica("gateway", "127.0.0.2")
    one, other = (
        stub(postgres_mesh.address("gateway"), postgres_mesh.api_key),
        stub(replica.address, postgres_mesh.api_key),
    )

    job = create(one, "made on one replica", 2, request_id="shared-request")
    assert get(other, job.job_id).job_id == job.job_id
    # Followed live on the other replica: every event the first one appends, to the end.
    watched = watch_until(other, job.job_id, lambda event: event.state in TERMINAL)
    assert watched[-1].state == job_pb2.JOB_STATE_SUCCEEDED
    assert [event.sequence for event in watched] == list(range(1, len(watched) + 1))
    assert [event.SerializeToString() for event in watched] == all_events(one, job.job_id)
    # One request_id is one job, whichever replica is asked.
    again = create(other, "made on one replica", 2, request_id="shared-request")
    assert again.job_id == job.job_id
    listed = other.ListRenderJobs(gateway_pb2.ListRenderJobsRequest(page_size=100)).jobs
    assert [listed_job.job_id for listed_job in listed] == [job.job_id]


def start_alone(service: str, data_dir, url: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "AIPROD_DATA_DIR": str(data_dir),
        "AIPROD_DATABASE_URL": url,
        "AIPROD_DATABASE_CONNECT_TIMEOUT_SECONDS": "1",
        f"AIPROD_{service.upper()}_PORT": "0",
    }
    return subprocess.run(
        [sys.executable, "-m", f"aiprod_{service}"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def with_password(**changes: str) -> str:
    parameters = {**conninfo_to_dict(SERVER_URL), "password": PASSWORD, **changes}
    return make_conninfo("", **parameters)


@pytest.mark.parametrize("service", ["gateway", "metrics"])
@pytest.mark.parametrize(
    ("url", "where"),
    [
        # A server that never comes up: waited for AIPROD_DATABASE_CONNECT_TIMEOUT_SECONDS, then given up.
        (with_password(host="127.0.0.1", port="1"), "127.0.0.1:1/"),
        # A server that answers no: given up at once.
        (with_password(dbname="no_such_database"), "/no_such_database"),
        (f"postgresql://aiprod:{PASSWORD}@db.example:notaport/jobs?sslmode=nonsense", "db.example"),
        (f"postgres://aiprod:{PASSWORD}@[::1/jobs?bogus", ""),
    ],
)
def test_a_wrong_database_setting_stops_the_service_naming_it_never_its_password(
    tmp_path, service, url, where
):
    finished = start_alone(service, tmp_path, url)
    assert finished.returncode == 2, finished.stderr
    assert "AIPROD_DATABASE_URL" in finished.stderr
    assert where in finished.stderr
    assert PASSWORD not in finished.stderr + finished.stdout
