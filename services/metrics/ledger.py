"""The spend ledger: one reservation per render attempt, settled by a commit or a release, or expired.

`LedgerStore` is the interface; `SqlLedgerStore` implements it once on either database
(`aiprod_kit.database`): one SQLite file in WAL mode under the data directory, or PostgreSQL shared by
every metrics replica. Every mutation is one transaction that first takes the lock of the budget day
it touches (SQLite: the database's write lock, which covers every day), so a day's caps are checked
and written by one transaction at a time, in one process or many. Each day's money by tenant (committed,
reserved, uncertain) is kept by the database's own triggers in the transaction that changes a
reservation, so that a cap's check reads a row per tenant, not every reservation of the day.

Semantics every implementation keeps:

- Money is integer micro-USD. A reservation belongs to the calendar day, in the store's time zone, on
  which it was made, and so does its spend when committed later (even after midnight): a day's
  budget is checked and reported on the same reservations.
- `reserve` checks the caps and writes in one transaction: (committed actuals + open reservations +
  expired reservations + the amount) never passes the tenant's or the global cap for the day, however
  many callers race, in one process or many sharing the store. Actuals over their estimate are
  recorded as they are, so spend itself can pass a cap; the next reservations then find nothing left.
- A key is one attempt forever, and a reservation records the backend the attempt was reserved for.
  Repeating `reserve` with the same key, tenant and job returns the reservation as it was made (its
  amount and backend, whatever amount or backend is asked now) without reserving again, while it is
  open or expired: a caller that restarted mid-attempt keeps the attempt at the backend it reserved
  for, so one key never reaches two backends. Another tenant or job raises `KeyConflict`; once the
  reservation is committed or released a repeat raises `WrongState` (a new attempt takes a new key).
- States: reserved → committed | released | expired; expired → committed (the attempt was billed:
  the actual replaces the worst case, late) | released (it is known not to have billed). Commit and
  release are idempotent: committing again with the same actual, or releasing a released
  reservation, changes nothing. Committing a released one, releasing a committed one, or committing
  again with another actual raise `WrongState`.
- Expiry frees nothing: an attempt nobody settled may well have been billed, so an expired
  reservation counts as spent at its full amount (its worst case), in the caps and in the day's
  spent, until a late commit or release reconciles it; until then that money is also the day's
  uncertain money. It counts among the expired reservations of the day it expired on, whatever
  happens to it later.
- Tenants' own caps: a tenant may have a daily cap of its own, kept in the ledger (`set_tenant_cap`;
  0: no cap of its own, only everyone's), which `reserve` reads in its transaction instead of the
  default it is given (`Caps.tenant`); `clear_tenant_cap` gives the tenant the default again.
- Spend over days (`spend`) sums what a day's budget counts, for each day of a range: committed
  actuals and expired reservations at their full amount as spent, open reservations as reserved.
- Retention (`purge`): a committed or released reservation is deleted once it settled longer ago than
  the ledger's retention (AIPROD_LEDGER_RETENTION_SECONDS); open and expired ones never are. Each
  day's money (day_money: budgets, spend over days) is kept forever, unchanged by a purge. A purged
  key is unknown again: a late commit or release of it is UnknownKey, a reserve reserves anew (a
  caller settles an attempt well within the retention, and never reserves a settled key again).
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum

from aiprod_kit.database import Database, Queries, Transaction, has_trigger, in_batches

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
    # The backend the attempt was reserved for (an aiprod.common.v1.Backend value; 0: not named).
    backend: int = 0

    @property
    def variance_ratio(self) -> float | None:
        """The actual cost over the estimate (1.0: as estimated); None until committed."""
        return None if self.actual is None else self.actual / self.amount


@dataclass(frozen=True)
class Caps:
    """The day's caps a reservation must fit under, micro-USD; 0 means no cap. `tenant` is the default
    tenant cap: a tenant with a cap of its own in the ledger has that one instead."""

    tenant: int
    everyone: int


@dataclass(frozen=True)
class Totals:
    # Committed actuals of the day, plus expired reservations at their full amount.
    spent: int
    # Open reservations of the day.
    reserved: int
    # Reservations that expired that day (a count).
    expired: int
    # The day's expired, unreconciled reservations' amounts: the part of spent that is a worst case.
    uncertain: int = 0


@dataclass(frozen=True)
class DayTotals:
    day: str
    tenant: Totals
    everyone: Totals
    # The tenant's own daily cap, micro-USD (0: none of its own, only everyone's); None when it has
    # none recorded (the default tenant cap applies).
    tenant_cap: int | None = None


@dataclass(frozen=True)
class Spend:
    """A tenant's money over a range of days, micro-USD."""

    # Committed actuals, plus expired reservations at their full amount (uncertain money included).
    spent: int
    # Open reservations.
    reserved: int


