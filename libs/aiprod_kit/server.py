"""The service bootstrap every AIPROD service runs in.

grpc.aio server whose every call is traced, timed and given a proper status on error, and passes each
service's own guard (the gateway's API keys: checked here for every method of that service, never for
health or reflection), all through one interceptor (aiprod_kit.handlers); the standard health service
(each service's full name and ""), reflection, and a clean stop: on SIGTERM or SIGINT health turns
NOT_SERVING, in-flight calls drain for the grace period, then the service's resources close. The port
is plaintext or TLS as AIPROD_TLS_* say (aiprod_kit/tls.py), with an optional plaintext port for health
alone (AIPROD_HEALTH_PORT) for probes that cannot present a certificate.
"""

import asyncio
import contextlib
import ctypes
import functools
import gc
import inspect
import os
import signal
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aiprod_kit.channels import MESSAGE_SIZE_OPTIONS, keepalive_options
from aiprod_kit.errors import ErrorStatuses
from aiprod_kit.handlers import (
    AnsweredByStream,
    AnsweredOnce,
    Behavior,
    Responses,
    WrappingInterceptor,
    rewrap,
)
from aiprod_kit.logs import configure_logging
from aiprod_kit.redaction import register_settings
from aiprod_kit.settings import CommonSettings, ConfigurationError, exit_on_configuration_error
from aiprod_kit.telemetry import CallTelemetry, configure_telemetry, shutdown_telemetry
from aiprod_kit.tls import server_credentials


class HealthSignal:
    """A service's own say in its health (a renderer without credentials is alive but not serving).

    The bootstrap publishes it on the standard health service under the service's full name; until the
    server starts, changes are only remembered.
    """

    def __init__(self, serving: bool = True) -> None:
        self.serving = serving
        self._publish: Callable[[bool], Awaitable[None]] | None = None

    async def set(self, serving: bool) -> None:
        self.serving = serving
        if self._publish is not None:
            await self._publish(serving)

    async def bind(self, publish: Callable[[bool], Awaitable[None]]) -> None:
        self._publish = publish
        await publish(self.serving)


# Admits a call to a service before its handler runs, from its servicer context (the metadata, the
# peer): raises a ServiceError to refuse it (UNAUTHENTICATED...), and may set context variables the
# handler reads (the calling tenant); runs in the call's own context.
Guard = Callable[[grpc.aio.ServicerContext], Awaitable[None]]


@dataclass(frozen=True)
class Registration:
    """One gRPC service a process serves: its full name, its servicer and the generated add function."""

    full_name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    # The service's health when it can be alive yet unable to serve; None means serving while up.
    health: HealthSignal | None = None
    # What every call to this service passes first; None: every call is admitted.
    guard: Guard | None = None


class Guards:
    """Runs each registration's guard before the handlers of its own service's methods (only those: a
    health check or a reflection call never needs a key). A `MethodWrapper` inside the error statuses,
    so that a guard's refusal becomes a proper status like any handler's."""

    def __init__(self, registrations: list[Registration]) -> None:
        self._guards = {f"/{r.full_name}/": r.guard for r in registrations if r.guard is not None}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        guard = self._guards.get(method[: method.rfind("/") + 1])
        if guard is None:
            return handler

        def answered_once(inner: AnsweredOnce) -> AnsweredOnce:
            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await guard(context)
                return await inner(request, context)

            return unary

        def answered_by_stream(inner: Behavior) -> AnsweredByStream:
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Responses:
                await guard(context)
                if inspect.isasyncgenfunction(inner):
                    async for response in inner(request, context):
                        yield response
                else:
                    await inner(request, context)

            return stream

        return rewrap(handler, answered_once, answered_by_stream)


# A port something else listens on is refused, not shared: by default gRPC binds with SO_REUSEPORT, so a
# second copy of a service would start on the first one's port and take part of its calls.
_EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)


