import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod_kit.database import open_database
from aiprod_kit.retention import Retention
from aiprod_kit.server import Registration, run
from aiprod_kit.settings import MetricsSettings, load_settings_or_exit
from aiprod_metrics.alerts import AlertEvaluator, AlertThresholds, evaluate_alerts
from aiprod_metrics.events import SqlEventStore
from aiprod_metrics.ledger import SqlLedgerStore
from aiprod_metrics.service import (
    BudgetPolicy,
    MetricsServicer,
    expire_stuck_reservations,
    publish_state_forever,
)
from aiprod_metrics.slo import SloPolicy
from aiprod_metrics.telemetry import MetricsTelemetry


@asynccontextmanager
async def build() -> AsyncIterator[list[Registration]]:
    policy = BudgetPolicy.from_settings(settings)
    thresholds = AlertThresholds.from_settings(settings)
    slo = SloPolicy.from_settings(settings)
    # PostgreSQL when AIPROD_DATABASE_URL is set (every replica on one database), else SQLite files; the
    # ledger's with synchronous=FULL: an acknowledged reservation survives a crashed machine.
    metrics_dir = settings.data_dir / "metrics"
    ledger = await SqlLedgerStore.open(
        await open_database(settings, metrics_dir / "ledger.sqlite3", "ledger", "FULL"), policy.time_zone
    )
    events = await SqlEventStore.open(await open_database(settings, metrics_dir / "events.sqlite3", "events"))
    # The SLO report's shares read hours, not a week of outcomes (67 ms -> 0.8 ms at 1,000,000 on SQLite).
    await events.keep_slo_counts(slo.latency_max_seconds, slo.quality_min)
    alerts = AlertEvaluator(events, ledger, policy.default_tenant, thresholds)
    telemetry = MetricsTelemetry()
    servicer = MetricsServicer(ledger, policy, events, alerts, slo, telemetry)
    # Settled reservations past the ledger's retention, deleted in the background (each day's money stays).
    retention = Retention(
        "settled reservations",
        ledger.purge,
        settings.ledger_retention_seconds,
        settings.retention_purge_interval_seconds,
    )
    await retention.start()
    tasks = [
        asyncio.create_task(expire_stuck_reservations(ledger, policy.expiry_sweep_seconds, telemetry)),
        asyncio.create_task(evaluate_alerts(alerts, events, thresholds.interval_seconds, slo.retention)),
        asyncio.create_task(publish_state_forever(servicer, thresholds.interval_seconds)),
    ]
    try:
        yield [
            Registration(
                metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name,
                servicer,
                metrics_pb2_grpc.add_MetricsServiceServicer_to_server,
            )
        ]
    finally:
        await retention.stop()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await events.close()
        await ledger.close()


settings = load_settings_or_exit(MetricsSettings)
run("metrics", settings, settings.metrics_port, build)
