import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod_kit.server import Registration, run
from aiprod_kit.settings import MetricsSettings
from aiprod_metrics.ledger import SqliteLedgerStore
from aiprod_metrics.service import BudgetPolicy, MetricsServicer, expire_stuck_reservations


@asynccontextmanager
async def build() -> AsyncIterator[list[Registration]]:
    policy = BudgetPolicy.from_settings(settings)
    ledger = SqliteLedgerStore(settings.data_dir / "metrics" / "ledger.sqlite3", policy.time_zone)
    expiry = asyncio.create_task(expire_stuck_reservations(ledger, policy.expiry_sweep_seconds))
    try:
        yield [
            Registration(
                metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name,
                MetricsServicer(ledger, policy),
                metrics_pb2_grpc.add_MetricsServiceServicer_to_server,
            )
        ]
    finally:
        expiry.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await expiry
        await ledger.close()


settings = MetricsSettings()
run("metrics", settings, settings.metrics_port, build)
