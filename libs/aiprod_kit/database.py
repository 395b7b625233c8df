"""The SQL databases the stores run on: SQLite files (the embedded default) or one PostgreSQL database
shared by every replica (`AIPROD_DATABASE_URL`).

A store writes each statement once, in SQL both dialects speak, with `?` placeholders, and runs it
through a `Database`. Only what must differ lives here:

- How a transaction keeps concurrent writers out. SQLite: the database's write lock, taken at
  BEGIN IMMEDIATE, so every transaction is alone. PostgreSQL (READ COMMITTED): the named locks a
  transaction asks for (`Transaction.lock`, transaction-scoped advisory locks), so that only
  transactions touching the same thing (a job, a budget day) wait for each other, across replicas.
- How a commit is announced (`Transaction.notify`, `Database.listen`): to this process's listeners
  for SQLite; through NOTIFY to every process listening on the database for PostgreSQL.

The URL holds a password: it is never logged nor put in an error; messages name the host and database.
Every transaction, and every statement run alone, is counted (`aiprod.store.transactions`): what a
job costs the stores.
"""

import asyncio
import contextlib
import functools
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import ClassVar, TypeVar

import psycopg
import structlog
from opentelemetry import metrics
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from aiprod_kit.errors import ErrorReason, Unavailable
from aiprod_kit.settings import CommonSettings, ConfigurationError

log = structlog.get_logger()

_T = TypeVar("_T")
URL_VARIABLE = "AIPROD_DATABASE_URL"
# Connections per PostgreSQL store and process. Writers that contend wait on a lock anyway; a few
# connections keep the server's connection budget (max_connections, shared by every replica) for others.
POOL_SIZE = 8
Parameters = Sequence[object]
# Called with a notification's payload; None means "anything may have changed" (after a reconnect).
Listener = Callable[[str | None], None]


@functools.cache
def _transactions() -> metrics.Counter:
    return metrics.get_meter("aiprod.store").create_counter(
        "aiprod.store.transactions",
        unit="{transaction}",
        description="Transactions, and statements run alone, on the service's databases",
    )


def _counted(dialect: str, kind: str) -> None:
    """One transaction ("transaction") or one statement outside any ("statement")."""
    _transactions().add(1, {"db.system.name": dialect, "kind": kind})


class DatabaseUnavailable(Unavailable):
    """The database cannot be reached now: callers get UNAVAILABLE and may try again."""

    reason = ErrorReason.DATABASE_UNAVAILABLE


class Queries(ABC):
    @abstractmethod
    async def fetchone(self, query: str, parameters: Parameters = ()) -> tuple | None: ...

    @abstractmethod
    async def fetchall(self, query: str, parameters: Parameters = ()) -> list[tuple]: ...


class Transaction(Queries):
    @abstractmethod
    async def execute(self, query: str, parameters: Parameters = ()) -> None: ...

    @abstractmethod
    async def executemany(self, query: str, rows: Sequence[Parameters]) -> None: ...

    @abstractmethod
    async def lock(self, *names: str) -> None:
        """Holds these named locks until the transaction ends: whoever asks for one of them waits.
        Ask before reading what the lock guards, and for all of a transaction's locks at once."""

    @abstractmethod
    async def notify(self, channel: str, payload: str) -> None:
        """Tells the channel's listeners, once the transaction commits."""


class Database(Queries):
    """fetchone and fetchall outside a transaction: one statement, reading what is committed."""

    dialect: ClassVar[str]

    @abstractmethod
    def transaction(self, read_only: bool = False) -> AbstractAsyncContextManager[Transaction]:
        """Committed when the block ends, rolled back if it raises. read_only: one snapshot for every
        read, no lock taken."""

    @abstractmethod
    async def create_schema(self, schemas: Mapping[str, str]) -> None:
        """Runs the DDL for this database's dialect (schemas: dialect -> script of IF NOT EXISTS)."""

    @abstractmethod
    async def listen(self, channel: str, listener: Listener) -> None:
        """Calls listener with the payload of every notification on the channel (and with None when
        some may have been missed: after the listening connection was lost)."""

    @abstractmethod
    async def close(self) -> None: ...


# SQLite --------------------------------------------------------------------------------------------


class _SqliteThread:
    """A WAL database used from one thread of its own, so that waiting for the disk or for another
    process's write lock never stalls the event loop; or, for a file no other process opens, from the
    event loop itself: each statement is then a fraction of a millisecond, and a thread hop per statement
    (the GIL handed back and forth under load) halved the gateway's CreateRenderJob rate."""

    def __init__(self, path: Path, name: str, synchronous: str | None = None, private: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # Other processes sharing the file: wait for their write lock rather than fail.
        self.db.execute("PRAGMA busy_timeout = 30000")
        self.db.execute("PRAGMA journal_mode = WAL")
        if synchronous:
            self.db.execute(f"PRAGMA synchronous = {synchronous}")
        self._thread = None if private else ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._closed = False

    async def run(self, work: Callable[[], _T]) -> _T:
        if self._thread is None:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._thread, work)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.run(self.db.close)
        if self._thread is not None:
            self._thread.shutdown()


