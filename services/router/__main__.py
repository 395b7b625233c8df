from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiprod.metrics.v1 import metrics_pb2_grpc
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_kit.breaker import CircuitBreaker
from aiprod_kit.channels import open_channel
from aiprod_kit.server import Registration, run
from aiprod_kit.settings import RouterSettings, load_settings_or_exit
from aiprod_router.backends import RendererPool, parse_renderers
from aiprod_router.chain import RenderChain
from aiprod_router.service import RouterServicer
from aiprod_router.telemetry import RouterMetrics

settings = load_settings_or_exit(RouterSettings)
targets = parse_renderers(settings.renderers)


def breaker() -> CircuitBreaker:
    return CircuitBreaker(
        settings.router_breaker_failures,
        settings.router_breaker_cooldown_seconds,
        failure_ratio=settings.router_breaker_failure_ratio,
        window=settings.router_breaker_window,
    )


@asynccontextmanager
async def build() -> AsyncIterator[list[Registration]]:
    pool = RendererPool(targets, breaker, settings)
    metrics_channel = open_channel(settings.metrics_target, settings)
    await pool.first_look(timeout=5.0)
    telemetry = RouterMetrics(pool.renderers.values)
    chain = RenderChain(pool, metrics_pb2_grpc.MetricsServiceStub(metrics_channel), settings, telemetry)
    try:
        yield [
            Registration(
                router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name,
                RouterServicer(pool, chain),
                router_pb2_grpc.add_RouterServiceServicer_to_server,
            )
        ]
    finally:
        await pool.close()
        await metrics_channel.close()


run("router", settings, settings.router_port, build)
