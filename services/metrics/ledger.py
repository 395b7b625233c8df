"""The spend ledger: one reservation per render attempt, settled by a commit or a release, or expired.

`LedgerStore` is the interface; `SqliteLedgerStore` the embedded implementation (one file in WAL mode
under the data directory). A PostgreSQL store implements the same interface (and passes the same
contract tests) when the mesh scales out; it takes a row lock or runs serializable where SQLite takes
its write lock.

Semantics every implementation keeps:

- Money is integer micro-USD. A reservation belongs to the calendar day, in the store's time zone, on
  which it was made, and so does its spend when committed later (even after midnight): a day's
  budget is checked and reported on the same reservations.
- `reserve` checks the caps and writes in one transaction: (committed actuals + open reservations +
  the amount) never passes the tenant's or the global cap for the day, however many callers race,
  in one process or many sharing the store. Actuals over their estimate are recorded as they are,
  so spend itself can pass a cap; the next reservations then find nothing left.
- A key is one reservation forever. Repeating `reserve` with the same key, tenant, job and amount
  returns the open reservation without reserving again; different values raise `KeyConflict`; once
  the reservation is settled (committed, released, expired) a repeat raises `WrongState`.
- States: reserved → committed | released | expired; expired → committed (the job finished after
  all: its money was really spent, so the spend is recorded, late) | released. Commit and release
  are idempotent: committing again with the same actual, or releasing a released reservation, changes
  nothing. Committing a released one, releasing a committed one, or committing again with another
  actual raise `WrongState`.
- Expiry frees a stuck reservation's money; it counts among the expired reservations of the day it
  expired on, whatever happens to it later.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from aiprod_metrics.sqlite import SqliteThread

_T = TypeVar("_T")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


class State(StrEnum):
    RESERVED = "reserved"
    COMMITTED = "committed"
    RELEASED = "released"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Reservation:
    key: str
    tenant: str
    job_id: str
    # The estimate reserved, micro-USD.
    amount: int
    state: State
    # What the attempt really cost, micro-USD; None until committed.
    actual: int | None
    created: datetime
    expires: datetime
    # The budget day it draws on, "YYYY-MM-DD" in the store's time zone.
    day: str
    # The day it expired on, if it ever did.
    expired_day: str | None = None

    @property
    def variance_ratio(self) -> float | None:
        """The actual cost over the estimate (1.0: as estimated); None until committed."""
        return None if self.actual is None else self.actual / self.amount


@dataclass(frozen=True)
class Caps:
    """The day's caps a reservation must fit under, micro-USD; 0 means no cap."""

    tenant: int
    everyone: int


@dataclass(frozen=True)
class Totals:
    # Committed actuals of the day.
    spent: int
    # Open reservations of the day.
    reserved: int
    # Reservations that expired that day.
    expired: int


@dataclass(frozen=True)
class DayTotals:
    day: str
    tenant: Totals
    everyone: Totals


class KeyConflict(Exception):
    """The key was already used for a different reservation (tenant, job or amount)."""

    def __init__(self, existing: Reservation) -> None:
        super().__init__(existing.key)
        self.existing = existing


class UnknownKey(Exception):
    """No reservation has that key."""


class WrongState(Exception):
    """The reservation's state does not allow the operation."""

    def __init__(self, reservation: Reservation, operation: str) -> None:
        super().__init__(f"{operation}: reservation {reservation.key} is {reservation.state}")
        self.reservation = reservation
        self.operation = operation


class BudgetExceeded(Exception):
    """The amount does not fit under a cap. `tenant` is None when the global cap refused it."""

    def __init__(self, tenant: str | None, day: str, cap: int, remaining: int, asked: int) -> None:
        super().__init__(f"{tenant or 'global'} {day}: {remaining} of {cap} left, {asked} asked")
        self.tenant = tenant
        self.day = day
        self.cap = cap
        self.remaining = remaining
        self.asked = asked


