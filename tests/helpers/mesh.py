"""Starting a mesh, reaching its services, following a job."""

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aiprod.common.v1 import job_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod.router.v1 import router_pb2_grpc
from aiprod_kit.apikeys import with_api_key
from aiprod_kit.mesh import DEVELOPMENT_TENANT, Mesh

TERMINAL = {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}


# Stubs on fresh channels for each call: tests restart services, and a new channel finds the new one.
def gateway(
    mesh: Mesh, replica: str = "gateway", key: str | None = None
) -> gateway_pb2_grpc.GatewayServiceStub:
    """A stub of the gateway (or of one replica) whose calls carry an API key: the development
    tenant's unless another is given."""
    channel = with_api_key(grpc.insecure_channel(mesh.address(replica)), key or mesh.api_key)
    return gateway_pb2_grpc.GatewayServiceStub(channel)


def router(mesh: Mesh) -> router_pb2_grpc.RouterServiceStub:
    return router_pb2_grpc.RouterServiceStub(grpc.insecure_channel(mesh.address("router")))


def metrics(mesh: Mesh) -> metrics_pb2_grpc.MetricsServiceStub:
    return metrics_pb2_grpc.MetricsServiceStub(grpc.insecure_channel(mesh.address("metrics")))


def budget(mesh: Mesh, tenant_id: str = DEVELOPMENT_TENANT) -> metrics_pb2.Budget:
    """Today's budget of a tenant: the development tenant's, whose key the stubs call with."""
    return metrics(mesh).GetBudget(metrics_pb2.GetBudgetRequest(tenant_id=tenant_id), timeout=10).budget


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The google.rpc.ErrorInfo of an error status, read as a caller would (asserts it is there, once)."""
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status"
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    assert len(infos) == 1, f"expected one ErrorInfo, got {infos}"
    assert infos[0].domain == "aiprod.dev", infos[0]
    return infos[0]


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    """The fields a google.rpc.BadRequest in the error status names, with why."""
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status"
    violations = {}
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations.update({v.field: v.description for v in bad_request.field_violations})
    return violations


def start_mesh(data_dir: Path, **environment: str) -> Mesh:
    running = Mesh(data_dir, free_ports=True, environment=environment)
    running.start()
    return running


def watch_until(
    gateway: gateway_pb2_grpc.GatewayServiceStub,
    job_id: str,
    stop_when: Callable[[gateway_pb2.JobEvent], bool],
    after_sequence: int = 0,
    timeout: float = 120,
) -> list[gateway_pb2.JobEvent]:
    """Reads the job's events until stop_when(event) holds or the job ends; returns them."""
    events = []
    request = gateway_pb2.WatchRenderJobRequest(job_id=job_id, after_sequence=after_sequence)
    for message in gateway.WatchRenderJob(request, timeout=timeout):
        if message.HasField("event"):
            events.append(message.event)
            if stop_when(message.event):
                break
    return events


def wait_terminal(gateway: gateway_pb2_grpc.GatewayServiceStub, job_id: str) -> gateway_pb2.RenderJob:
    watch_until(gateway, job_id, lambda event: event.state in TERMINAL)
    return gateway.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job_id)).job


def log_lines(mesh: Mesh, *needles: str, limit: int = 40) -> list[str]:
    """The services' log lines that mention any of needles (a job id, a key, a task id), for a failing
    run's report."""
    lines = []
    for path in sorted((mesh.data_dir / "logs").glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if any(needle in line for needle in needles if needle):
                lines.append(f"{path.stem}: {line[:400]}")
    return lines[-limit:]


def eventually(predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.05) -> bool:
    """Polls predicate until it holds: for state that travels in the background, with no push to wait on."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


@asynccontextmanager
async def connect_metrics(mesh: Mesh) -> AsyncIterator[metrics_pb2_grpc.MetricsServiceStub]:
    """An aio stub of the mesh's metrics service, its channel closed on the way out."""
    async with grpc.aio.insecure_channel(mesh.address("metrics")) as channel:
        yield metrics_pb2_grpc.MetricsServiceStub(channel)
