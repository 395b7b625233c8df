"""The gateway's job store: jobs, their append-only event logs and their idempotency keys.

`JobStore` is the interface; `SqliteJobStore` the embedded implementation (one file in WAL mode
under the data directory). A PostgreSQL store implements the same interface when the mesh scales out.
"""

import asyncio
import json
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import timestamp_pb2

from aiprod.common.v1 import job_pb2
from aiprod.gateway.v1 import gateway_pb2

TERMINAL_STATES = frozenset(
    {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
)

# Changes an event makes to its job, applied in the same transaction as the event's append.
JobUpdate = Callable[[gateway_pb2.RenderJob], None]


class RequestIdConflict(Exception):
    """The request_id was already used for a different request."""


@dataclass(frozen=True)
class JobPage:
    jobs: list[gateway_pb2.RenderJob]
    # Position to continue after (exclusive), or None at the end.
    next_cursor: int | None


class JobStore(ABC):
    @abstractmethod
    async def create_job(
        self, job: gateway_pb2.RenderJob, fingerprint: str, trace_context: Mapping[str, str] | None = None
    ) -> tuple[gateway_pb2.RenderJob, bool]:
        """Stores a new job with its first event, unless its request_id is taken: then returns the
        job stored under it (and False) when fingerprint matches, or raises RequestIdConflict.
        trace_context: the W3C trace context (traceparent, tracestate) of the call that created it."""

    @abstractmethod
    async def get_job(self, job_id: str) -> gateway_pb2.RenderJob | None: ...

    @abstractmethod
    async def trace_context(self, job_id: str) -> dict[str, str]:
        """The job's trace context as stored at creation (empty if none): all its work, resumed after
        a restart or not, continues that one trace."""

    @abstractmethod
    async def list_jobs(self, states: Sequence[int], limit: int, before: int | None) -> JobPage:
        """Jobs newest first, at most limit, positioned before the cursor `before`."""

    @abstractmethod
    async def append_event(
        self, job_id: str, message: str, update: JobUpdate, render_event: object | None = None
    ) -> gateway_pb2.JobEvent:
        """Applies update to the job and appends one event, atomically; returns the event."""

    @abstractmethod
    async def events_after(self, job_id: str, sequence: int) -> list[gateway_pb2.JobEvent]: ...

    @abstractmethod
    async def wait_for_event(self, job_id: str, sequence: int) -> None:
        """Returns once the job has an event after sequence."""

    @abstractmethod
    async def unfinished_jobs(self) -> list[gateway_pb2.RenderJob]:
        """Jobs queued or running, oldest first: the dispatcher's work after a restart."""

    @abstractmethod
    async def count_by_state(self) -> dict[int, int]: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def watch(self, job_id: str, after_sequence: int) -> AsyncIterator[gateway_pb2.JobEvent]:
        """Every event after after_sequence, then the new ones as they come, until a terminal state."""
        sequence = after_sequence
        while True:
            for event in await self.events_after(job_id, sequence):
                sequence = event.sequence
                yield event
                if event.state in TERMINAL_STATES:
                    return
            job = await self.get_job(job_id)
            if job is None or (job.state in TERMINAL_STATES and job.last_sequence <= sequence):
                return
            await self.wait_for_event(job_id, sequence)


def _now() -> timestamp_pb2.Timestamp:
    time = timestamp_pb2.Timestamp()
    time.GetCurrentTime()
    return time


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    request_id TEXT NOT NULL UNIQUE,
    fingerprint TEXT NOT NULL,
    state INTEGER NOT NULL,
    job BLOB NOT NULL,
    trace_context TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, position);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (job_id, sequence)
) WITHOUT ROWID;
"""


class SqliteJobStore(JobStore):
    """SQLite in WAL mode. Every statement is short and runs on the event loop's thread, which
    makes each method atomic without locks; synchronous=NORMAL survives a killed process."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "trace_context" not in columns:
            # A store made before jobs kept their trace context.
            self._db.execute("ALTER TABLE jobs ADD COLUMN trace_context TEXT NOT NULL DEFAULT '{}'")
        self._new_events: dict[str, asyncio.Event] = {}

    def _load(self, job_id: str) -> gateway_pb2.RenderJob | None:
        row = self._db.execute("SELECT job FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return gateway_pb2.RenderJob.FromString(row[0]) if row else None

    def _notify(self, job_id: str) -> None:
        waiter = self._new_events.pop(job_id, None)
        if waiter is not None:
            waiter.set()

    async def create_job(
        self, job: gateway_pb2.RenderJob, fingerprint: str, trace_context: Mapping[str, str] | None = None
    ) -> tuple[gateway_pb2.RenderJob, bool]:
        row = self._db.execute(
            "SELECT fingerprint, job FROM jobs WHERE request_id = ?", (job.request_id,)
        ).fetchone()
        if row is not None:
            if row[0] != fingerprint:
                raise RequestIdConflict(job.request_id)
            return gateway_pb2.RenderJob.FromString(row[1]), False
        job.last_sequence = 1
        event = gateway_pb2.JobEvent(
            job_id=job.job_id, sequence=1, create_time=job.create_time, state=job.state, message="job created"
        )
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO jobs (job_id, request_id, fingerprint, state, job, trace_context)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    job.job_id,
                    job.request_id,
                    fingerprint,
                    job.state,
                    job.SerializeToString(),
                    json.dumps(dict(trace_context or {})),
                ),
            )
            self._db.execute(
                "INSERT INTO job_events (job_id, sequence, event) VALUES (?, 1, ?)",
                (job.job_id, event.SerializeToString()),
            )
        return job, True

    async def get_job(self, job_id: str) -> gateway_pb2.RenderJob | None:
        return self._load(job_id)

    async def trace_context(self, job_id: str) -> dict[str, str]:
        row = self._db.execute("SELECT trace_context FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row else {}

    async def list_jobs(self, states: Sequence[int], limit: int, before: int | None) -> JobPage:
        clauses, parameters = [], []
        if states:
            clauses.append(f"state IN ({', '.join('?' * len(states))})")
            parameters.extend(states)
        if before is not None:
            clauses.append("position < ?")
            parameters.append(before)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._db.execute(
            f"SELECT position, job FROM jobs {where} ORDER BY position DESC LIMIT ?", (*parameters, limit + 1)
        ).fetchall()
        jobs = [gateway_pb2.RenderJob.FromString(row[1]) for row in rows[:limit]]
        return JobPage(jobs, rows[limit - 1][0] if len(rows) > limit else None)

    async def append_event(
        self, job_id: str, message: str, update: JobUpdate, render_event: object | None = None
    ) -> gateway_pb2.JobEvent:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            job = self._load(job_id)
            if job is None:
                raise KeyError(job_id)
            update(job)
            job.last_sequence += 1
            job.update_time.CopyFrom(_now())
            event = gateway_pb2.JobEvent(
                job_id=job_id,
                sequence=job.last_sequence,
                create_time=job.update_time,
                state=job.state,
                message=message,
                render=render_event,
            )
            self._db.execute(
                "UPDATE jobs SET state = ?, job = ? WHERE job_id = ?",
                (job.state, job.SerializeToString(), job_id),
            )
            self._db.execute(
                "INSERT INTO job_events (job_id, sequence, event) VALUES (?, ?, ?)",
                (job_id, event.sequence, event.SerializeToString()),
            )
        self._notify(job_id)
        return event

    async def events_after(self, job_id: str, sequence: int) -> list[gateway_pb2.JobEvent]:
        rows = self._db.execute(
            "SELECT event FROM job_events WHERE job_id = ? AND sequence > ? ORDER BY sequence",
            (job_id, sequence),
        ).fetchall()
        return [gateway_pb2.JobEvent.FromString(row[0]) for row in rows]

    async def wait_for_event(self, job_id: str, sequence: int) -> None:
        waiter = self._new_events.setdefault(job_id, asyncio.Event())
        # An event may have landed between the caller's read and now.
        row = self._db.execute("SELECT MAX(sequence) FROM job_events WHERE job_id = ?", (job_id,)).fetchone()
        if row[0] is not None and row[0] > sequence:
            return
        await waiter.wait()

    async def unfinished_jobs(self) -> list[gateway_pb2.RenderJob]:
        rows = self._db.execute(
            "SELECT job FROM jobs WHERE state IN (?, ?) ORDER BY position",
            (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING),
        ).fetchall()
        return [gateway_pb2.RenderJob.FromString(row[0]) for row in rows]

    async def count_by_state(self) -> dict[int, int]:
        return dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

    async def close(self) -> None:
        self._db.close()
