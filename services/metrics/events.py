"""What alert policies and SLOs are computed from: terminal jobs and backend errors, kept for days.

`EventStore` is the interface; `SqliteEventStore` keeps them in one SQLite file (WAL mode) next to the
ledger. Records are deduplicated where callers give a job id, so a batch sent again after a timeout
counts once: a job's terminal state by (job, state); a backend error by (job, backend, reason, time).
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from aiprod_metrics.sqlite import SqliteThread

_T = TypeVar("_T")
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
    reason: str


@dataclass(frozen=True)
class Share:
    good: int
    total: int


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
    async def latency_share(self, since: datetime, under_seconds: float) -> Share:
        """Of the jobs that ended since then with a duration, those that took less than under_seconds."""

    @abstractmethod
    async def quality_share(self, since: datetime, state: int, at_least: float) -> Share:
        """Of the jobs that reached the state since then, those that scored at least at_least."""

    @abstractmethod
    async def prune(self, before: datetime) -> None:
        """Forgets what happened before then."""

    @abstractmethod
    async def close(self) -> None: ...


_SCHEMA = """
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
CREATE INDEX IF NOT EXISTS job_outcomes_time ON job_outcomes (time);
CREATE TABLE IF NOT EXISTS backend_errors (
    job_id TEXT,
    time INTEGER NOT NULL,
    backend INTEGER NOT NULL,
    reason TEXT NOT NULL,
    UNIQUE (job_id, backend, reason, time)
);
CREATE INDEX IF NOT EXISTS backend_errors_time ON backend_errors (time);
"""


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


class SqliteEventStore(EventStore):
    """One connection used from one thread of its own, so that the disk never stalls the event loop."""

    def __init__(self, path: Path) -> None:
        self._sqlite = SqliteThread(path, "events", _SCHEMA)
        self._db = self._sqlite.db

    async def _run(self, work: Callable[[], _T]) -> _T:
        return await self._sqlite.run(work)

    async def _one(self, query: str, *parameters: object) -> tuple:
        return await self._run(lambda: self._db.execute(query, parameters).fetchone())

    async def record(self, outcomes: Sequence[JobOutcome], errors: Sequence[BackendError]) -> None:
        def work() -> None:
            with self._db:  # one transaction
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR IGNORE INTO job_outcomes VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
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
                    ],
                )
                self._db.executemany(
                    "INSERT OR IGNORE INTO backend_errors VALUES (?, ?, ?, ?)",
                    [(e.job_id or None, _micros(e.time), e.backend, e.reason) for e in errors],
                )

        await self._run(work)

    async def quality(self, since: datetime, state: int) -> tuple[int, float]:
        count, mean = await self._one(
            "SELECT COUNT(*), COALESCE(AVG(qc_score), 0) FROM job_outcomes WHERE time >= ? AND state = ?",
            _micros(since),
            state,
        )
        return count, mean

    async def durations(self, since: datetime) -> list[float]:
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT duration_seconds FROM job_outcomes WHERE time >= ? AND duration_seconds IS NOT NULL "
                "ORDER BY duration_seconds",
                (_micros(since),),
            ).fetchall()
        )
        return [row[0] for row in rows]

    async def error_counts(self, since: datetime) -> dict[int, int]:
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT backend, SUM(time >= ?) FROM backend_errors GROUP BY backend", (_micros(since),)
            ).fetchall()
        )
        return dict(rows)

    async def latency_share(self, since: datetime, under_seconds: float) -> Share:
        good, total = await self._one(
            "SELECT COALESCE(SUM(duration_seconds < ?), 0), COUNT(*) FROM job_outcomes "
            "WHERE time >= ? AND duration_seconds IS NOT NULL",
            under_seconds,
            _micros(since),
        )
        return Share(good, total)

    async def quality_share(self, since: datetime, state: int, at_least: float) -> Share:
        good, total = await self._one(
            "SELECT COALESCE(SUM(qc_score >= ?), 0), COUNT(*) FROM job_outcomes WHERE time >= ? AND state = ?",
            at_least,
            _micros(since),
            state,
        )
        return Share(good, total)

    async def prune(self, before: datetime) -> None:
        def work() -> None:
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute("DELETE FROM job_outcomes WHERE time < ?", (_micros(before),))
                self._db.execute("DELETE FROM backend_errors WHERE time < ?", (_micros(before),))

        await self._run(work)

    async def close(self) -> None:
        await self._sqlite.close()
