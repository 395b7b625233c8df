"""The renderers the router is configured with: their stubs, capabilities and live health.

Health comes from one grpc.health.v1 Watch stream per renderer (pushed changes, not polling);
capabilities are fetched again each time a renderer turns SERVING.
"""

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiprod.common.v1 import backend_pb2
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.breaker import CircuitBreaker
from aiprod_kit.channels import open_channel
from aiprod_router.stats import BackendStats

RENDERER_SERVICE = renderer_pb2.DESCRIPTOR.services_by_name["RendererService"].full_name
BACKENDS_BY_NAME = {
    "local": backend_pb2.BACKEND_LOCAL,
    "runway": backend_pb2.BACKEND_RUNWAY,
    "veo": backend_pb2.BACKEND_VEO,
    "replicate": backend_pb2.BACKEND_REPLICATE,
}
_CAPABILITIES_TIMEOUT = 5.0
_RECONNECT_BACKOFF = (0.1, 2.0)

log = structlog.get_logger()


def parse_renderers(value: str) -> dict[int, str]:
    """Parses "local=host:port,runway=dns:///runway:50061" into backend → target."""
    targets: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, separator, target = item.partition("=")
        if not separator or name.strip() not in BACKENDS_BY_NAME or not target.strip():
            raise ValueError(
                f"AIPROD_RENDERERS: {item!r} is not backend=target with backend one of "
                f"{', '.join(BACKENDS_BY_NAME)}"
            )
        targets[BACKENDS_BY_NAME[name.strip()]] = target.strip()
    return targets


@dataclass
class Renderer:
    """One configured backend and what the router currently knows of it."""

    backend: int
    target: str
    channel: grpc.aio.Channel
    stub: renderer_pb2_grpc.RendererServiceStub
    serving: bool = False
    capabilities: renderer_pb2.Capabilities | None = None
    # Set once the first health answer (or failure) is in.
    known: asyncio.Event = field(default_factory=asyncio.Event)
    stats: BackendStats = field(default_factory=BackendStats)
    # The router's own view from its results: opens on repeated failures, whatever health says.
    breaker: CircuitBreaker = field(default_factory=lambda: CircuitBreaker(3, 30.0))

    @property
    def name(self) -> str:
        return backend_pb2.Backend.Name(self.backend).removeprefix("BACKEND_").lower()

    async def watch_health(self) -> None:
        """Follows the renderer's health for the router's life, reconnecting with backoff."""
        health = health_pb2_grpc.HealthStub(self.channel)
        delay = _RECONNECT_BACKOFF[0]
        while True:
            try:
                async for response in health.Watch(health_pb2.HealthCheckRequest(service=RENDERER_SERVICE)):
                    serving = response.status == health_pb2.HealthCheckResponse.SERVING
                    if serving and not self.serving:
                        await self._refresh_capabilities()
                    self._set_serving(serving and self.capabilities is not None)
                    self.known.set()
                    delay = _RECONNECT_BACKOFF[0]
            except grpc.aio.AioRpcError as error:
                log.debug("renderer health stream broke", backend=self.backend, code=error.code().name)
            self._set_serving(False)
            self.known.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_BACKOFF[1])

    async def _refresh_capabilities(self) -> None:
        try:
            response = await self.stub.GetCapabilities(
                renderer_pb2.GetCapabilitiesRequest(), timeout=_CAPABILITIES_TIMEOUT
            )
        except grpc.aio.AioRpcError as error:
            log.warning("renderer capabilities unavailable", backend=self.backend, code=error.code().name)
            return
        self.capabilities = response.capabilities

    def _set_serving(self, serving: bool) -> None:
        if serving != self.serving:
            log.info("renderer health", backend=backend_pb2.Backend.Name(self.backend), serving=serving)
            self.serving = serving


class RendererPool:
    """Every configured renderer, one channel and one health watch each, in the running event loop."""

    def __init__(self, targets: dict[int, str], breaker: Callable[[], CircuitBreaker]) -> None:
        self.renderers: dict[int, Renderer] = {}
        for backend, target in targets.items():
            channel = open_channel(target)
            stub = renderer_pb2_grpc.RendererServiceStub(channel)
            self.renderers[backend] = Renderer(backend, target, channel, stub, breaker=breaker())
        self._watches = [asyncio.create_task(renderer.watch_health()) for renderer in self.renderers.values()]

    async def first_look(self, timeout: float) -> None:
        """Waits (at most timeout) until every renderer has answered or failed its first health check,
        so that the router does not turn work away just because it has only started."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(renderer.known.wait() for renderer in self.renderers.values()))

    def get(self, backend: int) -> Renderer | None:
        return self.renderers.get(backend)

    async def close(self) -> None:
        for task in self._watches:
            task.cancel()
        for task in self._watches:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(renderer.channel.close() for renderer in self.renderers.values()))
