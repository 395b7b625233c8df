"""What alert policies and SLOs are computed from: terminal jobs and backend errors, kept for days;
and where each alert condition stands, since when, so that a restart does not reset it.

`EventStore` is the interface; `SqlEventStore` implements it once on either database
(`aiprod_kit.database`): one SQLite file (WAL mode) next to the ledger, or PostgreSQL shared by every
metrics replica. Records are deduplicated where callers give a job id, so a batch sent again after a
timeout counts once: a job's terminal state by (job, state); a backend error by (job, backend, reason,
time).
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aiprod_kit.database import Database, Queries, has_trigger

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class JobOutcome:
    """A job that reached a terminal state."""

    job_id: str
    time: datetime
    backend: int
    state: int
    # For a job that succeeded.
    qc_score: float | None
    duration_seconds: float | None
    cost_micros: int


@dataclass(frozen=True)
class BackendError:
    """A failed job's backend, or an attempt the router gave up for another backend."""

    job_id: str
    time: datetime
    backend: int
    reason: str  # the failure reason's short name, as `aiprod_kit.failures.reason_name` gives it


@dataclass(frozen=True)
class Share:
    good: int
    total: int


# An alert condition: its policy, and its backend (0 for policies not per backend).
ConditionKey = tuple[str, int]


@dataclass(frozen=True)
class Condition:
    firing: bool
    # Since when it has been firing, or not.
    since: datetime
    # Whether it was firing before this evaluation; None when it was never evaluated.
    previous: bool | None

    @property
    def changed(self) -> bool:
        return self.previous != self.firing


class EventStore(ABC):
    @abstractmethod
    async def record(self, outcomes: Sequence[JobOutcome], errors: Sequence[BackendError]) -> None: ...

    @abstractmethod
    async def quality(self, since: datetime, state: int) -> tuple[int, float]:
        """How many jobs reached the state since then, and their mean QC score (0 with none)."""

    @abstractmethod
    async def durations(self, since: datetime) -> list[float]:
        """The durations of the jobs that ended since then, in seconds, ascending."""

    @abstractmethod
    async def error_counts(self, since: datetime) -> dict[int, int]:
        """Backend errors since then, for every backend with an error kept (0 for older ones only)."""

    @abstractmethod
    async def keep_slo_counts(self, latency_under_seconds: float, quality_at_least: float) -> None:
        """Keeps the SLO shares' counts by hour for these thresholds from now on (counted again from the
        outcomes kept when they change): the shares asked with them then read hours, not jobs."""

    @abstractmethod
    async def latency_share(self, since: datetime, under_seconds: float) -> Share:
        """Of the jobs that ended since then with a duration, those that took less than under_seconds."""

    @abstractmethod
    async def quality_share(self, since: datetime, state: int, at_least: float) -> Share:
        """Of the jobs that reached the state since then, those that scored at least at_least."""

    @abstractmethod
    async def track_conditions(
        self, firing: Mapping[ConditionKey, bool], now: datetime
    ) -> dict[ConditionKey, Condition]:
        """Records whether each alert condition fires now: one new, or changed since it was last
        recorded, holds since now; one unchanged keeps its time. Atomic, also across replicas
        evaluating together: one of them sees the change. Returns the given conditions."""

    @abstractmethod
    async def prune(self, before: datetime) -> None:
        """Forgets what happened before then."""

    @abstractmethod
    async def close(self) -> None: ...


