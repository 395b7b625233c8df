"""The PostgreSQL database of `aiprod_kit.database`: one database shared by every replica
(`AIPROD_DATABASE_URL`), loaded only when the URL is set.

Each round trip to the server costs the service's event loop a wait and a wake-up, so a transaction
takes as few as its reads allow: its statements are pipelined (sent without waiting for the ones
before; a read waits for everything sent before it, and the commit for the rest), and a connection
back from a transaction a moment ago is handed out again without the pool's check.
"""

import asyncio
import contextlib
import functools
import re
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager

import psycopg
import structlog
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from aiprod_kit.database import (
    URL_VARIABLE,
    Database,
    DatabaseUnavailable,
    Listener,
    Parameters,
    Transaction,
    _counted,
)
from aiprod_kit.errors import ServiceError
from aiprod_kit.settings import ConfigurationError

log = structlog.get_logger()

# Connections per PostgreSQL store and process. Writers that contend wait on a lock anyway; a few
# connections keep the server's connection budget (max_connections, shared by every replica) for others.
POOL_SIZE = 8
# How long a statement still running when its caller was cancelled is given to be cancelled on the server.
CANCEL_TIMEOUT_SECONDS = 5.0
_BEGIN_READ_ONLY = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"
_OPEN = (psycopg.pq.TransactionStatus.INTRANS, psycopg.pq.TransactionStatus.INERROR)
# A connection idle in the pool for longer than this is checked (a round trip) before it is handed out:
# a failover or an idle timeout may have closed it. One back from a transaction more recently is not:
# under load every transaction paid a round trip for it, a seventh of a create's.
CHECK_IDLE_SECONDS = 1.0


@functools.lru_cache(maxsize=512)
def _placeholders(query: str) -> str:
    """The statement with psycopg's placeholders instead of `?` (no statement holds a literal ? or %)."""
    return query.replace("?", "%s")


@contextlib.contextmanager
def _reachable(where: str, redact: Callable[[str], str]) -> Iterator[None]:
    """A lost connection or an exhausted pool becomes UNAVAILABLE for the caller, not INTERNAL."""
    try:
        yield
    except (psycopg.OperationalError, PoolTimeout) as error:
        log.warning("database unreachable", database=where, reason=redact(_one_line(error)))
        raise DatabaseUnavailable(f"the database is unreachable now ({where}); try again") from None


class StatementRefused(ServiceError):
    """libpq would not send a statement (more than 65,535 parameters, say): the fault of the code that
    built it, which trying again will not mend (INTERNAL, not UNAVAILABLE)."""


@contextlib.contextmanager
def _sendable(connection: psycopg.AsyncConnection) -> Iterator[None]:
    """libpq reports a statement it refuses to send as it reports a lost connection: an OperationalError
    without a SQLSTATE. The connection, still good after a refusal, tells the two apart."""
    try:
        yield
    except psycopg.OperationalError as error:
        if error.sqlstate is None and not connection.broken:
            raise StatementRefused(f"the database client refused a statement: {_one_line(error)}") from error
        raise


class _PostgresTransaction(Transaction):
    def __init__(self, connection: psycopg.AsyncConnection) -> None:
        self._connection = connection

    async def fetchone(self, query: str, parameters: Parameters = ()) -> tuple | None:
        cursor = await self._connection.execute(_placeholders(query), parameters)
        return await cursor.fetchone()

    async def fetchall(self, query: str, parameters: Parameters = ()) -> list[tuple]:
        cursor = await self._connection.execute(_placeholders(query), parameters)
        return await cursor.fetchall()

    async def execute(self, query: str, parameters: Parameters = ()) -> None:
        await self._connection.execute(_placeholders(query), parameters)

    async def executemany(self, query: str, rows: Sequence[Parameters]) -> None:
        async with self._connection.cursor() as cursor:
            await cursor.executemany(_placeholders(query), rows)

    async def lock(self, *names: str) -> None:
        # Always in the same (sorted) order: two transactions asking for the same locks cannot deadlock.
        # A lock is a 64-bit hash of its name: a collision only makes unrelated work wait a little.
        for name in sorted(set(names)):
            await self._connection.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (name,))

    async def notify(self, channel: str, payload: str) -> None:
        await self._connection.execute("SELECT pg_notify(%s, %s)", (channel, payload))


