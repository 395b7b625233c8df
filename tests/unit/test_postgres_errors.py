"""How the PostgreSQL layer names what went wrong: a lost connection is the database unreachable
(UNAVAILABLE, try again); a statement libpq will not send is the code's fault, said so, and the pool
keeps serving."""

import psycopg
import pytest
from postgres_support import SERVER_URL
from structlog.testing import capture_logs

from aiprod_kit.database import DatabaseUnavailable
from aiprod_kit.postgres import StatementRefused, connect_postgres

# libpq sends at most 65,535 parameters with a statement.
TOO_MANY = 70_000


@pytest.fixture
async def database(postgres_url: str):
    opened = await connect_postgres(postgres_url, "test", connect_timeout=5)
    yield opened
    await opened.close()


async def test_a_statement_libpq_refuses_is_named_not_taken_for_an_outage(database) -> None:
    query = f"SELECT 1 WHERE 1 IN ({', '.join('?' * TOO_MANY)})"
    with capture_logs() as logs:
        with pytest.raises(StatementRefused, match="number of parameters"):
            await database.fetchall(query, tuple(range(TOO_MANY)))
        with pytest.raises(StatementRefused):
            async with database.transaction() as transaction:
                await transaction.execute(query, tuple(range(TOO_MANY)))
    assert not [entry for entry in logs if entry["event"] == "database unreachable"]
    assert await database.fetchone("SELECT 2") == (2,)


async def test_a_connection_lost_mid_transaction_is_the_database_unreachable(database) -> None:
    with capture_logs() as logs, pytest.raises(DatabaseUnavailable):
        async with database.transaction() as transaction:
            (pid,) = await transaction.fetchone("SELECT pg_backend_pid()")
            with psycopg.connect(SERVER_URL, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            await transaction.fetchone("SELECT 1")
    assert [entry["event"] for entry in logs] == ["database unreachable"]
    # The pool replaces the lost connection.
    assert await database.fetchone("SELECT 2") == (2,)