_SCHEMAS = {
    "sqlite": """
CREATE TABLE IF NOT EXISTS job_outcomes (
    -- NULL when the caller gave none: not deduplicated
    job_id TEXT,
    -- Unix time in microseconds
    time INTEGER NOT NULL,
    backend INTEGER NOT NULL,
    state INTEGER NOT NULL,
    qc_score REAL,
    duration_seconds REAL,
    -- micro-USD
    cost INTEGER NOT NULL,
    UNIQUE (job_id, state)
);
-- The windows' counts read these alone, not the table: the SLOs' over a week of jobs took 3.3 s at
-- 1,000,000 jobs reading the rows the time index found, 0.16 s reading these.
CREATE INDEX IF NOT EXISTS job_outcomes_latency ON job_outcomes (time, duration_seconds);
CREATE INDEX IF NOT EXISTS job_outcomes_quality ON job_outcomes (state, time, qc_score);
DROP INDEX IF EXISTS job_outcomes_time;
CREATE TABLE IF NOT EXISTS backend_errors (
    job_id TEXT,
    time INTEGER NOT NULL,
    backend INTEGER NOT NULL,
    reason TEXT NOT NULL,
    UNIQUE (job_id, backend, reason, time)
);
CREATE INDEX IF NOT EXISTS backend_errors_time ON backend_errors (time);
CREATE INDEX IF NOT EXISTS backend_errors_backend ON backend_errors (backend, time);
CREATE TABLE IF NOT EXISTS alert_conditions (
    policy TEXT NOT NULL,
    -- 0 for policies not per backend
    backend INTEGER NOT NULL,
    firing INTEGER NOT NULL,
    -- Unix time in microseconds
    since INTEGER NOT NULL,
    PRIMARY KEY (policy, backend)
) WITHOUT ROWID;
-- The SLO shares' counts by hour and state for the thresholds in slo_thresholds (its one row), kept by
-- a trigger on job_outcomes (keep_slo_counts): a week's shares read its 168 hours' rows (of each state
-- for the latency share) and at most an hour of outcomes, where they read every outcome of the week.
CREATE TABLE IF NOT EXISTS slo_thresholds (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    latency_under_seconds REAL NOT NULL,
    quality_at_least REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS job_outcome_hours (
    -- the hour of time: time / 3,600,000,000, rounded down
    hour INTEGER NOT NULL,
    state INTEGER NOT NULL,
    outcomes INTEGER NOT NULL,
    -- with a duration, and of those under latency_under_seconds
    timed INTEGER NOT NULL,
    fast INTEGER NOT NULL,
    -- with a QC score of quality_at_least or more
    scored INTEGER NOT NULL,
    PRIMARY KEY (hour, state)
) WITHOUT ROWID;
""",
    # The same tables; 64-bit integers are BIGINT there.
    "postgresql": """
CREATE TABLE IF NOT EXISTS job_outcomes (
    job_id TEXT,
    time BIGINT NOT NULL,
    backend INTEGER NOT NULL,
    state INTEGER NOT NULL,
    qc_score DOUBLE PRECISION,
    duration_seconds DOUBLE PRECISION,
    cost BIGINT NOT NULL,
    UNIQUE (job_id, state)
);
CREATE INDEX IF NOT EXISTS job_outcomes_latency ON job_outcomes (time, duration_seconds);
CREATE INDEX IF NOT EXISTS job_outcomes_quality ON job_outcomes (state, time, qc_score);
DROP INDEX IF EXISTS job_outcomes_time;
CREATE TABLE IF NOT EXISTS backend_errors (
    job_id TEXT,
    time BIGINT NOT NULL,
    backend INTEGER NOT NULL,
    reason TEXT NOT NULL,
    UNIQUE (job_id, backend, reason, time)
);
CREATE INDEX IF NOT EXISTS backend_errors_time ON backend_errors (time);
CREATE INDEX IF NOT EXISTS backend_errors_backend ON backend_errors (backend, time);
CREATE TABLE IF NOT EXISTS alert_conditions (
    policy TEXT NOT NULL,
    backend INTEGER NOT NULL,
    firing BOOLEAN NOT NULL,
    since BIGINT NOT NULL,
    PRIMARY KEY (policy, backend)
);
CREATE TABLE IF NOT EXISTS slo_thresholds (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    latency_under_seconds DOUBLE PRECISION NOT NULL,
    quality_at_least DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS job_outcome_hours (
    hour BIGINT NOT NULL,
    state INTEGER NOT NULL,
    outcomes BIGINT NOT NULL,
    timed BIGINT NOT NULL,
    fast BIGINT NOT NULL,
    scored BIGINT NOT NULL,
    PRIMARY KEY (hour, state)
);
""",
}


