"""Several replicas of one renderer: the router watches each one's health, and a replica that turns
NOT_SERVING (draining) gets no new render while the others keep the backend serving."""

import signal

import grpc
from helpers.mesh import eventually, start_mesh, wait_terminal

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_kit.apikeys import with_api_key


def test_a_draining_replica_gets_no_work_while_the_other_serves(tmp_path):
    # A long grace: the drained replica stays up, NOT_SERVING, for the whole test.
    mesh = start_mesh(tmp_path, AIPROD_SHUTDOWN_GRACE_SECONDS="120")
    try:
        first = mesh.services["renderer-local"]
        second = mesh.start_replica("renderer-local", "127.0.0.2")
        mesh.stop_service("router")
        mesh.stop_service("gateway")
        mesh.start_service("router")  # now configured with both replicas
        mesh.start_service("gateway")
        router = router_pb2_grpc.RouterServiceStub(grpc.insecure_channel(mesh.address("router")))

        def replicas() -> dict[str, int]:
            local = next(b for b in router.ListBackends(router_pb2.ListBackendsRequest()).backends)
            return {replica.address: replica.health for replica in local.replicas}

        serving, not_serving = router_pb2.BACKEND_HEALTH_SERVING, router_pb2.BACKEND_HEALTH_NOT_SERVING
        assert eventually(lambda: replicas() == {first.address: serving, second.address: serving})

        second.process.send_signal(signal.SIGTERM)
        assert eventually(lambda: replicas() == {first.address: serving, second.address: not_serving})
        local = router.ListBackends(router_pb2.ListBackendsRequest()).backends[0]
        assert local.backend == backend_pb2.BACKEND_LOCAL
        assert local.health == serving

        gateway = gateway_pb2_grpc.GatewayServiceStub(
            with_api_key(grpc.insecure_channel(mesh.address("gateway")), mesh.api_key)
        )
        for n in range(4):
            spec = render_pb2.RenderSpec(prompt=f"Replica test {n}", duration_seconds=1)
            job = gateway.CreateRenderJob(gateway_pb2.CreateRenderJobRequest(spec=spec)).job
            assert wait_terminal(gateway, job.job_id).state == job_pb2.JOB_STATE_SUCCEEDED
        assert eventually(lambda: first.log_text().count('"event": "render started"') == 4)
        assert '"event": "render started"' not in second.log_text()
        mesh.kill("renderer-local@127.0.0.2")  # rather than wait out its drain
    finally:
        mesh.stop()
