"""SLA tier limits against real services: two gateway replicas on one PostgreSQL store, a BRONZE tenant
(2 jobs queued or running at once, 10 calls a minute) calling both at once. Each limit holds in total
across the replicas: exactly that many are let through, the rest get RESOURCE_EXHAUSTED with a
google.rpc.RetryInfo and an ErrorInfo naming the limit and the tier. A job's deadline and quality floor
come from its tenant's tier, on its spec; a video longer than the tier allows is refused naming it."""

import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import pytest
from helpers.mesh import start_mesh
from helpers.postgres import assert_runs_on_its_store, fresh_schema

from aiprod.common.v1 import job_pb2, render_pb2
from aiprod.gateway.v1 import admin_pb2, gateway_pb2, gateway_pb2_grpc
from aiprod_kit.apikeys import with_api_key
from aiprod_kit.errors import error_info, retry_delay
from aiprod_kit.mesh import Mesh

REPLICA_HOST = "127.0.0.2"
REPLICAS = ("gateway", f"gateway@{REPLICA_HOST}")
# BRONZE as the first version had it (2 jobs at once, 10 calls a minute), with a latency and a quality
# minimum of its own, so that the job's deadline and floor show they are the tier's, not a preset's.
BRONZE = {"concurrent_jobs": 2, "requests_per_minute": 10, "latency_seconds": 240, "quality_minimum": 0.75}
# The other tiers as the test session has them (conftest: the development tenant's GOLD, unlimited).
TIERS = {**json.loads(os.environ.get("AIPROD_GATEWAY_TIERS") or "{}"), "BRONZE": BRONZE}

_T = TypeVar("_T")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """The mesh on one PostgreSQL schema, a second gateway replica beside the first; renders paced to a
    frame a second, so that a job stays running for the length of a test."""
    with fresh_schema() as database_url:
        environment = {
            "AIPROD_DATABASE_URL": database_url,
            "AIPROD_GATEWAY_TIERS": json.dumps(TIERS),
            "AIPROD_LOCAL_RENDER_PACE_FPS": "1",
        }
        running = start_mesh(tmp_path_factory.mktemp("tiers"), **environment)
        try:
            running.start_replica("gateway", REPLICA_HOST)
            for replica in REPLICAS:
                assert_runs_on_its_store(running, replica, environment)
            yield running
        finally:
            running.stop()


def stubs(mesh: Mesh, tenant_id: str) -> list[gateway_pb2_grpc.GatewayServiceStub]:
    """A new BRONZE tenant's stubs of each replica."""
    key = mesh.create_api_key(tenant_id, admin_pb2.SLA_TIER_BRONZE)
    return [
        gateway_pb2_grpc.GatewayServiceStub(with_api_key(grpc.insecure_channel(mesh.address(r)), key))
        for r in REPLICAS
    ]


def at_once(calls: list[Callable[[], _T]]) -> list[_T | grpc.RpcError]:
    """Makes the calls all at once; each one's answer or error, in order."""

    def outcome(call: Callable[[], _T]) -> _T | grpc.RpcError:
        try:
            return call()
        except grpc.RpcError as error:
            return error

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(outcome, calls))


def assert_refused(error: object, reason: str, limit: str, max_delay: float) -> None:
    assert isinstance(error, grpc.RpcError), error
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error  # type: ignore[attr-defined]
    info = error_info(error)
    assert info is not None and info.reason == reason, info
    assert dict(info.metadata) == {"limit": limit, "tier": "BRONZE"}
    delay = retry_delay(error)
    assert delay is not None and 0 < delay <= max_delay, delay


def test_a_tenants_calls_a_minute_hold_in_total_across_replicas(mesh):
    gateways = stubs(mesh, "bronze-calls")
    calls = [
        lambda gateway=gateways[n % 2]: gateway.ListPresets(gateway_pb2.ListPresetsRequest(), timeout=10)
        for n in range(16)
    ]
    outcomes = at_once(calls)
    admitted = [outcome for outcome in outcomes if not isinstance(outcome, grpc.RpcError)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, grpc.RpcError)]
    assert (len(admitted), len(refused)) == (10, 6), outcomes
    for error in refused:
        # Until the tenant's window ends: within the minute.
        assert_refused(error, "RATE_LIMITED", "10", 60)
    # Another tenant of the same tier has its own count.
    other = stubs(mesh, "bronze-other")[1]
    assert other.ListPresets(gateway_pb2.ListPresetsRequest(), timeout=10).presets


def spec(prompt: str, preset: str = "quick_social", seconds: float = 4) -> render_pb2.RenderSpec:
    return render_pb2.RenderSpec(prompt=prompt, preset=preset, duration_seconds=seconds)


def test_a_tenants_jobs_at_once_hold_in_total_across_replicas_and_the_tier_shapes_each_job(mesh):
    # Ten calls a minute for the whole test: each counts.
    gateways = stubs(mesh, "bronze-jobs")
    creates = [
        lambda n=n: gateways[n % 2].CreateRenderJob(
            gateway_pb2.CreateRenderJobRequest(spec=spec(f"lighthouse {n}")), timeout=30
        )
        for n in range(4)
    ]
    outcomes = at_once(creates)  # 4 calls
    accepted = [outcome.job for outcome in outcomes if not isinstance(outcome, grpc.RpcError)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, grpc.RpcError)]
    assert (len(accepted), len(refused)) == (2, 2), outcomes
    for error in refused:
        assert_refused(error, "CONCURRENCY_LIMIT", "2", 30)

    for job in accepted:
        assert job.state in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING)
        assert job.tier == admin_pb2.SLA_TIER_BRONZE
        assert job.priority == gateway_pb2.PRIORITY_LOW  # quick_social's
        # The tier's latency from the job's creation is its deadline; its quality minimum, over the
        # preset's floor (0.6), is the floor.
        deadline = job.create_time.ToNanoseconds() + 240 * 10**9
        assert job.spec.constraints.deadline.ToNanoseconds() == deadline
        assert job.spec.constraints.quality_floor == 0.75

    # A job in review does not count: it is created at the limit; its approval would pass it.
    review = (
        gateways[0]
        .CreateRenderJob(  # 5
            gateway_pb2.CreateRenderJobRequest(spec=spec("in review"), review=True), timeout=30
        )
        .job
    )
    assert review.state == job_pb2.JOB_STATE_AWAITING_APPROVAL
    approve = gateway_pb2.ApproveRenderJobRequest(job_id=review.job_id, plan_version=review.plan_version)
    with pytest.raises(grpc.RpcError) as raised:
        gateways[1].ApproveRenderJob(approve, timeout=30)  # 6
    assert_refused(raised.value, "CONCURRENCY_LIMIT", "2", 30)
    # One ends: its place is free, on either replica.
    gateways[1].CancelRenderJob(  # 7
        gateway_pb2.CancelRenderJobRequest(job_id=accepted[0].job_id), timeout=30
    )
    approved = gateways[0].ApproveRenderJob(approve, timeout=30).job  # 8
    assert approved.state == job_pb2.JOB_STATE_QUEUED

    # Longer than BRONZE allows (30 s), though the preset allows it.
    with pytest.raises(grpc.RpcError) as raised:
        gateways[1].CreateRenderJob(  # 9
            gateway_pb2.CreateRenderJobRequest(spec=spec("too long", "brand_campaign", 60)), timeout=30
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tier BRONZE" in (raised.value.details() or "")
