from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiprod.gateway.v1 import admin_pb2, admin_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from aiprod.metrics.v1 import metrics_pb2_grpc
from aiprod.router.v1 import router_pb2_grpc
from aiprod_gateway.admin import AdminServicer
from aiprod_gateway.auth import ADMIN_SERVICE, GATEWAY_SERVICE, AdminKeyGuard, ApiKeyGuard
from aiprod_gateway.auth_failures import AuthFailures
from aiprod_gateway.claims import owner_id
from aiprod_gateway.dispatcher import Dispatcher
from aiprod_gateway.driving import BudgetPolicy
from aiprod_gateway.keys import TenantStore
from aiprod_gateway.limits import RequestLimiter
from aiprod_gateway.quoting import Quoter, QuoteStore
from aiprod_gateway.reporting import MetricsReporter
from aiprod_gateway.service import GatewayServicer
from aiprod_gateway.settlement import Settlement
from aiprod_gateway.spending import Spending
from aiprod_gateway.store import SqlJobStore
from aiprod_gateway.tiers import parse_tiers
from aiprod_gateway.videos import VideoRetention
from aiprod_kit.channels import open_channel
from aiprod_kit.database import open_database
from aiprod_kit.rendering.storage import local_video_store
from aiprod_kit.retention import Retention
from aiprod_kit.server import Registration, run
from aiprod_kit.settings import GatewaySettings, load_settings_or_exit

settings = load_settings_or_exit(GatewaySettings)


def auth_failures(service: str) -> AuthFailures:
    """The slow-down of one service's authentication failures, as the settings say."""
    return AuthFailures(
        service,
        free_failures=settings.gateway_auth_failures_free,
        max_delay_seconds=settings.gateway_auth_failure_max_delay_seconds,
    )


@asynccontextmanager
async def build() -> AsyncIterator[list[Registration]]:
    # A wrong tier stops the gateway first.
    tiers = parse_tiers(settings.gateway_tiers)
    # PostgreSQL when AIPROD_DATABASE_URL is set (every replica on one database), else SQLite: a file
    # of this gateway's own (a replica needs the shared database).
    database = await open_database(
        settings, settings.data_dir / "gateway" / "jobs.sqlite3", "gateway", "NORMAL", private=True
    )
    store = await SqlJobStore.open(database)
    tenants = await TenantStore.open(database)
    # Each tenant's calls a minute, counted on the database every replica shares.
    limiter = await RequestLimiter.open(database, tiers)
    router_channel = open_channel(settings.router_target, settings)
    metrics_channel = open_channel(settings.metrics_target, settings)
    router = router_pb2_grpc.RouterServiceStub(router_channel)
    metrics = metrics_pb2_grpc.MetricsServiceStub(metrics_channel)
    # The presets' price limits, the baseline backend and how long a quote binds, checked here.
    quoter = Quoter.from_settings(settings, router, await QuoteStore.open(database))
    reporter = MetricsReporter(metrics)
    spending = Spending(metrics)
    settlement = Settlement(store, metrics, router, settings.job_retention_seconds)
    dispatcher = Dispatcher(
        store,
        router,
        reporter,
        settlement,
        settings.dispatch_max_in_flight,
        BudgetPolicy.from_settings(settings),
        owner_id(),
        settings.gateway_job_lease_seconds,
    )
    key_guard = ApiKeyGuard(
        tenants, settings.gateway_key_cache_seconds, limiter.admit, auth_failures(GATEWAY_SERVICE)
    )
    # Ended jobs past their retention, with their logs, deleted in the background.
    retention = Retention(
        "ended jobs",
        store.purge_ended,
        settings.job_retention_seconds,
        settings.retention_purge_interval_seconds,
    )
    # Local videos past the same retention that no kept job names (a bucket's lifecycle rule in GCS).
    retentions = [retention]
    if not settings.gcs_bucket:
        retentions.append(
            Retention(
                "videos no kept job names",
                VideoRetention(local_video_store(settings.data_dir), store).purge,
                settings.job_retention_seconds,
                settings.retention_purge_interval_seconds,
            )
        )
    await settlement.start()
    await dispatcher.start()
    for each in retentions:
        await each.start()
    try:
        yield [
            Registration(
                gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,
                GatewayServicer(
                    store,
                    dispatcher,
                    router,
                    metrics,
                    reporter,
                    spending,
                    settlement,
                    quoter,
                    tiers=tiers,
                    job_retention_seconds=settings.job_retention_seconds,
                ),
                gateway_pb2_grpc.add_GatewayServiceServicer_to_server,
                guard=key_guard,
            ),
            Registration(
                admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
                AdminServicer(tenants, metrics, key_guard),
                admin_pb2_grpc.add_AdminServiceServicer_to_server,
                guard=AdminKeyGuard(
                    settings.gateway_admin_key.get_secret_value(), auth_failures(ADMIN_SERVICE)
                ),
            ),
        ]
    finally:
        for each in retentions:
            await each.stop()
        await dispatcher.stop()
        await settlement.stop()
        await reporter.close()
        await router_channel.close()
        await metrics_channel.close()
        await store.close()


run("gateway", settings, settings.gateway_port, build)
