"""What every test runs with: the test meshes' tier and price settings, and the databases the stores run
on (SQLite, or a fresh PostgreSQL schema). The mesh itself is tests/mesh/conftest.py's."""

import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.gcs import storage_emulator
from helpers.postgres import fresh_schema

from aiprod_kit.database import Database, SqliteDatabase
from aiprod_kit.postgres import connect_postgres

# The development tenant (GOLD) of the test meshes orders without the tier's limits: tests poll and race
# far beyond 50 calls a minute, and their floors are the presets' own. The tier tests set their own.
os.environ.setdefault(
    "AIPROD_GATEWAY_TIERS",
    json.dumps(
        {
            "GOLD": {
                "concurrent_jobs": 1_000_000,
                "requests_per_minute": 1_000_000_000,
                "quality_minimum": 0,
                "max_duration_seconds": 180,
                "latency_seconds": 86_400,
            }
        }
    ),
)
# Nor are its jobs held to the presets' price limits: tests of routing, faults and money send quick_social
# jobs to Veo and through paid fallbacks, which an 8 USD a minute limit leaves out. The quote tests
# (test_quotes.py) set their own.
os.environ.setdefault(
    "AIPROD_GATEWAY_PRESET_PRICES",
    json.dumps({"quick_social": 1000, "brand_campaign": 1000, "premium_spot": 1000}),
)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL connection string on a fresh schema of the test database, dropped afterwards."""
    with fresh_schema() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def database_environment(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment of services on either store: nothing (SQLite files in the data directory), or
    AIPROD_DATABASE_URL on a fresh PostgreSQL schema. A test using it runs once on each."""
    if request.param == "sqlite":
        return {}
    return {"AIPROD_DATABASE_URL": request.getfixturevalue("postgres_url")}


OpenDatabase = Callable[..., Awaitable[Database]]


@pytest.fixture(params=["sqlite", "postgres"])
async def open_database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenDatabase]:
    """Opens the one database a store lives in, on SQLite or on PostgreSQL (a test using it runs on
    each): another connection at each call, as another replica (or version) would have; closed after
    the test. `await open_database(name, **options)`: the SQLite file's name and SqliteDatabase's
    options (private=True as the gateway's own file), ignored on PostgreSQL."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else ""
    opened: list[Database] = []

    async def open_one(name: str, **sqlite_options: Any) -> Database:
        if url:
            database: Database = await connect_postgres(url, "test", connect_timeout=5)
        else:
            database = SqliteDatabase(tmp_path / f"{name}.sqlite3", name, **sqlite_options)
        opened.append(database)
        return database

    yield open_one
    for database in opened:
        await database.close()


@pytest.fixture(scope="session")
def storage_emulator_host() -> Iterator[str]:
    """A Cloud Storage emulator for the session (helpers.gcs)."""
    with storage_emulator() as host:
        yield host


@pytest.fixture
def gcs_bucket(storage_emulator_host: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A new bucket of the emulator, which every Cloud Storage client of the test finds
    (`STORAGE_EMULATOR_HOST`)."""
    # Imported here: the storage client is a heavy import most tests do without.
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", storage_emulator_host)
    client = storage.Client(project="test", credentials=AnonymousCredentials())
    return client.create_bucket(f"videos-{uuid.uuid4().hex[:12]}")