class KeyConflict(Exception):
    """The key was already used for a reservation of another tenant or job."""

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
        self, key: str, tenant: str, job_id: str, amount: int, caps: Caps, ttl: timedelta, backend: int = 0
    ) -> tuple[Reservation, bool]:
        """Reserves amount for today, for an attempt at backend, unless the key is known; returns the
        reservation (a known one as it was made: open or expired) and whether it is new. Raises
        BudgetExceeded (nothing written), KeyConflict, or WrongState (committed or released already)."""

    @abstractmethod
    async def commit(self, key: str, actual: int) -> tuple[Reservation, State]:
        """Records the actual cost; returns the reservation and its state before (COMMITTED: a repeat,
        nothing changed; EXPIRED: a late commit). Raises UnknownKey or WrongState."""

    @abstractmethod
    async def release(self, key: str) -> tuple[Reservation, State]:
        """Frees the reservation unspent; returns it and its state before. Raises UnknownKey or WrongState."""

    @abstractmethod
    async def expire_overdue(self) -> list[Reservation]:
        """Marks the open reservations past their expiry expired (still counted, as spent at their full
        amount); returns them (each once, ever)."""

    @abstractmethod
    async def day_totals(self, tenant: str) -> DayTotals:
        """Today's totals of the tenant and of everyone, and the tenant's own cap, read together."""

    @abstractmethod
    async def set_tenant_cap(self, tenant: str, cap: int) -> None:
        """Records the tenant's own daily cap, micro-USD (0: no cap of its own, only everyone's); from
        the next reservation on, it replaces the default tenant cap for that tenant."""

    @abstractmethod
    async def clear_tenant_cap(self, tenant: str) -> None:
        """Forgets the tenant's own cap: the default tenant cap applies to it again."""

    @abstractmethod
    async def tenant_cap(self, tenant: str) -> int | None:
        """The tenant's own daily cap; None when it has none recorded."""

    @abstractmethod
    async def spend(self, tenant: str, first_day: str, last_day: str) -> Spend:
        """The tenant's spend and open reservations of the days first_day..last_day ("YYYY-MM-DD",
        both included), as each day's budget counts them."""

    @abstractmethod
    async def get(self, key: str) -> Reservation | None: ...

    @abstractmethod
    async def purge(self, before: float, limit: int) -> int:
        """Deletes up to limit reservations committed or released before `before` (Unix seconds); how
        many. One short transaction: `aiprod_kit.retention.Retention` calls it batch by batch. Each day's
        money stays as it was: only the reservations are forgotten."""

    @abstractmethod
    def today(self) -> str:
        """The current budget day, "YYYY-MM-DD" in the store's time zone."""

    @abstractmethod
    async def close(self) -> None: ...


