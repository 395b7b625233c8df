"""The renderers the router is configured with: their stubs, capabilities and live health.

Health comes from one grpc.health.v1 Watch stream per replica (pushed changes, not polling);
capabilities are fetched again each time a replica turns SERVING.
"""

import asyncio
import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiprod.common.v1 import backend_pb2
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.breaker import CircuitBreaker
from aiprod_kit.capabilities import backend_name
from aiprod_kit.channels import RECONNECT_BACKOFF_SECONDS, RECONNECT_OPTIONS, open_channel
from aiprod_kit.settings import CommonSettings
from aiprod_kit.tls import TlsSettings, dial_aio
from aiprod_router.stats import BackendStats
from aiprod_router.watches import RenderWatches

RENDERER_SERVICE = renderer_pb2.DESCRIPTOR.services_by_name["RendererService"].full_name
BACKENDS_BY_NAME = {
    "local": backend_pb2.BACKEND_LOCAL,
    "runway": backend_pb2.BACKEND_RUNWAY,
    "veo": backend_pb2.BACKEND_VEO,
    "replicate": backend_pb2.BACKEND_REPLICATE,
}
_CAPABILITIES_TIMEOUT = 5.0
# How often a dns:/// target is resolved again, to follow replicas coming and going.
_RESOLVE_SECONDS = 30.0

log = structlog.get_logger()


def parse_renderers(value: str) -> dict[int, str]:
    """Parses "local=host:port,runway=dns:///runway:50061,veo=ipv4:10.0.0.1:50062,10.0.0.2:50062" into
    backend → target. A part without "=" continues the address list of the target before it."""
    targets: dict[int, str] = {}
    last = None
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, separator, target = item.partition("=")
        if not separator and last is not None and targets[last].startswith(("ipv4:", "ipv6:")):
            targets[last] += f",{item}"
            continue
        if not separator or name.strip() not in BACKENDS_BY_NAME or not target.strip():
            raise ValueError(
                f"AIPROD_RENDERERS: {item!r} is not backend=target with backend one of "
                f"{', '.join(BACKENDS_BY_NAME)}"
            )
        last = BACKENDS_BY_NAME[name.strip()]
        targets[last] = target.strip()
    return targets


async def replica_addresses(target: str) -> set[str]:
    """The replicas behind a target: every address a dns:/// name resolves to, each of an ipv4:/ipv6:
    list, or the target itself."""
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            return {address.strip() for address in target.removeprefix(scheme).split(",") if address.strip()}
    if not target.startswith("dns:"):
        return {target}
    host_port = target.removeprefix("dns:").lstrip("/")
    host, _, port = host_port.rpartition(":")
    infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    return {f"[{info[4][0]}]:{port}" if ":" in info[4][0] else f"{info[4][0]}:{port}" for info in infos}


