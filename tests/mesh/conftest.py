"""The mesh the tests share: the real services started as processes on free loopback ports, reached
through the stubs. Modules that need other settings start their own (tests/helpers/mesh.py)."""

from collections.abc import Iterator

import grpc
import pytest

from aiprod.gateway.v1 import gateway_pb2_grpc
from aiprod_kit.apikeys import with_api_key
from aiprod_kit.mesh import Mesh


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = Mesh(tmp_path_factory.mktemp("mesh"), free_ports=True)
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def gateway(mesh: Mesh) -> Iterator[gateway_pb2_grpc.GatewayServiceStub]:
    with grpc.insecure_channel(mesh.address("gateway")) as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(with_api_key(channel, mesh.api_key))
