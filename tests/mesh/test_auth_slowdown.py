"""Repeated authentication failures from one peer, at a real gateway: slowed down past a few a minute
(each refusal an await: the right key is served meanwhile), logged in a few lines rather than one a
call, and never with the key."""

import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.mesh import error_info, gateway, start_mesh

from aiprod.gateway.v1 import gateway_pb2
from aiprod_kit.mesh import Mesh

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = start_mesh(tmp_path_factory.mktemp("auth-failures"))
    try:
        yield running
    finally:
        running.stop()


def refused(call, code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    assert raised.value.code() == code, raised.value.details()
    return raised.value


def test_a_wrong_key_in_a_loop_is_slowed_down_and_logged_in_a_few_lines(mesh: Mesh) -> None:
    """30 calls with a wrong key from this process: each is UNAUTHENTICATED, past a peer's first few
    failures after a wait (an `await`: the right key is served meanwhile and right after), and the
    gateway's log says so in a few lines, not one a call."""
    log_path = mesh.services["gateway"].log_path
    logged_before = log_path.stat().st_size
    wrong = "aiprod_000000000000_" + secrets.token_urlsafe(24)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=30) as pool:
        attempts = [
            pool.submit(
                refused,
                lambda: gateway(mesh, key=wrong).ListRenderJobs(
                    gateway_pb2.ListRenderJobsRequest(), timeout=30
                ),
                grpc.StatusCode.UNAUTHENTICATED,
            )
            for _ in range(30)
        ]
        gateway(mesh).ListRenderJobs(gateway_pb2.ListRenderJobsRequest(), timeout=10)
        errors = [attempt.result() for attempt in attempts]
    # At least 15 of the 30 fall in one window of the peer's, past its free failures: one waits 2 s.
    assert time.monotonic() - started >= 1.5
    assert {error_info(error).reason for error in errors} == {"UNAUTHENTICATED"}

    gateway(mesh).ListRenderJobs(gateway_pb2.ListRenderJobsRequest(), timeout=10)
    with grpc.insecure_channel(mesh.address("gateway")) as channel:
        check = health_pb2.HealthCheckRequest(service=GATEWAY_SERVICE.full_name)
        status = health_pb2_grpc.HealthStub(channel).Check(check, timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING

    with log_path.open("rb") as log:
        log.seek(logged_before)
        new_lines = log.read().decode(errors="replace").splitlines()
    about_them = [line for line in new_lines if "authentication fail" in line]
    # At most: the summary of the window before, this window's first failure, and its summary.
    assert len(about_them) <= 3, about_them
    text = log_path.read_text(errors="replace")
    assert wrong not in text and wrong.split("_", 2)[2] not in text