@dataclass
class Renderer:
    """One configured backend and what the router currently knows of it."""

    backend: int
    target: str
    channel: grpc.aio.Channel
    # Starts and follows renders, only at replicas that report SERVING.
    stub: renderer_pb2_grpc.RendererServiceStub
    # A channel that is not health-checked, and its stub (see `records`).
    records_channel: grpc.aio.Channel | None = None
    records_stub: renderer_pb2_grpc.RendererServiceStub | None = None
    serving: bool = False
    capabilities: renderer_pb2.Capabilities | None = None
    # Each replica's own health, from its own Watch stream: address → serving.
    replicas: dict[str, bool] = field(default_factory=dict)
    # Set once the first health answer (or failure) is in.
    known: asyncio.Event = field(default_factory=asyncio.Event)
    stats: BackendStats = field(default_factory=BackendStats)
    # The router's own view from its results: opens on repeated failures, whatever health says.
    breaker: CircuitBreaker = field(default_factory=lambda: CircuitBreaker(3, 30.0))
    # How the health watches reach each replica (the mesh's TLS).
    tls: TlsSettings = field(default_factory=TlsSettings)
    # The renders followed here, over one stream (made from `stub`).
    watches: RenderWatches = field(init=False)

    def __post_init__(self) -> None:
        self.watches = RenderWatches(self.stub)

    @property
    def records(self) -> renderer_pb2_grpc.RendererServiceStub:
        """Asks what the renderer did (a render by its key), also while it is not serving: its key store
        still answers, so that a call that never reached the provider is known as such."""
        return self.records_stub or self.stub

    @property
    def name(self) -> str:
        return backend_name(self.backend)

    async def watch_replicas(self) -> None:
        """Keeps one health Watch per replica for the router's life, resolving the target again from
        time to time so that replicas coming and going are followed."""
        watches: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                try:
                    addresses = await replica_addresses(self.target)
                except OSError as error:
                    log.warning("renderer target not resolved", backend=self.name, error=str(error))
                    addresses = set(watches)
                for address in addresses - set(watches):
                    watches[address] = asyncio.create_task(self._watch_replica(address))
                for address in set(watches) - addresses:
                    watches.pop(address).cancel()
                    self.replicas.pop(address, None)
                self._update()
                await asyncio.sleep(_RESOLVE_SECONDS)
        finally:
            for watch in watches.values():
                watch.cancel()

    async def _watch_replica(self, address: str) -> None:
        """Follows one replica's health, reconnecting with backoff. A replica counts as serving once it
        has said SERVING and answered GetCapabilities, asked over the connection it said it on: the
        calls' own channel may still be waiting to reconnect after a restart, and its retries would
        hold this loop (and the next NOT_SERVING behind it) for seconds."""
        delay = RECONNECT_BACKOFF_SECONDS[0]
        async with dial_aio(address, self.tls, options=RECONNECT_OPTIONS) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            replica = renderer_pb2_grpc.RendererServiceStub(channel)
            while True:
                watch = health.Watch(health_pb2.HealthCheckRequest(service=RENDERER_SERVICE))
                try:
                    async for response in watch:
                        serving = response.status == health_pb2.HealthCheckResponse.SERVING
                        if (
                            serving
                            and not self.replicas.get(address)
                            and not await self._read_capabilities(replica)
                        ):
                            watch.cancel()  # asked again once the replica says SERVING on a new stream
                            break
                        self.replicas[address] = serving
                        self._update()
                        delay = RECONNECT_BACKOFF_SECONDS[0]
                except grpc.aio.AioRpcError as error:
                    log.debug(
                        "replica health stream broke",
                        backend=self.name,
                        address=address,
                        code=error.code().name,
                    )
                self.replicas[address] = False
                self._update()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_BACKOFF_SECONDS[1])

    async def _read_capabilities(self, replica: renderer_pb2_grpc.RendererServiceStub) -> bool:
        """Whether the replica answered GetCapabilities (its answer kept as the backend's)."""
        try:
            response = await replica.GetCapabilities(
                renderer_pb2.GetCapabilitiesRequest(), timeout=_CAPABILITIES_TIMEOUT
            )
        except grpc.aio.AioRpcError as error:
            log.warning("renderer capabilities unavailable", backend=self.name, code=error.code().name)
            return False
        self.capabilities = response.capabilities
        return True

    def _update(self) -> None:
        """The backend serves while any replica does (and its capabilities are known)."""
        serving = any(self.replicas.values()) and self.capabilities is not None
        if serving != self.serving:
            log.info("renderer health", backend=self.name, serving=serving, replicas=self.replicas)
            self.serving = serving
        if self.replicas:
            self.known.set()


class RendererPool:
    """Every configured renderer, its two channels and its health watch, in the running event loop."""

    def __init__(
        self, targets: dict[int, str], breaker: Callable[[], CircuitBreaker], settings: CommonSettings
    ) -> None:
        self.renderers: dict[int, Renderer] = {}
        for backend, target in targets.items():
            # Calls go only to replicas that report SERVING (client-side health checking)...
            channel = open_channel(target, settings, health_service=RENDERER_SERVICE)
            stub = renderer_pb2_grpc.RendererServiceStub(channel)
            # ...but for asking what a replica did, which any replica can answer from the key store.
            records_channel = open_channel(target, settings)
            records = renderer_pb2_grpc.RendererServiceStub(records_channel)
            self.renderers[backend] = Renderer(
                backend, target, channel, stub, records_channel, records, breaker=breaker(), tls=settings.tls
            )
        self._watches = [
            asyncio.create_task(renderer.watch_replicas()) for renderer in self.renderers.values()
        ]

    async def first_look(self, timeout: float) -> None:
        """Waits (at most timeout) until every renderer has answered or failed its first health check,
        so that the router does not turn work away just because it has only started."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(renderer.known.wait() for renderer in self.renderers.values()))

    def get(self, backend: int) -> Renderer | None:
        return self.renderers.get(backend)

    async def close(self) -> None:
        await asyncio.gather(*(renderer.watches.close() for renderer in self.renderers.values()))
        for task in self._watches:
            task.cancel()
        for task in self._watches:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        channels = [renderer.channel for renderer in self.renderers.values()]
        channels += [r.records_channel for r in self.renderers.values() if r.records_channel is not None]
        await asyncio.gather(*(channel.close() for channel in channels))