def _listen(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Binds the server to address ("host:port"; port 0 picks a free one); returns the port bound."""
    try:
        return (
            server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        )
    except RuntimeError as error:  # gRPC's words for any failed bind
        raise ConfigurationError(
            f"cannot listen on {address}: the port is in use, or the host (AIPROD_HOST) is not this machine's"
        ) from error


# A service's resources (stores, channels, background tasks) for the life of the server: entered
# before it serves, left after it has drained.
ServiceFactory = Callable[[], AbstractAsyncContextManager[list[Registration]]]


async def serve(component: str, settings: CommonSettings, port: int, build: ServiceFactory) -> None:
    # First: the settings' secrets are redacted from everything said after (aiprod_kit.redaction).
    register_settings(settings)
    log = configure_logging(component, settings.log_level, settings.log_format)
    if problems := settings.tls.problems(server=True):
        raise ConfigurationError("; ".join(problems))
    configure_telemetry(component, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async with build() as registrations:
        server = grpc.aio.server(
            interceptors=[WrappingInterceptor([CallTelemetry(), ErrorStatuses(), Guards(registrations)])],
            options=[_EXCLUSIVE_PORT, *MESSAGE_SIZE_OPTIONS, *keepalive_options(settings, server=True)],
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for registration in registrations:
            registration.add_to_server(registration.servicer, server)
        names = [registration.full_name for registration in registrations]
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server,
        )
        bound_port = _listen(server, f"{settings.host}:{port}", server_credentials(settings.tls))
        await server.start()
        probes = await _serve_health_port(health_servicer, settings)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        for registration in registrations:
            await (registration.health or HealthSignal()).bind(
                functools.partial(_publish_health, health_servicer, registration.full_name)
            )
        # What start-up made (modules, classes, the service's own objects) lives as long as the process:
        # frozen, no full collection walks it again (each took 25 ms of a renderer's event loop, longer
        # on a busy box: a health change or a signal waited behind it).
        gc.collect()
        gc.freeze()
        # Supervisors (aiprod up, the tests) read the bound port from this line when they asked for port 0.
        log.info(
            "serving",
            port=bound_port,
            services=names,
            tls=settings.tls.serving_mode,
            health_port=probes.port if probes else None,
        )

        await stop.wait()
        log.info("draining", grace_seconds=settings.shutdown_grace_seconds)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(settings.shutdown_grace_seconds)
        if probes:
            await probes.server.stop(None)
    await asyncio.to_thread(shutdown_telemetry)
    log.info("stopped")


@dataclass(frozen=True)
class _HealthPort:
    server: grpc.aio.Server
    port: int


async def _serve_health_port(
    servicer: health.aio.HealthServicer, settings: CommonSettings
) -> _HealthPort | None:
    """The plaintext health-only port (AIPROD_HEALTH_PORT), the same health answers as the service's."""
    if settings.health_port is None:
        return None
    server = grpc.aio.server(options=[_EXCLUSIVE_PORT, *keepalive_options(settings, server=True)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = _listen(server, f"{settings.host}:{settings.health_port}")
    await server.start()
    return _HealthPort(server, port)


async def _publish_health(servicer: health.aio.HealthServicer, name: str, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    await servicer.set(name, status)


# glibc's M_MMAP_THRESHOLD, and the value it starts at.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 128 * 1024


def _give_back_large_blocks() -> None:
    """Pins glibc's mmap threshold at its starting 128 KB. Left to itself, glibc raises it after each
    large block freed (up to 32 MB), so a decoded frame's buffer (about 1.4 MB at 720p) then comes from
    the heap and stays in the process once freed: a renderer grew 26 MB over 200 QC decodes on two
    threads, 15 MB with the threshold pinned (66 and 22 MB on four). An operator's own
    MALLOC_MMAP_THRESHOLD_ wins; nothing is done where the C library is not glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def run(component: str, settings: CommonSettings, port: int, build: ServiceFactory) -> None:
    """Entry point of a service process; a configuration error ends it at once, naming the variable."""
    _give_back_large_blocks()
    with exit_on_configuration_error(), contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(component, settings, port, build))