_SCHEMAS = {
    "sqlite": """
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
    expired_day TEXT,
    -- the aiprod.common.v1.Backend value the attempt was reserved for (0: not named)
    backend INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reservations_day ON reservations (day, state, tenant);
CREATE INDEX IF NOT EXISTS reservations_due ON reservations (state, expires);
CREATE INDEX IF NOT EXISTS reservations_expired_day ON reservations (expired_day, tenant);
CREATE INDEX IF NOT EXISTS reservations_tenant_day ON reservations (tenant, day);
-- The settled reservations by when they settled: the purge reads only the ones it deletes (with their
-- keys: a secondary index ends with the primary key). On (settled) alone, SQLite without statistics
-- took reservations_due (state) and read every settled reservation.
CREATE INDEX IF NOT EXISTS reservations_settled ON reservations (state, settled)
    WHERE state IN ('committed', 'released');
-- Tenants' own daily caps; a tenant without a row has the configured default.
CREATE TABLE IF NOT EXISTS tenant_caps (
    tenant TEXT PRIMARY KEY,
    -- micro-USD; 0: no cap of its own (only everyone's)
    cap INTEGER NOT NULL CHECK (cap >= 0),
    -- Unix time in microseconds
    updated INTEGER NOT NULL
) WITHOUT ROWID;
-- Each day's money by tenant, micro-USD, as its reservations count it: kept by the database
-- (_DAY_MONEY_TRIGGERS) in the transaction that writes a reservation, whichever code writes it.
CREATE TABLE IF NOT EXISTS day_money (
    day TEXT NOT NULL,
    tenant TEXT NOT NULL,
    -- committed actuals; open reservations; expired, unreconciled reservations (their worst case)
    committed INTEGER NOT NULL,
    reserved INTEGER NOT NULL,
    uncertain INTEGER NOT NULL,
    PRIMARY KEY (day, tenant)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS day_money_tenant ON day_money (tenant, day);
""",
    # The same tables; 64-bit integers are BIGINT there.
    "postgresql": """
CREATE TABLE IF NOT EXISTS reservations (
    key TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    job_id TEXT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount > 0),
    state TEXT NOT NULL CHECK (state IN ('reserved', 'committed', 'released', 'expired')),
    actual BIGINT CHECK (actual IS NULL OR actual >= 0),
    created BIGINT NOT NULL,
    expires BIGINT NOT NULL,
    settled BIGINT,
    day TEXT NOT NULL,
    expired_day TEXT,
    backend INTEGER NOT NULL DEFAULT 0
);
ALTER TABLE reservations ADD COLUMN IF NOT EXISTS backend INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS reservations_day ON reservations (day, state, tenant);
CREATE INDEX IF NOT EXISTS reservations_due ON reservations (state, expires);
CREATE INDEX IF NOT EXISTS reservations_expired_day ON reservations (expired_day, tenant);
CREATE INDEX IF NOT EXISTS reservations_tenant_day ON reservations (tenant, day);
-- The purge's keys read from the index alone: on (state, settled), PostgreSQL read the table instead.
CREATE INDEX IF NOT EXISTS reservations_settled ON reservations (settled) INCLUDE (key)
    WHERE state IN ('committed', 'released');
CREATE TABLE IF NOT EXISTS tenant_caps (
    tenant TEXT PRIMARY KEY,
    cap BIGINT NOT NULL CHECK (cap >= 0),
    updated BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS day_money (
    day TEXT NOT NULL,
    tenant TEXT NOT NULL,
    committed BIGINT NOT NULL,
    reserved BIGINT NOT NULL,
    uncertain BIGINT NOT NULL,
    PRIMARY KEY (day, tenant)
);
CREATE INDEX IF NOT EXISTS day_money_tenant ON day_money (tenant, day);
""",
}

# What a reservation adds to its day's money in each state (released: nothing), and the statement that
# adds a row's share (sign 1) or takes it back (sign -1).
_SHARES = (
    "CASE {row}.state WHEN 'committed' THEN {row}.actual ELSE 0 END",
    "CASE {row}.state WHEN 'reserved' THEN {row}.amount ELSE 0 END",
    "CASE {row}.state WHEN 'expired' THEN {row}.amount ELSE 0 END",
)


def _add_share(row: str, sign: str = "") -> str:
    committed, reserved, uncertain = (f"{sign}({share.format(row=row)})" for share in _SHARES)
    return (
        "INSERT INTO day_money (day, tenant, committed, reserved, uncertain) "
        f"VALUES ({row}.day, {row}.tenant, {committed}, {reserved}, {uncertain}) "
        "ON CONFLICT (day, tenant) DO UPDATE SET committed = day_money.committed + excluded.committed, "
        "reserved = day_money.reserved + excluded.reserved, uncertain = day_money.uncertain + excluded.uncertain"
    )


