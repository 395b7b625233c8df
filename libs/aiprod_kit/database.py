"""The SQL databases the stores run on: SQLite files (the embedded default) or one PostgreSQL database
shared by every replica (`AIPROD_DATABASE_URL`).

A store writes each statement once, in SQL both dialects speak, with `?` placeholders, and runs it
through a `Database`. Only what must differ lives here and, for PostgreSQL, in `aiprod_kit.postgres`
(imported only when a URL is set):

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
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import ClassVar, TypeVar

import structlog
from opentelemetry import metrics

from aiprod_kit.errors import ErrorReason, Unavailable
from aiprod_kit.settings import CommonSettings
from aiprod_kit.telemetry import Tally

log = structlog.get_logger()

_T = TypeVar("_T")
URL_VARIABLE = "AIPROD_DATABASE_URL"
Parameters = Sequence[object]
# Called with a notification's payload; None means "anything may have changed" (after a reconnect).
Listener = Callable[[str | None], None]


# Counted as a tally: a transaction is the hottest path of every service.
_transactions = Tally(
    metrics.get_meter("aiprod.store"),
    "aiprod.store.transactions",
    unit="{transaction}",
    description="Transactions, and statements run alone, on the service's databases",
)


def _counted(dialect: str, kind: str) -> None:
    """One transaction ("transaction") or one statement outside any ("statement")."""
    _transactions.add(1, {"db.system.name": dialect, "kind": kind})


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


# Values named in one statement's IN list at most: a statement takes at most 65,535 parameters on
# PostgreSQL (32,766 in SQLite's default build), and a replica may hold tens of thousands of claims.
IN_LIST_SIZE = 1000


def in_batches(values: Sequence[_T]) -> Iterator[Sequence[_T]]:
    """values, IN_LIST_SIZE at a time, for statements that name each in a list of parameters."""
    for start in range(0, len(values), IN_LIST_SIZE):
        yield values[start : start + IN_LIST_SIZE]


_TRIGGER_EXISTS = {
    "sqlite": "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ? AND name = ?",
    "postgresql": "SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(?) AND tgname = ?",
}


async def has_trigger(queries: Queries, dialect: str, table: str, name: str) -> bool:
    """Whether the table has the trigger: sums a store keeps by triggers are summed once without them."""
    return await queries.fetchone(_TRIGGER_EXISTS[dialect], (table, name)) is not None


_COLUMN_EXISTS = {
    "sqlite": "SELECT 1 FROM pragma_table_info(?) WHERE name = ?",
    "postgresql": "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(?) AND attname = ? AND NOT attisdropped",
}


async def has_column(queries: Queries, dialect: str, table: str, name: str) -> bool:
    """Whether the table exists with the column: a column added to a store that has rows may need them
    filled once."""
    return await queries.fetchone(_COLUMN_EXISTS[dialect], (table, name)) is not None


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
    (the GIL handed back and forth under load) halved the gateway's CreateRenderJob rate; its
    checkpoints, which wait for the disk, still run on the thread (SqliteDatabase._checkpoint)."""

    def __init__(self, path: Path, name: str, synchronous: str | None = None, private: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # Other processes sharing the file: wait for their write lock rather than fail.
        self.db.execute("PRAGMA busy_timeout = 30000")
        self.db.execute("PRAGMA journal_mode = WAL")
        if synchronous:
            self.db.execute(f"PRAGMA synchronous = {synchronous}")
        self.private = private
        if private:
            # Checkpoints are the database's (SqliteDatabase._checkpoint), run off the event loop.
            self.db.execute("PRAGMA wal_autocheckpoint = 0")
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._closed = False

    async def run(self, work: Callable[[], _T]) -> _T:
        if self.private:
            return work()
        return await self.run_off_loop(work)

    async def run_off_loop(self, work: Callable[[], _T]) -> _T:
        """Runs work on the connection's thread, also for a private file (work that waits for the disk)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, work)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.run(self.db.close)
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

    # A private file's log is checkpointed after this many commits (SQLite's own default: 1000 pages, about
    # 50 of the gateway's creates).
    CHECKPOINT_EVERY_COMMITS = 100

    def __init__(self, path: Path, name: str, synchronous: str | None = None, private: bool = False) -> None:
        self._sqlite = _SqliteThread(path, name, synchronous, private)
        self._alone = asyncio.Lock()
        self._listeners: dict[str, list[Listener]] = {}
        self._commits_unchecked = 0
        self._checkpoint_task: asyncio.Task | None = None

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
                if self._sqlite.private:
                    self._committed()
            except BaseException:
                # Also when cancelled while a statement ran on: the thread runs this after it, in order,
                # so the connection is never left inside a transaction.
                await self._sqlite.run(lambda: db.in_transaction and db.execute("ROLLBACK"))
                raise
        for channel, payload in transaction.notifications:
            for listener in self._listeners.get(channel, ()):
                listener(payload)

    def _committed(self) -> None:
        self._commits_unchecked += 1
        running = self._checkpoint_task is not None and not self._checkpoint_task.done()
        if self._commits_unchecked >= self.CHECKPOINT_EVERY_COMMITS and not running:
            self._commits_unchecked = 0
            self._checkpoint_task = asyncio.get_running_loop().create_task(self._checkpoint())

    async def _checkpoint(self) -> None:
        """Writes the log's pages into the file, on the connection's thread: SQLite's automatic checkpoint,
        run by the commit that fills the log, held a private file's event loop 8 to 12 ms each time (an
        fsync of the log and one of the file), a third of the gateway's commit time under load. The
        database is held meanwhile, so the whole log is checkpointed and the next write starts it over,
        while the event loop goes on with everything else."""
        db = self._sqlite.db
        async with self._alone:
            try:
                await self._sqlite.run_off_loop(
                    lambda: db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                )
            except sqlite3.Error as error:
                # The log keeps its pages: the next checkpoint writes them.
                log.warning("checkpoint failed", error=str(error))

    async def create_schema(self, schemas: Mapping[str, str]) -> None:
        async with self._alone:
            await self._sqlite.run(lambda: self._sqlite.db.executescript(schemas[self.dialect]))

    async def listen(self, channel: str, listener: Listener) -> None:
        self._listeners.setdefault(channel, []).append(listener)

    async def close(self) -> None:
        if self._checkpoint_task is not None:
            await self._checkpoint_task
        await self._sqlite.close()


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
        # Imported here: psycopg and its pool (12 MB a process) only where a URL asks for them.
        from aiprod_kit.postgres import connect_postgres

        return await connect_postgres(url, name, settings.database_connect_timeout_seconds)
    return SqliteDatabase(sqlite_path, name, synchronous, private)
