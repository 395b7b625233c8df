"""The service bootstrap every AIPROD service runs in.

grpc.aio server with the error and OpenTelemetry interceptors, the standard health service (each
service's full name and ""), reflection, and a clean stop: on SIGTERM or SIGINT health turns
NOT_SERVING, in-flight calls drain for the grace period, then the service's resources close.
"""

import asyncio
import contextlib
import signal
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aiprod_kit.errors import ErrorInterceptor
from aiprod_kit.logs import configure_logging
from aiprod_kit.settings import CommonSettings
from aiprod_kit.telemetry import configure_telemetry, server_interceptors


@dataclass(frozen=True)
class Registration:
    """One gRPC service a process serves: its full name, its servicer and the generated add function."""

    full_name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]


# A service's resources (stores, channels, background tasks) for the life of the server: entered
# before it serves, left after it has drained.
ServiceFactory = Callable[[], AbstractAsyncContextManager[list[Registration]]]


async def serve(component: str, settings: CommonSettings, port: int, build: ServiceFactory) -> None:
    log = configure_logging(component, settings.log_level, settings.log_format)
    configure_telemetry(component, settings.otel_exporter)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async with build() as registrations:
        server = grpc.aio.server(interceptors=[*server_interceptors(), ErrorInterceptor()])
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for registration in registrations:
            registration.add_to_server(registration.servicer, server)
        names = [registration.full_name for registration in registrations]
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server,
        )
        bound_port = server.add_insecure_port(f"{settings.host}:{port}")
        await server.start()
        for name in [*names, ""]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        # Supervisors (aiprod up, the tests) read the bound port from this line when they asked for port 0.
        log.info("serving", port=bound_port, services=names)

        await stop.wait()
        log.info("draining", grace_seconds=settings.shutdown_grace_seconds)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(settings.shutdown_grace_seconds)
    log.info("stopped")


def run(component: str, settings: CommonSettings, port: int, build: ServiceFactory) -> None:
    """Entry point of a service process."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(component, settings, port, build))