# A day's caps are checked against its money at every reservation: summed over the day's reservations,
# that grew with the day (10 ms a reservation, under the day's lock, once a day had 10,000) and the
# ledger's reservations a second with it. The database keeps the sums instead, with triggers, so that
# a replica of the version before, during a rolling update, keeps them too.
_DAY_MONEY_TRIGGER = "reservations_day_money"
_DAY_MONEY_TRIGGERS = {
    "sqlite": [
        f"CREATE TRIGGER {_DAY_MONEY_TRIGGER}_insert AFTER INSERT ON reservations "
        f"BEGIN {_add_share('NEW')}; END",
        f"CREATE TRIGGER {_DAY_MONEY_TRIGGER}_update AFTER UPDATE ON reservations "
        f"BEGIN {_add_share('OLD', '-')}; {_add_share('NEW')}; END",
    ],
    "postgresql": [
        f"CREATE OR REPLACE FUNCTION {_DAY_MONEY_TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF TG_OP = 'UPDATE' THEN {_add_share('OLD', '-')}; END IF; {_add_share('NEW')}; RETURN NULL; END $$",
        f"CREATE TRIGGER {_DAY_MONEY_TRIGGER} AFTER INSERT OR UPDATE ON reservations "
        f"FOR EACH ROW EXECUTE FUNCTION {_DAY_MONEY_TRIGGER}()",
    ],
}
# The trigger whose presence says the sums are kept.
_DAY_MONEY_KEPT_BY = {"sqlite": f"{_DAY_MONEY_TRIGGER}_insert", "postgresql": _DAY_MONEY_TRIGGER}
# A ledger from before the triggers: its days' money, summed once. (Never again on a ledger that has
# them: a purge deleted the reservations of days whose money only day_money still holds.)
_DAY_MONEY_FROM_RESERVATIONS = (
    "INSERT INTO day_money (day, tenant, committed, reserved, uncertain) "
    "SELECT day, tenant, COALESCE(SUM(CASE WHEN state = 'committed' THEN actual END), 0), "
    "COALESCE(SUM(CASE WHEN state = 'reserved' THEN amount END), 0), "
    "COALESCE(SUM(CASE WHEN state = 'expired' THEN amount END), 0) "
    "FROM reservations GROUP BY day, tenant"
)
# Columns added to reservations after its first version, which an older SQLite ledger gets on opening
# (PostgreSQL's script adds them itself, SQLite has no ADD COLUMN IF NOT EXISTS).
_SQLITE_ADDED_COLUMNS = {"backend": "INTEGER NOT NULL DEFAULT 0"}

