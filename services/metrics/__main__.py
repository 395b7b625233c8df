from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod_kit.server import Registration, run
from aiprod_kit.settings import MetricsSettings
from aiprod_metrics.service import MetricsServicer


@asynccontextmanager
async def build() -> AsyncIterator[list[Registration]]:
    yield [
        Registration(
            metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name,
            MetricsServicer(),
            metrics_pb2_grpc.add_MetricsServiceServicer_to_server,
        )
    ]


settings = MetricsSettings()
run("metrics", settings, settings.metrics_port, build)
