"""The router's view of a renderer's replicas (aiprod_router.backends.Renderer), against a real gRPC
server in the test's loop: the standard health servicer and a renderer whose GetCapabilities the test
controls. A replica counts as serving once it has said SERVING and answered GetCapabilities over the
connection it said it on; until then the backend is not offered to routing, however its calls' own
channel is doing."""

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from aiprod.common.v1 import backend_pb2
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_router.backends import RENDERER_SERVICE, Renderer

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class Replica(renderer_pb2_grpc.RendererServiceServicer):
    """A renderer replica's GetCapabilities: answers `capabilities`, or UNAVAILABLE while `refusing`."""

    def __init__(self) -> None:
        self.capabilities = renderer_pb2.Capabilities(backend=backend_pb2.BACKEND_RUNWAY, nominal_quality=0.8)
        self.refusing = False
        self.asked = 0
        self.asked_again = asyncio.Event()

    async def GetCapabilities(self, request, context):
        self.asked += 1
        if self.asked >= 2:
            self.asked_again.set()
        if self.refusing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not ready")
        return renderer_pb2.GetCapabilitiesResponse(capabilities=self.capabilities)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Polls the router's view until it holds (it changes in the background, with no push to wait on;
    tests/helpers/mesh.py's `eventually`, in the loop)."""
    for _ in range(round(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {timeout} s")


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Replica, health.aio.HealthServicer]]:
    server = grpc.aio.server()
    replica, health_servicer = Replica(), health.aio.HealthServicer()
    renderer_pb2_grpc.add_RendererServiceServicer_to_server(replica, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", replica, health_servicer
    await server.stop(None)


async def watching(address: str, calls_target: str) -> tuple[Renderer, asyncio.Task[None]]:
    """The router's Renderer for the replica at address, its calls' channel dialled to calls_target."""
    channel = grpc.aio.insecure_channel(calls_target)
    renderer = Renderer(
        backend_pb2.BACKEND_RUNWAY, address, channel, renderer_pb2_grpc.RendererServiceStub(channel)
    )
    return renderer, asyncio.create_task(renderer.watch_replicas())


async def stop(renderer: Renderer, task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await renderer.channel.close()


async def test_a_replica_that_does_not_answer_getcapabilities_is_not_serving_until_it_does(server):
    address, replica, health_servicer = server
    await health_servicer.set(RENDERER_SERVICE, SERVING)
    replica.refusing = True
    renderer, task = await watching(address, address)
    try:
        await asyncio.wait_for(replica.asked_again.wait(), 10)
        # Asked twice: the first refusal was heard and the replica asked again on a new watch.
        assert not renderer.serving
        assert renderer.capabilities is None
        replica.refusing = False
        await until(lambda: renderer.serving)
        assert renderer.capabilities == replica.capabilities
    finally:
        await stop(renderer, task)


async def test_a_replica_serving_again_is_asked_its_capabilities_again(server):
    address, replica, health_servicer = server
    await health_servicer.set(RENDERER_SERVICE, SERVING)
    renderer, task = await watching(address, address)
    try:
        await until(lambda: renderer.serving)
        await health_servicer.set(RENDERER_SERVICE, NOT_SERVING)
        await until(lambda: not renderer.serving)
        # It comes back at another price, say after a configuration change: routing must see it.
        replica.capabilities = renderer_pb2.Capabilities(
            backend=backend_pb2.BACKEND_RUNWAY, nominal_quality=0.9
        )
        await health_servicer.set(RENDERER_SERVICE, SERVING)
        await until(lambda: renderer.serving)
        assert renderer.capabilities.nominal_quality == pytest.approx(0.9)
    finally:
        await stop(renderer, task)


async def test_serving_does_not_wait_for_the_calls_channel(server, unused_tcp_port):
    """The calls' channel may still be backing off after the replica restarted (here: it never
    reaches anything): the replica's own health and capabilities decide, and a NOT_SERVING after it
    is heard at once rather than behind that channel's retries."""
    address, replica, health_servicer = server
    await health_servicer.set(RENDERER_SERVICE, SERVING)
    renderer, task = await watching(address, f"127.0.0.1:{unused_tcp_port}")
    try:
        await until(lambda: renderer.serving)
        assert renderer.capabilities == replica.capabilities
        await health_servicer.set(RENDERER_SERVICE, NOT_SERVING)
        await until(lambda: not renderer.serving)
    finally:
        await stop(renderer, task)