class _SqliteTransaction(Transaction):
    def __init__(self, sqlite: _SqliteThread) -> None:
        self._sqlite = sqlite
        self.notifications: list[tuple[str, str]] = []

    async def fetchone(self, query: str, parameters: Parameters = ()) -> tuple | None:
        return await self._sqlite.run(lambda: self._sqlite.db.execute(query, parameters).fetchone())

    async def fetchall(self, query: str, parameters: Parameters = ()) -> list[tuple]:
        return await self._sqlite.run(lambda: self._sqlite.db.execute(query, parameters).fetchall())

    async def execute(self, query: str, parameters: Parameters = ()) -> None:
        await self._sqlite.run(lambda: self._sqlite.db.execute(query, parameters))

    async def executemany(self, query: str, rows: Sequence[Parameters]) -> None:
        await self._sqlite.run(lambda: self._sqlite.db.executemany(query, rows))

    async def lock(self, *names: str) -> None:
        """Nothing to do: BEGIN IMMEDIATE holds the whole database's write lock already."""

    async def notify(self, channel: str, payload: str) -> None:
        self.notifications.append((channel, payload))


class SqliteDatabase(Database):
    """One SQLite file in WAL mode, one connection on a thread of its own. Its statements are
    serialized in the process (one connection cannot hold two transactions) and across processes by
    SQLite's write lock."""

    dialect = "sqlite"

    def __init__(self, path: Path, name: str, synchronous: str | None = None, private: bool = False) -> None:
        self._sqlite = _SqliteThread(path, name, synchronous, private)
        self._alone = asyncio.Lock()
        self._listeners: dict[str, list[Listener]] = {}

    async def fetchone(self, query: str, parameters: Parameters = ()) -> tuple | None:
        _counted(self.dialect, "statement")
        async with self._alone:
            return await self._sqlite.run(lambda: self._sqlite.db.execute(query, parameters).fetchone())

    async def fetchall(self, query: str, parameters: Parameters = ()) -> list[tuple]:
        _counted(self.dialect, "statement")
        async with self._alone:
            return await self._sqlite.run(lambda: self._sqlite.db.execute(query, parameters).fetchall())

    @asynccontextmanager
    async def transaction(self, read_only: bool = False) -> AsyncIterator[Transaction]:
        _counted(self.dialect, "transaction")
        db = self._sqlite.db
        transaction = _SqliteTransaction(self._sqlite)
        async with self._alone:
            try:
                await self._sqlite.run(
                    lambda: db.execute("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")
                )
                yield transaction
                await self._sqlite.run(lambda: db.execute("COMMIT"))
            except BaseException:
                # Also when cancelled while a statement ran on: the thread runs this after it, in order,
                # so the connection is never left inside a transaction.
                await self._sqlite.run(lambda: db.in_transaction and db.execute("ROLLBACK"))
                raise
        for channel, payload in transaction.notifications:
            for listener in self._listeners.get(channel, ()):
                listener(payload)

    async def create_schema(self, schemas: Mapping[str, str]) -> None:
        async with self._alone:
            await self._sqlite.run(lambda: self._sqlite.db.executescript(schemas[self.dialect]))

    async def listen(self, channel: str, listener: Listener) -> None:
        self._listeners.setdefault(channel, []).append(listener)

    async def close(self) -> None:
        await self._sqlite.close()


# PostgreSQL ----------------------------------------------------------------------------------------


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
                cursor = await connection.execute(_placeholders(query), parameters)
                return await cursor.fetchone()

    async def fetchall(self, query: str, parameters: Parameters = ()) -> list[tuple]:
        _counted(self.dialect, "statement")
        with _reachable(self._where, self._redact):
            async with self._pool.connection() as connection:
                cursor = await connection.execute(_placeholders(query), parameters)
                return await cursor.fetchall()

    @asynccontextmanager
    async def transaction(self, read_only: bool = False) -> AsyncIterator[Transaction]:
        _counted(self.dialect, "transaction")
        with _reachable(self._where, self._redact):
            async with self._pool.connection() as connection, connection.transaction():
                if read_only:
                    await connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield _PostgresTransaction(connection)

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
    pool = AsyncConnectionPool(
        url,
        min_size=1,
        max_size=POOL_SIZE,
        open=False,
        name=f"aiprod-{name}",
        kwargs={"autocommit": True, "fallback_application_name": f"aiprod-{name}"},
        # A connection the server dropped (a failover, an idle timeout) is replaced, not handed out.
        check=AsyncConnectionPool.check_connection,
    )
    try:
        await pool.open(wait=True, timeout=max(deadline - loop.time(), 5.0))
    except PoolTimeout:
        await pool.close()
        raise ConfigurationError(f"{URL_VARIABLE}: PostgreSQL at {where} accepts no connections") from None
    log.info("database connected", database=where, store=name)
    return PostgresDatabase(pool, url, where, redact)


async def open_database(
    settings: CommonSettings,
    sqlite_path: Path,
    name: str,
    synchronous: str | None = None,
    private: bool = False,
) -> Database:
    """The database a store runs on: PostgreSQL when AIPROD_DATABASE_URL is set, else the SQLite file at
    sqlite_path (synchronous: its PRAGMA synchronous; private: no other process opens the file)."""
    url = settings.database_url.get_secret_value().strip()
    if url:
        return await connect_postgres(url, name, settings.database_connect_timeout_seconds)
    return SqliteDatabase(sqlite_path, name, synchronous, private)