class PostgresDatabase(Database):
    """A pool of connections to one PostgreSQL database, in autocommit mode outside transactions, and
    one more connection that LISTENs, opened with the first listener."""

    dialect = "postgresql"

    def __init__(
        self, pool: AsyncConnectionPool, conninfo: str, where: str, redact: Callable[[str], str]
    ) -> None:
        self._pool = pool
        self._conninfo = conninfo
        self._where = where
        self._redact = redact
        self._listeners: dict[str, list[Listener]] = {}
        self._listening: asyncio.Task[None] | None = None

    async def fetchone(self, query: str, parameters: Parameters = ()) -> tuple | None:
        _counted(self.dialect, "statement")
        with _reachable(self._where, self._redact):
            async with self._pool.connection() as connection:
                with _sendable(connection):
                    cursor = await connection.execute(_placeholders(query), parameters)
                    return await cursor.fetchone()

    async def fetchall(self, query: str, parameters: Parameters = ()) -> list[tuple]:
        _counted(self.dialect, "statement")
        with _reachable(self._where, self._redact):
            async with self._pool.connection() as connection:
                with _sendable(connection):
                    cursor = await connection.execute(_placeholders(query), parameters)
                    return await cursor.fetchall()

    @asynccontextmanager
    async def transaction(self, read_only: bool = False) -> AsyncIterator[Transaction]:
        _counted(self.dialect, "transaction")
        with _reachable(self._where, self._redact):
            async with self._pool.connection() as connection:
                # Pipelined, a statement's error may only come at a later read or at the commit.
                with _sendable(connection):
                    try:
                        # BEGIN and COMMIT in the pipeline too: psycopg's transaction() waits for each.
                        async with connection.pipeline():
                            await connection.execute(_BEGIN_READ_ONLY if read_only else "BEGIN")
                            try:
                                yield _PostgresTransaction(connection)
                            except asyncio.CancelledError:
                                # The pipeline's end waits for every statement sent: one still running
                                # would hold a cancelled caller until it finished.
                                await _cancel_running(connection)
                                raise
                            await connection.execute("COMMIT")
                    except BaseException:
                        # A statement refused, an error of the caller's, a cancellation: what the
                        # transaction did is undone (a connection lost or still busy, the pool drops).
                        if connection.info.transaction_status in _OPEN:
                            await connection.execute("ROLLBACK")
                        raise

    async def create_schema(self, schemas: Mapping[str, str]) -> None:
        async with self.transaction() as transaction:
            # Replicas starting together: CREATE ... IF NOT EXISTS is not safe against a concurrent twin.
            await transaction.lock("aiprod.schema")
            for statement in filter(str.strip, schemas[self.dialect].split(";")):
                await transaction.execute(statement)

    async def listen(self, channel: str, listener: Listener) -> None:
        self._listeners.setdefault(channel, []).append(listener)
        if self._listening is not None:  # LISTEN again, with the new channel
            self._listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listening
        ready = asyncio.Event()
        self._listening = asyncio.create_task(self._listen(ready))
        # Listening before the first caller waits for news; if it takes too long, waiters poll meanwhile.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready.wait(), 10)

    async def _listen(self, ready: asyncio.Event) -> None:
        """Forever: one connection LISTENing to every channel, dispatching notifications; reconnects."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True
                ) as connection:
                    for channel in self._listeners:
                        await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    ready.set()
                    # Whatever was announced while nobody listened: let every listener look again.
                    self._tell_everyone()
                    async for notification in connection.notifies():
                        for listener in self._listeners.get(notification.channel, ()):
                            listener(notification.payload)
            except psycopg.Error as error:
                log.warning(
                    "database listener lost; reconnecting",
                    database=self._where,
                    reason=self._redact(_one_line(error)),
                )
            await asyncio.sleep(1.0)

    def _tell_everyone(self) -> None:
        for listeners in self._listeners.values():
            for listener in listeners:
                listener(None)

    async def close(self) -> None:
        if self._listening is not None:
            self._listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listening
        await self._pool.close()


async def _cancel_running(connection: psycopg.AsyncConnection) -> None:
    with contextlib.suppress(psycopg.Error):
        await connection.cancel_safe(timeout=CANCEL_TIMEOUT_SECONDS)


class _Freshness:
    """The pool's check and reset: when each connection came back to the pool, and a check of an
    idle one only (`CHECK_IDLE_SECONDS`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._returned: weakref.WeakKeyDictionary[psycopg.AsyncConnection, float] = (
            weakref.WeakKeyDictionary()
        )

    async def returned(self, connection: psycopg.AsyncConnection) -> None:
        self._returned[connection] = self._clock()

    async def check(self, connection: psycopg.AsyncConnection) -> None:
        returned = self._returned.get(connection)
        if returned is None or self._clock() - returned > CHECK_IDLE_SECONDS:
            await AsyncConnectionPool.check_connection(connection)


def _one_line(error: BaseException) -> str:
    return re.sub(r"\s+", " ", str(error)).strip()


def _redactor(password: str | None) -> Callable[[str], str]:
    """Belt and braces: libpq's messages do not quote the password, but nothing with it gets out."""
    if not password:
        return lambda text: text
    return lambda text: text.replace(password, "***")


def describe(parameters: Mapping[str, str]) -> str:
    """host:port/database, for logs and errors: never the user's password."""
    host = parameters.get("host") or parameters.get("hostaddr") or "localhost"
    return (
        f"{host}:{parameters.get('port') or 5432}/{parameters.get('dbname') or parameters.get('user') or ''}"
    )


# libpq's words for a server that answered no: waiting will not change the answer.
_REFUSALS = ("authentication failed", "does not exist", "pg_hba.conf", "invalid", "not permitted")


async def connect_postgres(url: str, name: str, connect_timeout: float) -> PostgresDatabase:
    """Opens a pool on the URL's database. A server that is not up yet (a pod starting with its
    database, or its Cloud SQL proxy) is waited for up to connect_timeout seconds; a bad URL, a
    refused login or a missing database stop the service at once. Either way ConfigurationError
    names AIPROD_DATABASE_URL and where it points, never its password."""
    try:
        parameters = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        # from None: libpq's message may quote the URL, password and all.
        raise ConfigurationError(
            f"{URL_VARIABLE}: not a PostgreSQL connection URL (postgresql://USER:PASSWORD@HOST:5432/DATABASE)"
        ) from None
    where = describe(parameters)
    redact = _redactor(parameters.get("password"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(connect_timeout, 0)
    delay = 0.5
    while True:
        remaining = deadline - loop.time()
        try:
            # libpq counts whole seconds, 2 at least.
            probe = await psycopg.AsyncConnection.connect(url, connect_timeout=max(2, int(remaining)))
            await probe.close()
            break
        except psycopg.OperationalError as error:
            reason = redact(_one_line(error))
            if any(word in reason for word in _REFUSALS) or remaining <= 0:
                raise ConfigurationError(
                    f"{URL_VARIABLE}: cannot connect to PostgreSQL at {where}: {reason}"
                ) from None
            log.warning("database not reachable yet; waiting", database=where, reason=reason)
            # The last try at the deadline itself.
            await asyncio.sleep(min(delay, max(deadline - loop.time(), 0)))
            delay = min(delay * 2, 5.0)
    freshness = _Freshness()
    pool = AsyncConnectionPool(
        url,
        min_size=1,
        max_size=POOL_SIZE,
        open=False,
        name=f"aiprod-{name}",
        kwargs={"autocommit": True, "fallback_application_name": f"aiprod-{name}"},
        # A connection the server dropped (a failover, an idle timeout) is replaced, not handed out.
        check=freshness.check,
        reset=freshness.returned,
    )
    try:
        await pool.open(wait=True, timeout=max(deadline - loop.time(), 5.0))
    except PoolTimeout:
        await pool.close()
        raise ConfigurationError(f"{URL_VARIABLE}: PostgreSQL at {where} accepts no connections") from None
    log.info("database connected", database=where, store=name)
    return PostgresDatabase(pool, url, where, redact)