class LedgerStore(ABC):
    @abstractmethod
    async def reserve(
        self, key: str, tenant: str, job_id: str, amount: int, caps: Caps, ttl: timedelta
    ) -> tuple[Reservation, bool]:
        """Reserves amount for today unless the key is known; returns the reservation and whether it is
        new. Raises BudgetExceeded (nothing written), KeyConflict, or WrongState (settled already)."""

    @abstractmethod
    async def commit(self, key: str, actual: int) -> tuple[Reservation, State]:
        """Records the actual cost; returns the reservation and its state before (COMMITTED: a repeat,
        nothing changed; EXPIRED: a late commit). Raises UnknownKey or WrongState."""

    @abstractmethod
    async def release(self, key: str) -> tuple[Reservation, State]:
        """Frees the reservation unspent; returns it and its state before. Raises UnknownKey or WrongState."""

    @abstractmethod
    async def expire_overdue(self) -> list[Reservation]:
        """Marks the open reservations past their expiry expired; returns them (each once, ever)."""

    @abstractmethod
    async def day_totals(self, tenant: str) -> DayTotals:
        """Today's totals of the tenant and of everyone, read together."""

    @abstractmethod
    async def get(self, key: str) -> Reservation | None: ...

    @abstractmethod
    def today(self) -> str:
        """The current budget day, "YYYY-MM-DD" in the store's time zone."""

    @abstractmethod
    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS reservations (
    key TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    job_id TEXT NOT NULL,
    -- micro-USD
    amount INTEGER NOT NULL CHECK (amount > 0),
    state TEXT NOT NULL CHECK (state IN ('reserved', 'committed', 'released', 'expired')),
    -- micro-USD, set when committed
    actual INTEGER CHECK (actual IS NULL OR actual >= 0),
    -- Unix time in microseconds
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    -- when committed, released or expired (the latest of these)
    settled INTEGER,
    -- budget days, YYYY-MM-DD in the configured time zone
    day TEXT NOT NULL,
    expired_day TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reservations_day ON reservations (day, state, tenant);
CREATE INDEX IF NOT EXISTS reservations_due ON reservations (state, expires);
CREATE INDEX IF NOT EXISTS reservations_expired_day ON reservations (expired_day, tenant);
"""

_COLUMNS = "key, tenant, job_id, amount, state, actual, created, expires, day, expired_day"


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def _moment(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def _scope(day_column: str, day: str, tenant: str | None) -> tuple[str, list[str]]:
    """A WHERE clause for one day, of one tenant or (None) of everyone."""
    if tenant is None:
        return f"{day_column} = ?", [day]
    return f"{day_column} = ? AND tenant = ?", [day, tenant]


def _reservation(row: tuple) -> Reservation:
    key, tenant, job_id, amount, state, actual, created, expires, day, expired_day = row
    created_at, expires_at = _moment(created), _moment(expires)
    return Reservation(
        key, tenant, job_id, amount, State(state), actual, created_at, expires_at, day, expired_day
    )


class SqliteLedgerStore(LedgerStore):
    """SQLite in WAL mode with synchronous=FULL: an acknowledged reservation or commit survives a killed
    process and a crashed machine. Every mutation is one BEGIN IMMEDIATE transaction, which holds the
    database's write lock from its first read: other writers (this process's or another's) wait for it,
    so a check and its write can never interleave with another's. The work runs on one thread of its
    own so that waiting for the lock or the disk never stalls the event loop."""

    def __init__(self, path: Path, time_zone: tzinfo = UTC, clock: Clock = system_clock) -> None:
        self._time_zone = time_zone
        self._clock = clock
        self._sqlite = SqliteThread(path, "ledger", _SCHEMA, synchronous="FULL")
        self._db = self._sqlite.db

    async def _run(self, work: Callable[[], _T]) -> _T:
        return await self._sqlite.run(work)

    def _transaction(self, work: Callable[[], _T], mode: str = "IMMEDIATE") -> _T:
        self._db.execute(f"BEGIN {mode}")
        try:
            result = work()
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return result

    def _day(self, moment: datetime) -> str:
        return moment.astimezone(self._time_zone).date().isoformat()

    def today(self) -> str:
        return self._day(self._clock())

    def _load(self, key: str) -> Reservation | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM reservations WHERE key = ?", (key,)).fetchone()
        return _reservation(row) if row else None

    def _used(self, day: str, tenant: str | None) -> int:
        """Committed actuals plus open reservations of the day, micro-USD."""
        where, parameters = _scope("day", day, tenant)
        row = self._db.execute(
            "SELECT COALESCE(SUM(CASE WHEN state = 'committed' THEN actual ELSE amount END), 0) "
            f"FROM reservations WHERE {where} AND state IN ('committed', 'reserved')",
            parameters,
        ).fetchone()
        return row[0]

    async def reserve(
        self, key: str, tenant: str, job_id: str, amount: int, caps: Caps, ttl: timedelta
    ) -> tuple[Reservation, bool]:
        def work() -> tuple[Reservation, bool]:
            existing = self._load(key)
            if existing is not None:
                if (existing.tenant, existing.job_id, existing.amount) != (tenant, job_id, amount):
                    raise KeyConflict(existing)
                if existing.state != State.RESERVED:
                    raise WrongState(existing, "reserve")
                return existing, False
            now = self._clock()
            day = self._day(now)
            refusals = []
            for cap, scope in ((caps.tenant, tenant), (caps.everyone, None)):
                if cap > 0:
                    used = self._used(day, scope)
                    if used + amount > cap:
                        refusals.append(BudgetExceeded(scope, day, cap, max(cap - used, 0), amount))
            if refusals:
                # The tighter cap: what could still be reserved.
                raise min(refusals, key=lambda refusal: refusal.remaining)
            reservation = Reservation(key, tenant, job_id, amount, State.RESERVED, None, now, now + ttl, day)
            self._db.execute(
                "INSERT INTO reservations (key, tenant, job_id, amount, state, created, expires, day) "
                "VALUES (?, ?, ?, ?, 'reserved', ?, ?, ?)",
                (key, tenant, job_id, amount, _micros(now), _micros(reservation.expires), day),
            )
            return reservation, True

        return await self._run(lambda: self._transaction(work))

    async def commit(self, key: str, actual: int) -> tuple[Reservation, State]:
        def work() -> tuple[Reservation, State]:
            existing = self._load(key)
            if existing is None:
                raise UnknownKey(key)
            if existing.state == State.COMMITTED and existing.actual == actual:
                return existing, State.COMMITTED
            if existing.state not in (State.RESERVED, State.EXPIRED):
                raise WrongState(existing, "commit")
            self._db.execute(
                "UPDATE reservations SET state = 'committed', actual = ?, settled = ? WHERE key = ?",
                (actual, _micros(self._clock()), key),
            )
            return self._load(key), existing.state  # type: ignore[return-value]

        return await self._run(lambda: self._transaction(work))

    async def release(self, key: str) -> tuple[Reservation, State]:
        def work() -> tuple[Reservation, State]:
            existing = self._load(key)
            if existing is None:
                raise UnknownKey(key)
            if existing.state == State.RELEASED:
                return existing, State.RELEASED
            if existing.state == State.COMMITTED:
                raise WrongState(existing, "release")
            self._db.execute(
                "UPDATE reservations SET state = 'released', settled = ? WHERE key = ?",
                (_micros(self._clock()), key),
            )
            return self._load(key), existing.state  # type: ignore[return-value]

        return await self._run(lambda: self._transaction(work))

    async def expire_overdue(self) -> list[Reservation]:
        def work() -> list[Reservation]:
            now = self._clock()
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM reservations WHERE state = 'reserved' AND expires <= ? ORDER BY expires",
                (_micros(now),),
            ).fetchall()
            if not rows:
                return []
            day = self._day(now)
            self._db.executemany(
                "UPDATE reservations SET state = 'expired', settled = ?, expired_day = ? WHERE key = ?",
                [(_micros(now), day, row[0]) for row in rows],
            )
            return [
                _reservation(row)
                for row in self._db.execute(
                    f"SELECT {_COLUMNS} FROM reservations WHERE key IN ({', '.join('?' * len(rows))})",
                    [row[0] for row in rows],
                ).fetchall()
            ]

        return await self._run(lambda: self._transaction(work))

    def _totals(self, day: str, tenant: str | None) -> Totals:
        where, parameters = _scope("day", day, tenant)
        spent, reserved = self._db.execute(
            "SELECT COALESCE(SUM(CASE WHEN state = 'committed' THEN actual END), 0), "
            "COALESCE(SUM(CASE WHEN state = 'reserved' THEN amount END), 0) "
            f"FROM reservations WHERE {where} AND state IN ('committed', 'reserved')",
            parameters,
        ).fetchone()
        where, parameters = _scope("expired_day", day, tenant)
        (expired,) = self._db.execute(
            f"SELECT COUNT(*) FROM reservations WHERE {where}", parameters
        ).fetchone()
        return Totals(spent, reserved, expired)

    async def day_totals(self, tenant: str) -> DayTotals:
        def work() -> DayTotals:
            day = self.today()
            return DayTotals(day, self._totals(day, tenant), self._totals(day, None))

        return await self._run(lambda: self._transaction(work, "DEFERRED"))

    async def get(self, key: str) -> Reservation | None:
        return await self._run(lambda: self._load(key))

    async def close(self) -> None:
        await self._sqlite.close()
