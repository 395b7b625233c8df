from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_kit.server import Registration, run
from aiprod_kit.settings import RouterSettings
from aiprod_router.backends import RendererPool, parse_renderers
from aiprod_router.service import RouterServicer

settings = RouterSettings()
targets = parse_renderers(settings.renderers)


@asynccontextmanager
async def build() -> AsyncIterator[list[Registration]]:
    pool = RendererPool(targets)
    await pool.first_look(timeout=5.0)
    try:
        yield [
            Registration(
                router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name,
                RouterServicer(pool),
                router_pb2_grpc.add_RouterServiceServicer_to_server,
            )
        ]
    finally:
        await pool.close()


run("router", settings, settings.router_port, build)