_HOUR_MICROS = 3_600_000_000
# Later than any outcome's time (a signed 64-bit integer).
_NO_END = 2**63 - 1


def _hour(time: str) -> str:
    """The hour of a time in microseconds, rounded down as Python's // does (SQL's / rounds towards 0)."""
    return f"CASE WHEN {time} >= 0 THEN {time} / {_HOUR_MICROS} ELSE ({time} + 1) / {_HOUR_MICROS} - 1 END"


def _hour_counts(row: str, outcomes: str, total: str) -> str:
    """A row of job_outcome_hours from an outcome (total "") or, summed, from outcomes (total "SUM"),
    with the thresholds' row as t."""
    return (
        f"{_hour(row + '.time')}, {row}.state, {outcomes}, "
        f"{total}(CASE WHEN {row}.duration_seconds IS NULL THEN 0 ELSE 1 END), "
        f"{total}(CASE WHEN {row}.duration_seconds < t.latency_under_seconds THEN 1 ELSE 0 END), "
        f"{total}(CASE WHEN {row}.qc_score >= t.quality_at_least THEN 1 ELSE 0 END)"
    )


_ADD_OUTCOME = (
    "INSERT INTO job_outcome_hours (hour, state, outcomes, timed, fast, scored) "
    f"SELECT {_hour_counts('NEW', '1', '')} FROM slo_thresholds t "
    # WHERE true: SQLite's upsert after a SELECT needs a WHERE to parse.
    "WHERE true ON CONFLICT (hour, state) DO UPDATE SET "
    "outcomes = job_outcome_hours.outcomes + excluded.outcomes, "
    "timed = job_outcome_hours.timed + excluded.timed, "
    "fast = job_outcome_hours.fast + excluded.fast, "
    "scored = job_outcome_hours.scored + excluded.scored"
)
_HOURS_FROM_OUTCOMES = (
    "INSERT INTO job_outcome_hours (hour, state, outcomes, timed, fast, scored) "
    f"SELECT {_hour_counts('o', 'COUNT(*)', 'SUM')} FROM job_outcomes o CROSS JOIN slo_thresholds t "
    f"GROUP BY {_hour('o.time')}, o.state"
)
_HOURS_TRIGGER = "job_outcomes_hours"
_HOURS_TRIGGERS = {
    "sqlite": [
        f"CREATE TRIGGER {_HOURS_TRIGGER} AFTER INSERT ON job_outcomes BEGIN {_ADD_OUTCOME}; END",
    ],
    "postgresql": [
        f"CREATE OR REPLACE FUNCTION {_HOURS_TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"{_ADD_OUTCOME}; RETURN NULL; END $$",
        f"CREATE TRIGGER {_HOURS_TRIGGER} AFTER INSERT ON job_outcomes "
        f"FOR EACH ROW EXECUTE FUNCTION {_HOURS_TRIGGER}()",
    ],
}


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def _moment(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


async def _one(queries: Queries, query: str, *parameters: object) -> tuple:
    row = await queries.fetchone(query, parameters)
    assert row is not None  # aggregates always answer one row
    return row


class SqlEventStore(EventStore):
    def __init__(self, database: Database) -> None:
        self._db = database

    @classmethod
    async def open(cls, database: Database) -> "SqlEventStore":
        """Creates the tables if needed."""
        await database.create_schema(_SCHEMAS)
        return cls(database)

    async def record(self, outcomes: Sequence[JobOutcome], errors: Sequence[BackendError]) -> None:
        # On PostgreSQL a row written is locked until its writer commits, and two replicas' batches that
        # write the same rows (an outcome's key, then its hour's counts: the trigger's) in other orders
        # deadlock. So a batch first holds the hours' and states' locks it will add to, all at once, and
        # writes its rows in one order.
        outcome_rows = sorted(
            (
                (
                    o.job_id or None,
                    _micros(o.time),
                    o.backend,
                    o.state,
                    o.qc_score,
                    o.duration_seconds,
                    o.cost_micros,
                )
                for o in outcomes
            ),
            key=lambda row: (row[1] // _HOUR_MICROS, row[3], row[0] or ""),
        )
        error_rows = sorted(
            ((e.job_id or None, _micros(e.time), e.backend, e.reason) for e in errors),
            key=lambda row: (row[0] or "", row[2], row[3], row[1]),
        )
        async with self._db.transaction() as transaction:
            if outcome_rows:
                await transaction.lock(
                    *{f"slo-hour {row[1] // _HOUR_MICROS} {row[3]}" for row in outcome_rows}
                )
                await transaction.executemany(
                    "INSERT INTO job_outcomes (job_id, time, backend, state, qc_score, duration_seconds, cost) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    outcome_rows,
                )
            if error_rows:
                await transaction.executemany(
                    "INSERT INTO backend_errors (job_id, time, backend, reason) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT DO NOTHING",
                    error_rows,
                )

    async def quality(self, since: datetime, state: int) -> tuple[int, float]:
        count, mean = await _one(
            self._db,
            "SELECT COUNT(*), COALESCE(AVG(qc_score), 0) FROM job_outcomes WHERE time >= ? AND state = ?",
            _micros(since),
            state,
        )
        return count, float(mean)

    async def durations(self, since: datetime) -> list[float]:
        rows = await self._db.fetchall(
            "SELECT duration_seconds FROM job_outcomes WHERE time >= ? AND duration_seconds IS NOT NULL "
            "ORDER BY duration_seconds",
            (_micros(since),),
        )
        return [row[0] for row in rows]

    async def error_counts(self, since: datetime) -> dict[int, int]:
        # Every backend with an error kept, 0 for none since (its alert resolves), each counted on the
        # (backend, time) index rather than by reading every error kept (51 -> 6.4 ms at 200,000 on
        # SQLite), the backends found on it one after the other, not by reading it whole (DISTINCT).
        rows = await self._db.fetchall(
            "WITH RECURSIVE kept (backend) AS (SELECT MIN(backend) FROM backend_errors UNION ALL "
            "SELECT (SELECT MIN(backend) FROM backend_errors WHERE backend > kept.backend) FROM kept "
            "WHERE kept.backend IS NOT NULL) "
            "SELECT backend, (SELECT COUNT(*) FROM backend_errors e WHERE e.backend = kept.backend AND e.time >= ?)"
            " FROM kept WHERE backend IS NOT NULL",
            (_micros(since),),
        )
        return {backend: int(count) for backend, count in rows}

    async def keep_slo_counts(self, latency_under_seconds: float, quality_at_least: float) -> None:
        thresholds = (float(latency_under_seconds), float(quality_at_least))
        dialect = self._db.dialect
        async with self._db.transaction() as transaction:
            await transaction.lock("slo-counts")
            if dialect == "postgresql":
                # No outcome recorded between the counts and the trigger or the thresholds (a replica).
                await transaction.execute("LOCK TABLE job_outcomes IN SHARE ROW EXCLUSIVE MODE")
            # Counts kept without the trigger (a store from before it) are counted again.
            counting = await has_trigger(transaction, dialect, "job_outcomes", _HOURS_TRIGGER)
            if not counting:
                for statement in _HOURS_TRIGGERS[dialect]:
                    await transaction.execute(statement)
            kept = await transaction.fetchone(
                "SELECT latency_under_seconds, quality_at_least FROM slo_thresholds"
            )
            if not counting or kept is None or tuple(kept) != thresholds:
                await transaction.execute("DELETE FROM slo_thresholds")
                await transaction.execute(
                    "INSERT INTO slo_thresholds (id, latency_under_seconds, quality_at_least) VALUES (1, ?, ?)",
                    thresholds,
                )
                await transaction.execute("DELETE FROM job_outcome_hours")
                await transaction.execute(_HOURS_FROM_OUTCOMES)

    async def latency_share(self, since: datetime, under_seconds: float) -> Share:
        return await self._share(
            since,
            ("latency_under_seconds", under_seconds),
            "SELECT COALESCE(SUM(CASE WHEN duration_seconds < ? THEN 1 ELSE 0 END), 0), COUNT(*) "
            "FROM job_outcomes WHERE duration_seconds IS NOT NULL AND time >= ? AND time < ?",
            (under_seconds,),
            "SELECT COALESCE(SUM(fast), 0), COALESCE(SUM(timed), 0) FROM job_outcome_hours WHERE hour >= ?",
            (),
        )

    async def quality_share(self, since: datetime, state: int, at_least: float) -> Share:
        return await self._share(
            since,
            ("quality_at_least", at_least),
            "SELECT COALESCE(SUM(CASE WHEN qc_score >= ? THEN 1 ELSE 0 END), 0), COUNT(*) "
            "FROM job_outcomes WHERE state = ? AND time >= ? AND time < ?",
            (at_least, state),
            "SELECT COALESCE(SUM(scored), 0), COALESCE(SUM(outcomes), 0) FROM job_outcome_hours "
            "WHERE state = ? AND hour >= ?",
            (state,),
        )

    async def _share(
        self,
        since: datetime,
        threshold: tuple[str, float],
        outcomes: str,
        outcome_parameters: tuple,
        hours: str,
        hour_parameters: tuple,
    ) -> Share:
        """(good, total) since then: the whole hours' from the hours' counts when they are kept for this
        threshold (by any replica) and the rest of the first hour from its outcomes; else from every
        outcome since then (the outcomes' query's last two parameters: from, until). In one snapshot."""
        start = _micros(since)
        column, value = threshold
        async with self._db.transaction(read_only=True) as transaction:
            if (
                await transaction.fetchone(f"SELECT 1 FROM slo_thresholds WHERE {column} = ?", (value,))
                is None
            ):
                good, total = await _one(transaction, outcomes, *outcome_parameters, start, _NO_END)
                return Share(int(good), int(total))
            whole = -(-start // _HOUR_MICROS)  # the first whole hour
            good, total = await _one(transaction, outcomes, *outcome_parameters, start, whole * _HOUR_MICROS)
            hours_good, hours_total = await _one(transaction, hours, *hour_parameters, whole)
        return Share(int(good + hours_good), int(total + hours_total))

    async def track_conditions(
        self, firing: Mapping[ConditionKey, bool], now: datetime
    ) -> dict[ConditionKey, Condition]:
        async with self._db.transaction() as transaction:
            await transaction.lock("alert-conditions")
            recorded = {
                (policy, backend): (bool(was_firing), _moment(since))
                for policy, backend, was_firing, since in await transaction.fetchall(
                    "SELECT policy, backend, firing, since FROM alert_conditions"
                )
            }
            conditions = {}
            for key, fires in firing.items():
                previous, since = recorded.get(key, (None, now))
                conditions[key] = Condition(fires, since if previous == fires else now, previous)
            changed = [
                (policy, backend, condition.firing, _micros(condition.since))
                for (policy, backend), condition in conditions.items()
                if condition.changed
            ]
            if changed:
                await transaction.executemany(
                    "INSERT INTO alert_conditions (policy, backend, firing, since) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (policy, backend) DO UPDATE SET firing = excluded.firing, since = excluded.since",
                    changed,
                )
        return conditions

    async def prune(self, before: datetime) -> None:
        async with self._db.transaction() as transaction:
            await transaction.execute("DELETE FROM job_outcomes WHERE time < ?", (_micros(before),))
            await transaction.execute("DELETE FROM backend_errors WHERE time < ?", (_micros(before),))
            # The hours wholly before then. The one it falls in goes on counting the outcomes forgotten
            # of it, but only a window from before then would read it.
            await transaction.execute(
                "DELETE FROM job_outcome_hours WHERE hour < ?", (_micros(before) // _HOUR_MICROS,)
            )

    async def close(self) -> None:
        await self._db.close()
