"""The service bootstrap every service shares: health, reflection, and a clean stop on SIGTERM."""

import signal
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.mesh import start_mesh

from aiprod_kit.mesh import Mesh, ServiceStartError

SERVING = health_pb2.HealthCheckResponse.SERVING


def test_every_service_reports_serving_under_its_full_name_and_the_empty_name(mesh):
    for service in mesh.services.values():
        spec = service.spec
        with grpc.insecure_channel(service.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in (spec.health_name, ""):
                assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == SERVING
            unknown = health_pb2.HealthCheckRequest(service="no.such.Service")
            try:
                health.Check(unknown)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
            else:
                raise AssertionError("an unknown service name must be NOT_FOUND")


def test_sigterm_turns_health_not_serving_then_the_process_exits_cleanly(tmp_path):
    mesh = start_mesh(tmp_path)
    try:
        gateway = mesh.services["gateway"]
        with grpc.insecure_channel(gateway.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=gateway.spec.health_name), timeout=30
            )
            assert next(watch).status == SERVING
            gateway.process.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert gateway.process.wait(timeout=30) == 0
        log = gateway.log_text()
        assert '"event": "draining"' in log
        assert '"event": "stopped"' in log
    finally:
        mesh.stop()
    assert all(service.process.poll() is not None for service in mesh.services.values())
    assert not subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, check=False).stdout


@pytest.mark.parametrize("name", ["metrics", "sandbox"])
def test_a_service_started_on_a_port_in_use_refuses_to_start_and_says_why(mesh, tmp_path, name):
    taken = mesh.services["metrics"]
    second = Mesh(tmp_path, free_ports=True)
    try:
        with pytest.raises(ServiceStartError) as refused:
            second.start_service(name, port=taken.port)
    finally:
        second.stop()
    assert '"event": "configuration error"' in str(refused.value)
    assert f"cannot listen on 127.0.0.1:{taken.port}:" in str(refused.value)
    assert not second.services
    # The one already there keeps every call: none went to the second one.
    with grpc.insecure_channel(taken.address) as channel:
        check = health_pb2.HealthCheckRequest(service=taken.spec.health_name)
        assert health_pb2_grpc.HealthStub(channel).Check(check).status == SERVING
