"""PostgreSQL for the tests: a schema of its own per test, on the server given by AIPROD_TEST_POSTGRES_URL
(default: the local one CI runs too), dropped afterwards.

PostgreSQL is required, never skipped: a skipped store test would hide a failure. Unreachable, the
tests that need it fail, saying so.
"""

import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from aiprod_kit.mesh import Mesh

SERVER_URL = os.environ.get("AIPROD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def admin_connection() -> psycopg.Connection:
    """A connection to the test server as its administrator (schemas and roles are made with it)."""
    try:
        return psycopg.connect(SERVER_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        pytest.fail(
            f"PostgreSQL for the tests is unreachable: {error}. Start it, or point AIPROD_TEST_POSTGRES_URL "
            "at one (a database the tests may create schemas in).",
            pytrace=False,
        )


@contextmanager
def fresh_schema() -> Iterator[str]:
    """Creates a schema; yields a connection string whose connections use it (their search_path), which
    services take as AIPROD_DATABASE_URL; drops the schema and everything in it on the way out."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    with admin_connection() as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(SERVER_URL, options=f"-c search_path={name}")
    finally:
        with admin_connection() as admin:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def assert_runs_on_its_store(mesh: Mesh, service: str, environment: Mapping[str, str]) -> None:
    """Fails unless the service opened the store the environment asks for: PostgreSQL with
    AIPROD_DATABASE_URL, SQLite without (a test meant for PostgreSQL must not pass on SQLite)."""
    log = mesh.services[service].log_path.read_text()
    on_postgres = '"event": "database connected"' in log
    assert on_postgres == bool(environment.get("AIPROD_DATABASE_URL")), (
        f"{service} on the wrong store:\n{log}"
    )