_COLUMNS = "key, tenant, job_id, amount, state, actual, created, expires, day, expired_day, backend"
_COLUMNS_OF_RESERVATION = ", ".join(f"reservations.{column}" for column in _COLUMNS.split(", "))
# A tenant's own daily cap (no row: none of its own).
_TENANT_CAP = "SELECT cap FROM tenant_caps WHERE tenant = ?"
# What a day holds (committed actuals, open and expired reservations at their worst), micro-USD.
_DAY_USED = "COALESCE(SUM(committed + reserved + uncertain), 0) FROM day_money"
# A day's totals, the tenant's (its committed, reserved, uncertain money and expired count) then
# everyone's, then the tenant's own cap. The expired are counted from the reservations: one that
# expired and was reconciled is forgotten with them by the purge, so a ledger retention under a day
# (the default is 400) may count fewer of today's.
_DAY_TOTALS = (
    "SELECT COALESCE(SUM(CASE WHEN tenant = ? THEN committed END), 0),"
    " COALESCE(SUM(CASE WHEN tenant = ? THEN reserved END), 0),"
    " COALESCE(SUM(CASE WHEN tenant = ? THEN uncertain END), 0),"
    " (SELECT COUNT(*) FROM reservations WHERE expired_day = ? AND tenant = ?),"
    " COALESCE(SUM(committed), 0), COALESCE(SUM(reserved), 0), COALESCE(SUM(uncertain), 0),"
    " (SELECT COUNT(*) FROM reservations WHERE expired_day = ?),"
    f" ({_TENANT_CAP})"
    " FROM day_money WHERE day = ?"
)


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def _moment(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def _day_totals(committed: int, reserved: int, uncertain: int, expired: int) -> Totals:
    # Uncertain money is spent at its worst case until reconciled.
    return Totals(committed + uncertain, reserved, expired, uncertain)


def _reservation(row: tuple) -> Reservation:
    key, tenant, job_id, amount, state, actual, created, expires, day, expired_day, backend = row
    created_at, expires_at = _moment(created), _moment(expires)
    return Reservation(
        key, tenant, job_id, amount, State(state), actual, created_at, expires_at, day, expired_day, backend
    )


def _day_lock(day: str) -> str:
    return f"ledger-day:{day}"


class SqlLedgerStore(LedgerStore):
    """The ledger on a `Database`. A transaction that changes a day's money holds that day's lock:
    reserve the day it reserves on (and the key, so that twins racing over midnight cannot both
    insert it), commit and release the reservation's day, expiry every day it expires on. What it
    reads after taking the lock is what every earlier transaction committed.

    SQLite runs with synchronous=FULL: an acknowledged reservation or commit survives a killed process
    and a crashed machine; so does PostgreSQL with its default synchronous_commit."""

    def __init__(self, database: Database, time_zone: tzinfo = UTC, clock: Clock = system_clock) -> None:
        self._db = database
        self._time_zone = time_zone
        self._clock = clock

    @classmethod
    async def open(
        cls, database: Database, time_zone: tzinfo = UTC, clock: Clock = system_clock
    ) -> "SqlLedgerStore":
        """Creates the tables if needed, adds the columns an older SQLite ledger lacks, and the
        triggers that keep each day's money (summed once from the reservations of a ledger without them)."""
        await database.create_schema(_SCHEMAS)
        # Under the write lock (SQLite) or the lock below: another process may be opening it too.
        async with database.transaction() as transaction:
            await transaction.lock("ledger-schema")
            if database.dialect == "sqlite":
                rows = await transaction.fetchall("PRAGMA table_info(reservations)")
                columns = {row[1] for row in rows}
                for column, definition in _SQLITE_ADDED_COLUMNS.items():
                    if column not in columns:
                        await transaction.execute(
                            f"ALTER TABLE reservations ADD COLUMN {column} {definition}"
                        )
            kept_by = _DAY_MONEY_KEPT_BY[database.dialect]
            if not await has_trigger(transaction, database.dialect, "reservations", kept_by):
                if database.dialect == "postgresql":
                    # No reservation written between the sums and the triggers (a replica running).
                    await transaction.execute("LOCK TABLE reservations IN SHARE ROW EXCLUSIVE MODE")
                for statement in _DAY_MONEY_TRIGGERS[database.dialect]:
                    await transaction.execute(statement)
                await transaction.execute("DELETE FROM day_money")
                await transaction.execute(_DAY_MONEY_FROM_RESERVATIONS)
        return cls(database, time_zone, clock)

    def _day(self, moment: datetime) -> str:
        return moment.astimezone(self._time_zone).date().isoformat()

    def today(self) -> str:
        return self._day(self._clock())

    @staticmethod
    async def _load(queries: Queries, key: str) -> Reservation | None:
        row = await queries.fetchone(f"SELECT {_COLUMNS} FROM reservations WHERE key = ?", (key,))
        return _reservation(row) if row else None

    async def reserve(
        self, key: str, tenant: str, job_id: str, amount: int, caps: Caps, ttl: timedelta, backend: int = 0
    ) -> tuple[Reservation, bool]:
        async with self._db.transaction() as transaction:
            now = self._clock()
            day = self._day(now)
            await transaction.lock(_day_lock(day), f"ledger-key:{key}")
            # The reservation under this key if any, the tenant's own cap, and what the day holds of the
            # tenant's and of everyone's (committed, open, expired at their worst): one read, so one
            # round trip on PostgreSQL instead of four.
            row = await transaction.fetchone(
                f"SELECT {_COLUMNS_OF_RESERVATION},"
                f" ({_TENANT_CAP}),"
                f" (SELECT {_DAY_USED} WHERE day = ? AND tenant = ?), (SELECT {_DAY_USED} WHERE day = ?)"
                " FROM (SELECT 1) AS one LEFT JOIN reservations ON reservations.key = ?",
                (tenant, day, tenant, day, key),
            )
            assert row is not None
            existing = _reservation(row[:-3]) if row[0] is not None else None
            own, tenant_used, everyone_used = row[-3:]
            if existing is not None:
                if (existing.tenant, existing.job_id) != (tenant, job_id):
                    raise KeyConflict(existing)
                # The same attempt asked again: its amount and backend are the ones reserved, even if
                # the caller's estimate or ranking changed since. Expired is still that attempt.
                if existing.state not in (State.RESERVED, State.EXPIRED):
                    raise WrongState(existing, "reserve")
                return existing, False
            tenant_cap = caps.tenant if own is None else int(own)
            refusals = []
            for cap, scope, used in ((tenant_cap, tenant, tenant_used), (caps.everyone, None, everyone_used)):
                spent = int(used)  # PostgreSQL sums BIGINTs as NUMERIC
                if cap > 0 and spent + amount > cap:
                    refusals.append(BudgetExceeded(scope, day, cap, max(cap - spent, 0), amount))
            if refusals:
                # The tighter cap: what could still be reserved.
                raise min(refusals, key=lambda refusal: refusal.remaining)
            reservation = Reservation(
                key, tenant, job_id, amount, State.RESERVED, None, now, now + ttl, day, backend=backend
            )
            await transaction.execute(
                "INSERT INTO reservations (key, tenant, job_id, amount, state, created, expires, day, backend) "
                "VALUES (?, ?, ?, ?, 'reserved', ?, ?, ?, ?)",
                (key, tenant, job_id, amount, _micros(now), _micros(reservation.expires), day, backend),
            )
            return reservation, True

    async def commit(self, key: str, actual: int) -> tuple[Reservation, State]:
        async with self._db.transaction() as transaction:
            existing = await self._locked(transaction, key)
            if existing.state == State.COMMITTED and existing.actual == actual:
                return existing, State.COMMITTED
            if existing.state not in (State.RESERVED, State.EXPIRED):
                raise WrongState(existing, "commit")
            await transaction.execute(
                "UPDATE reservations SET state = 'committed', actual = ?, settled = ? WHERE key = ?",
                (actual, _micros(self._clock()), key),
            )
            # What the row now holds, without reading it back (on PostgreSQL, sent with the commit).
            return replace(existing, state=State.COMMITTED, actual=actual), existing.state

    async def release(self, key: str) -> tuple[Reservation, State]:
        async with self._db.transaction() as transaction:
            existing = await self._locked(transaction, key)
            if existing.state == State.RELEASED:
                return existing, State.RELEASED
            if existing.state == State.COMMITTED:
                raise WrongState(existing, "release")
            await transaction.execute(
                "UPDATE reservations SET state = 'released', settled = ? WHERE key = ?",
                (_micros(self._clock()), key),
            )
            return replace(existing, state=State.RELEASED), existing.state

    async def _locked(self, transaction: Transaction, key: str) -> Reservation:
        """The reservation, read under its day's lock. Raises UnknownKey."""
        row = await transaction.fetchone("SELECT day FROM reservations WHERE key = ?", (key,))
        if row is None:
            raise UnknownKey(key)
        await transaction.lock(_day_lock(row[0]))  # a reservation's day never changes
        existing = await self._load(transaction, key)
        if existing is None:  # purged meanwhile (PostgreSQL): settled long ago, as good as unknown
            raise UnknownKey(key)
        return existing

    async def expire_overdue(self) -> list[Reservation]:
        async with self._db.transaction() as transaction:
            now = self._clock()
            overdue = "state = 'reserved' AND expires <= ?"
            days = [
                row[0]
                for row in await transaction.fetchall(
                    f"SELECT DISTINCT day FROM reservations WHERE {overdue}", (_micros(now),)
                )
            ]
            if not days:
                return []
            await transaction.lock(*map(_day_lock, days))
            # Again under the locks: another replica's sweep, or a commit, may have settled some.
            in_days = f"day IN ({', '.join('?' * len(days))})"
            rows = await transaction.fetchall(
                f"SELECT key FROM reservations WHERE {overdue} AND {in_days}", (_micros(now), *days)
            )
            if not rows:
                return []
            expired = []
            for keys in in_batches([row[0] for row in rows]):
                in_keys = f"key IN ({', '.join('?' * len(keys))})"
                await transaction.execute(
                    f"UPDATE reservations SET state = 'expired', settled = ?, expired_day = ? WHERE {in_keys}",
                    (_micros(now), self._day(now), *keys),
                )
                expired += await transaction.fetchall(
                    f"SELECT {_COLUMNS} FROM reservations WHERE {in_keys}", keys
                )
            return sorted((_reservation(row) for row in expired), key=lambda r: (r.expires, r.key))

    async def day_totals(self, tenant: str) -> DayTotals:
        # One statement (one snapshot, one round trip): the router asks it about once a job.
        day = self.today()
        row = await self._db.fetchone(_DAY_TOTALS, (tenant, tenant, tenant, day, tenant, day, tenant, day))
        assert row is not None
        # PostgreSQL sums BIGINTs as NUMERIC.
        mine, everyone = (tuple(int(value) for value in row[at : at + 4]) for at in (0, 4))
        return DayTotals(
            day, _day_totals(*mine), _day_totals(*everyone), None if row[8] is None else int(row[8])
        )

    async def set_tenant_cap(self, tenant: str, cap: int) -> None:
        if cap < 0:
            raise ValueError(f"a cap is at least 0, not {cap}")
        # One statement: a reservation racing it reads the old cap or the new one, never half of either.
        async with self._db.transaction() as transaction:
            await transaction.execute(
                "INSERT INTO tenant_caps (tenant, cap, updated) VALUES (?, ?, ?) "
                "ON CONFLICT (tenant) DO UPDATE SET cap = excluded.cap, updated = excluded.updated",
                (tenant, cap, _micros(self._clock())),
            )

    async def clear_tenant_cap(self, tenant: str) -> None:
        async with self._db.transaction() as transaction:
            await transaction.execute("DELETE FROM tenant_caps WHERE tenant = ?", (tenant,))

    async def tenant_cap(self, tenant: str) -> int | None:
        row = await self._db.fetchone(_TENANT_CAP, (tenant,))
        return None if row is None else int(row[0])

    async def spend(self, tenant: str, first_day: str, last_day: str) -> Spend:
        # ISO days compare as strings do.
        row = await self._db.fetchone(
            "SELECT COALESCE(SUM(committed + uncertain), 0), COALESCE(SUM(reserved), 0) "
            "FROM day_money WHERE tenant = ? AND day >= ? AND day <= ?",
            (tenant, first_day, last_day),
        )
        assert row is not None
        spent, reserved = (int(value) for value in row)  # PostgreSQL sums BIGINTs as NUMERIC
        return Spend(spent, reserved)

    async def get(self, key: str) -> Reservation | None:
        return await self._load(self._db, key)

    async def purge(self, before: float, limit: int) -> int:
        # Settled ones only, before the cutoff, in no particular order (sorting them read every one past
        # it). A settled reservation is never written again, so the rows selected are the rows deleted,
        # found by key (the condition again in the DELETE made SQLite scan the index instead). No
        # trigger runs on DELETE: day_money keeps the days' money of the reservations deleted.
        async with self._db.transaction() as transaction:
            await transaction.lock("ledger-purge")  # replicas purge one at a time, not the same rows
            rows = await transaction.fetchall(
                "DELETE FROM reservations WHERE key IN (SELECT key FROM reservations "
                "WHERE state IN ('committed', 'released') AND settled < ? LIMIT ?) RETURNING 1",
                (round(before * 1_000_000), limit),
            )
        return len(rows)

    async def close(self) -> None:
        await self._db.close()
