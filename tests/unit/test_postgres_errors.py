"""How the PostgreSQL layer names what went wrong: a lost connection is the database unreachable
(UNAVAILABLE, try again); a statement libpq will not send is the code's fault, said so, and the pool
keeps serving."""

import asyncio

import psycopg
import pytest
from helpers.postgres import SERVER_URL
from structlog.testing import capture_logs

from aiprod_kit import postgres
from aiprod_kit.database import DatabaseUnavailable
from aiprod_kit.postgres import POOL_SIZE, StatementRefused, connect_postgres

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


async def test_a_statement_failing_in_a_pipelined_transaction_fails_it_whole(database) -> None:
    """A transaction's statements are sent without waiting for each other: a failed one may only be
    reported at the commit, and nothing the transaction wrote stays."""
    async with database.transaction() as transaction:
        await transaction.execute("CREATE TABLE pipelined (key INTEGER PRIMARY KEY)")
    with pytest.raises(psycopg.errors.UniqueViolation):
        async with database.transaction() as transaction:
            await transaction.execute("INSERT INTO pipelined (key) VALUES (1)")
            await transaction.execute("INSERT INTO pipelined (key) VALUES (1)")
            await transaction.execute("INSERT INTO pipelined (key) VALUES (2)")
    assert await database.fetchall("SELECT key FROM pipelined") == []
    # A read in the transaction sees what was sent before it.
    async with database.transaction() as transaction:
        await transaction.execute("INSERT INTO pipelined (key) VALUES (3)")
        assert await transaction.fetchall("SELECT key FROM pipelined") == [(3,)]


async def test_an_idle_connection_the_server_closed_is_replaced_before_use(database, monkeypatch) -> None:
    """A connection idle in the pool (a failover, an idle timeout) is checked before it is handed out."""
    monkeypatch.setattr(postgres, "CHECK_IDLE_SECONDS", 0.0)
    pids = {(await database.fetchone("SELECT pg_backend_pid()"))[0] for _ in range(3)}
    with psycopg.connect(SERVER_URL, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert await database.fetchone("SELECT 2") == (2,)
    async with database.transaction() as transaction:
        assert await transaction.fetchone("SELECT 3") == (3,)


class _Connection:
    """Stands in for a pooled connection: counts the pool's checks (an empty statement)."""

    autocommit = True

    def __init__(self) -> None:
        self.checks = 0

    async def execute(self, query: str) -> None:
        assert query == ""
        self.checks += 1


async def test_only_a_connection_idle_for_a_while_is_checked() -> None:
    now = [100.0]
    freshness = postgres._Freshness(clock=lambda: now[0])
    connection = _Connection()
    await freshness.check(connection)  # new to the pool: checked
    await freshness.returned(connection)
    now[0] += postgres.CHECK_IDLE_SECONDS / 2
    await freshness.check(connection)  # back a moment ago: not
    assert connection.checks == 1
    await freshness.returned(connection)
    now[0] += postgres.CHECK_IDLE_SECONDS * 2
    await freshness.check(connection)
    assert connection.checks == 2


async def test_an_error_of_the_callers_own_undoes_the_transaction_even_after_a_failed_statement(
    database,
) -> None:
    async with database.transaction() as transaction:
        await transaction.execute("CREATE TABLE undone (key INTEGER PRIMARY KEY)")
    for failing_first in (False, True):
        with pytest.raises(ValueError, match="the caller's"):
            async with database.transaction() as transaction:
                await transaction.execute("INSERT INTO undone (key) VALUES (1)")
                if failing_first:  # sent, its error not read yet
                    await transaction.execute("INSERT INTO undone (key) VALUES (1)")
                raise ValueError("the caller's")
    assert await database.fetchall("SELECT key FROM undone") == []


async def test_a_transaction_cancelled_while_it_waits_leaves_nothing_held(database) -> None:
    """A caller's deadline cancels a transaction mid-read: its locks are let go and the pool serves on."""
    waiting = asyncio.Event()

    async def holds_a_lock() -> None:
        async with database.transaction() as transaction:
            await transaction.lock("cancelled")
            await transaction.execute("SELECT 1")
            waiting.set()
            await transaction.fetchone("SELECT pg_sleep(60)")

    task = asyncio.create_task(holds_a_lock())
    await waiting.wait()
    task.cancel()
    # Not held until the statement's minute is over.
    await asyncio.wait({task}, timeout=10)
    assert task.cancelled()
    async with asyncio.timeout(10):
        for _ in range(POOL_SIZE * 2):
            async with database.transaction() as transaction:
                await transaction.lock("cancelled")
                assert await transaction.fetchone("SELECT 2") == (2,)
