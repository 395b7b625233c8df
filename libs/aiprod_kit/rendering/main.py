"""The process of a provider renderer: its provider, the kit's service, health, storage."""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.database import open_database
from aiprod_kit.redaction import register_settings
from aiprod_kit.rendering.keys import RenderKeyStore
from aiprod_kit.rendering.provider import Provider
from aiprod_kit.rendering.service import ProviderRendererService
from aiprod_kit.rendering.storage import video_store_from_settings
from aiprod_kit.retention import Retention
from aiprod_kit.server import HealthSignal, Registration, run
from aiprod_kit.settings import CommonSettings, ProviderSettings, load_settings_or_exit

RENDERER_SERVICE = renderer_pb2.DESCRIPTOR.services_by_name["RendererService"].full_name
S = TypeVar("S", bound=ProviderSettings)


def run_renderer(component: str, settings_class: type[S], make_provider: Callable[[S], Provider]) -> None:
    """Runs a provider renderer; a wrong setting (in the settings or as make_provider finds it, raising
    ConfigurationError) stops the process at start-up with a message naming the variable."""
    settings = load_settings_or_exit(settings_class)
    common = load_settings_or_exit(CommonSettings)
    # The provider's credentials (its own settings, not the common ones the server registers) are
    # replaced in every log line, span and error message, also where the provider quotes them back.
    register_settings(settings)

    @asynccontextmanager
    async def build() -> AsyncIterator[list[Registration]]:
        provider = make_provider(settings)
        # Not serving until the first probe has passed (and never without credentials).
        health = HealthSignal(serving=False)
        store = video_store_from_settings(common.data_dir, settings.gcs_bucket)
        # The render keys every replica of this backend shares: PostgreSQL with AIPROD_DATABASE_URL,
        # else a SQLite file under the data directory (replicas on one machine), synced at each commit.
        database = await open_database(
            common,
            common.data_dir / "renderers" / f"{provider.name}-keys.sqlite3",
            component,
            synchronous="FULL",
        )
        keys = await RenderKeyStore.open(database, provider.backend)
        # Keys of ended renders past the jobs' retention, deleted in the background (by every replica:
        # harmless, each purge deletes only what is past it).
        retention = Retention(
            f"{provider.name} render keys",
            keys.purge,
            common.job_retention_seconds,
            common.retention_purge_interval_seconds,
        )
        service = ProviderRendererService(
            provider, settings, store, health, common.data_dir / "tmp" / component, keys
        )
        await service.start()
        await retention.start()
        try:
            yield [
                Registration(
                    RENDERER_SERVICE, service, renderer_pb2_grpc.add_RendererServiceServicer_to_server, health
                )
            ]
        finally:
            await retention.stop()
            await service.close()
            await provider.aclose()
            await keys.close()

    run(component, common, settings.port, build)
