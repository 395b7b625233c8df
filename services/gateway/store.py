"""The gateway's job store: jobs, their append-only event logs and their idempotency keys.

Every job belongs to one tenant (`tenant_id` column): the tenant-facing reads take the tenant and see
nothing of another's, and a request id is unique per tenant (the `request_id` column holds
"<tenant>/<request id>"; '/' never occurs in either).

`JobStore` is the interface; `SqlJobStore` implements it once on either database (`aiprod_kit.database`):
one SQLite file in WAL mode under the data directory (the embedded default), or PostgreSQL, shared by
every gateway replica. Writers of one job, or of one request_id, take that one lock (in SQLite the
database's); an appended event is announced to every replica's watchers (NOTIFY), which also poll
now and then in case an announcement was lost with a connection. Watchers in the process that appended
an event are handed it as its transaction commits: they read the log only for what another process
appended (its announcement), or when the sequence says they missed one.

It also keeps which jobs have attempt charges the spend ledger has not acknowledged yet (`unsettled`)
and held attempts their backends may yet account for (`held`), counts derived from the job on every
write: the gateway's settlement outbox, retried until the ledger has each one, also across restarts and
by any replica. Two counts, so that attempts held for long never stand in the way of charges to tell.

It also keeps every revision of a job's plan in review (`job_revisions`), each written in the
transaction of the event that makes it.

It also keeps each tenant's jobs by state and the sums GetUsage reports of them (`tenant_job_figures`:
how many were created in review and approved, their quotes and costs), kept by the database's
triggers in the transaction that writes a job, so that a tenant's usage costs one read however many
jobs it has.

It also keeps the videos each job names (`job_videos`), written with the event that first names one,
and the local videos its purged jobs named (`unnamed_videos`), for the gateway's video retention
(`aiprod_gateway.videos`) to delete unless a kept job names them.

It also keeps who drives each unfinished job: a claim, held by one gateway process (its owner id) for
a lease it renews. A claim is taken only when nobody holds it, its owner already does, or its lease
ran out (the owner died); the events a driver records are fenced by it, and a job that ends lets go of
it. Leases are read on the replicas' clocks: they are tens of seconds against clocks kept in step by
NTP, and a replica that takes a job over early still cannot make its old driver write.
"""

import asyncio
import contextlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from google.protobuf import timestamp_pb2

from aiprod.common.v1 import event_pb2, job_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_kit.database import Database, Queries, Transaction, has_column, has_trigger, in_batches
from aiprod_kit.failures import Reason

TERMINAL_STATES = frozenset(
    {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
)

# Changes an event makes to its job, applied in the same transaction as the event's append.
JobUpdate = Callable[[gateway_pb2.RenderJob], None]
# Where appended events are announced; the payload is "<job id> <sequence>".
EVENTS_CHANNEL = "aiprod_job_events"
# A waiting watcher looks again this often even without news: a net under the news, as this process
# hands its events over, other replicas' are announced, and a listener that lost its connection tells
# every watcher to look once it listens again. (Every 2 s, the polls were 5 of the 35 store transactions
# a finished job cost in the throughput bench.)
_POLL_SECONDS = 10.0


class Claimed(NamedTuple):
    """A job as its claim found it, and the trace context of the call that created it."""

    job: gateway_pb2.RenderJob
    trace_context: dict[str, str]


class Entry(NamedTuple):
    """One event to append: its message, the job change it makes, and the render event it records."""

    message: str
    update: JobUpdate
    render_event: object | None = None


class RequestIdConflict(Exception):
    """The request_id was already used for a different request."""


class ClaimLost(Exception):
    """The job is no longer the caller's to drive: another owner claimed it, or it ended (cancelled)."""


class TooManyUnfinished(Exception):
    """The job's tenant already has as many jobs queued or running as it may (max_unfinished): the job
    is neither stored nor queued."""


@dataclass(frozen=True)
class JobPage:
    jobs: list[gateway_pb2.RenderJob]
    # Position to continue after (exclusive), or None at the end.
    next_cursor: int | None


class JobStore(ABC):
    @abstractmethod
    async def create_job(
        self,
        job: gateway_pb2.RenderJob,
        fingerprint: str,
        trace_context: Mapping[str, str] | None = None,
        revision: gateway_pb2.PlanRevision | None = None,
        max_unfinished: int | None = None,
        also: Callable[[Transaction], Awaitable[None]] | None = None,
        claim: tuple[str, float] | None = None,
    ) -> tuple[gateway_pb2.RenderJob, bool]:
        """Stores a new job with its first event, unless its request_id is taken: then returns the
        job stored under it (and False) when fingerprint matches, or raises RequestIdConflict.
        claim: (owner, lease seconds): a new queued job is claimed for owner in the same transaction (the
        replica that creates it drives it, without a claim's transaction more).
        also: what else the new job brings (its quote), written in the same transaction, only if the job
        is new.
        trace_context: the W3C trace context (traceparent, tracestate) of the call that created it.
        revision: the plan's first revision (a job in review), kept with the job and on its first event.
        max_unfinished: a queued job is refused (TooManyUnfinished) when its tenant has that many jobs
        queued or running already, counted under the tenant's lock, so that replicas creating at once
        cannot pass it together."""

    @abstractmethod
    async def job_for_request(
        self, tenant_id: str, request_id: str, fingerprint: str
    ) -> gateway_pb2.RenderJob | None:
        """The job the tenant's request created, if any; RequestIdConflict when the request id was used
        for another request."""

    @abstractmethod
    async def get_job(self, job_id: str, tenant_id: str | None = None) -> gateway_pb2.RenderJob | None:
        """The job; with tenant_id, only if it is that tenant's (None otherwise, as if it did not exist)."""

    @abstractmethod
    async def list_jobs(
        self, tenant_id: str, states: Sequence[int], limit: int, before: int | None
    ) -> JobPage:
        """The tenant's jobs newest first, at most limit, positioned before the cursor `before`."""

    @abstractmethod
    async def append_event(
        self,
        job_id: str,
        message: str,
        update: JobUpdate,
        render_event: object | None = None,
        owner: str | None = None,
        details: gateway_pb2.JobEvent | None = None,
        max_unfinished: int | None = None,
    ) -> gateway_pb2.RenderJob:
        """Applies update to the job and appends one event, atomically; returns the job as written. An event that
        ends the job also ends its claim. owner: the event is the job's driver's, refused (ClaimLost,
        nothing written) unless owner holds the job's claim and the job has not ended. details: the
        event's typed fields (plan_updated, quoted, approved, cancelled), which update may still fill in;
        a plan_updated revision is kept among the job's revisions in the same transaction. The event's
        previous_state is the job's state before update. max_unfinished: an update that queues a job
        which was not (an approval) is refused (TooManyUnfinished, nothing written) when the job's tenant
        has that many jobs queued or running already, counted under the tenant's lock."""

    @abstractmethod
    async def append_events(
        self, job_id: str, entries: Sequence[Entry], owner: str | None = None
    ) -> gateway_pb2.RenderJob:
        """Appends events that came together in one transaction, each applied and logged in turn as
        append_event would (its own sequence and previous_state), announced once; returns the job as the
        last one wrote it. owner: fenced as append_event's, once for all; entries after one that ended
        the job are not written, and ClaimLost is raised once the ones before it have committed."""

    @abstractmethod
    async def events_after(self, job_id: str, sequence: int) -> list[gateway_pb2.JobEvent]: ...

    @abstractmethod
    async def job_and_events_after(
        self, job_id: str, sequence: int, tenant_id: str | None = None
    ) -> tuple[gateway_pb2.RenderJob | None, list[gateway_pb2.JobEvent]]:
        """The job (as get_job reads it) and its events after sequence, as one read saw them; no events
        when there is no such job."""

    @abstractmethod
    def following(self, job_id: str) -> contextlib.AbstractContextManager["News"]:
        """The job's news from now on, while in the context: taken before reading the job's events, it
        misses none committed after the read."""

    @abstractmethod
    async def claimable_jobs(self, limit: int) -> list[str]:
        """Up to limit ids of jobs queued or running that nobody holds (never claimed, let go of, or their
        lease ran out), the highest priority first (their presets'), then the oldest: work for any
        replica."""

    @abstractmethod
    async def claim(self, job_id: str, owner: str, lease_seconds: float) -> Claimed | None:
        """Claims a queued or running job for owner, for lease_seconds from now, atomically: only if
        nobody holds it, owner already does, or its holder's lease ran out. When owner holds it, the job
        as claimed and its trace context as stored at creation (empty if none), so that its drive starts
        from it without reading it again and continues that one trace; None otherwise."""

    @abstractmethod
    async def renew_claims(self, owner: str, job_ids: Sequence[str], lease_seconds: float) -> set[str]:
        """Extends owner's claims on these jobs to lease_seconds from now; returns those it still holds
        (of the others, another owner took the claim, or the job ended)."""

    @abstractmethod
    async def release_claims(self, owner: str, job_ids: Sequence[str]) -> None:
        """Lets go of owner's claims on these jobs (a claim another owner holds stays)."""

    @abstractmethod
    async def unsettled_jobs(self, limit: int) -> list[gateway_pb2.RenderJob]:
        """Up to limit jobs with attempt charges the ledger has not acknowledged, oldest first."""

    @abstractmethod
    async def held_jobs(self, limit: int, after: int) -> list[tuple[int, str]]:
        """Up to limit jobs with held attempts to reconcile, as (position, id), after position `after`
        (a cursor: each pass goes on where the last one stopped)."""

    @abstractmethod
    async def mark_settled(self, job_id: str, reservation_keys: Sequence[str]) -> gateway_pb2.RenderJob:
        """Records that the ledger has these attempts' settlements (no event: it changes no state)."""

    @abstractmethod
    async def purge_ended(self, before: float, limit: int) -> int:
        """Deletes up to limit jobs that ended before `before` (Unix seconds), their charges settled,
        with their events and plan revisions; how many. The tenants' figures keep counting them."""

    @abstractmethod
    async def unnamed_videos(self, limit: int) -> list[str]:
        """Up to limit URIs of local videos that purged jobs named and no kept job names, to delete (then
        forget_videos); those a kept job names again are forgotten here."""

    @abstractmethod
    async def forget_videos(self, uris: Sequence[str]) -> None:
        """Forgets these unnamed videos, deleted or kept for good reason."""

    @abstractmethod
    async def count_by_state(self, tenant_id: str) -> dict[int, int]:
        """The tenant's jobs by state."""

    @abstractmethod
    async def usage_figures(self, tenant_id: str) -> gateway_pb2.GetUsageResponse:
        """The tenant's figures its jobs give (GetUsage's approval_rate, quoted_total and actual_total):
        the share of its jobs created in review that were approved (over those approved and those
        cancelled before approval), and the quoted prices and actual costs of its finished jobs (succeeded
        or failed) that hold a quote."""

    @abstractmethod
    async def revisions(self, job_id: str) -> list[gateway_pb2.PlanRevision]:
        """Every revision of the job's plan kept in its review, oldest first."""

    @abstractmethod
    async def close(self) -> None: ...

    @contextlib.asynccontextmanager
    async def watching(
        self, job_id: str, after_sequence: int, tenant_id: str | None = None
    ) -> AsyncIterator[tuple[gateway_pb2.RenderJob | None, AsyncIterator[gateway_pb2.JobEvent]]]:
        """The job (None if it does not exist, or with tenant_id is not that tenant's) and every event
        after after_sequence, then the new ones as they come, until a terminal state; while in the
        context. The job and its log are read in one statement, after the news is followed, so that
        nothing committed after the read is missed."""
        with self.following(job_id) as news:
            job, events = await self.job_and_events_after(job_id, after_sequence, tenant_id)
            yield job, self._follow(job_id, after_sequence, job, events, news)

    async def _follow(
        self,
        job_id: str,
        sequence: int,
        job: gateway_pb2.RenderJob | None,
        events: list[gateway_pb2.JobEvent],
        news: "News",
    ) -> AsyncIterator[gateway_pb2.JobEvent]:
        """The log is read again only for news that does not carry its events (another process's
        announcement, or an event missed); the job itself only when no event came (a job that ended
        before after_sequence, or an announcement missed: looked at again every _POLL_SECONDS)."""
        look_at_job = True
        while True:
            for event in events:
                if event.sequence <= sequence:
                    continue  # read from the log and handed over too
                sequence = event.sequence
                yield event
                if event.state in TERMINAL_STATES:
                    return
            if look_at_job and not events:
                if job is None:
                    job = await self.get_job(job_id)
                if job is None or (job.state in TERMINAL_STATES and job.last_sequence <= sequence):
                    return
            job = None  # as read then: read again when next looked at
            try:
                async with asyncio.timeout(_POLL_SECONDS):
                    told = await news.next()
                look_at_job = False
            except TimeoutError:
                told, look_at_job = None, True
            if told is not None and _follow_on(told, sequence):
                events = told
            else:
                events = await self.events_after(job_id, sequence)


def _follow_on(events: list[gateway_pb2.JobEvent], sequence: int) -> bool:
    """Whether events are every event after sequence up to the last of them (none missing)."""
    expected = sequence + 1
    for event in events:
        if event.sequence > expected:
            return False
        expected = max(expected, event.sequence + 1)
    return True


class News:
    """What one watcher hears of one job: the events appended in this process, handed over as their
    transactions commit, and announcements that carry no event (look in the log)."""

    def __init__(self) -> None:
        self._events: list[gateway_pb2.JobEvent] = []
        self._look = False
        self._told = asyncio.Event()
        # The last sequence handed over: an announcement of it or earlier says nothing new.
        self.handed = 0

    def hand(self, event: gateway_pb2.JobEvent) -> None:
        self._events.append(event)
        self.handed = max(self.handed, event.sequence)
        self._told.set()

    def look(self) -> None:
        self._look = True
        self._told.set()

    async def next(self) -> list[gateway_pb2.JobEvent] | None:
        """The events handed over since the last call, once there is news; None: look in the log."""
        await self._told.wait()
        self._told.clear()
        events, look = self._events, self._look
        self._events, self._look = [], False
        return None if look else events


_UNFINISHED = (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING)
# Jobs that finished rendering, well or not, as GetUsage's actual against quoted counts them.
_FINISHED = (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED)
# A job created in review and in one of these states was approved.
_PAST_REVIEW = (*_UNFINISHED, *_FINISHED)
_SETTLED_BY_LEDGER = (event_pb2.CHARGE_OUTCOME_COMMIT, event_pb2.CHARGE_OUTCOME_RELEASE)


def to_settle(job: gateway_pb2.RenderJob) -> list[gateway_pb2.RenderAttempt]:
    """The job's attempts whose charge the ledger must still be told: ended, reserved, to commit or
    release (a held one waits for reconciliation), and not acknowledged yet."""
    return [
        attempt
        for attempt in job.attempts
        if attempt.reservation_key
        and attempt.HasField("charge")
        and attempt.charge.outcome in _SETTLED_BY_LEDGER
        and not attempt.settled
    ]


def to_reconcile(job: gateway_pb2.RenderJob) -> list[gateway_pb2.RenderAttempt]:
    """The job's held attempts that their backend may yet account for (a render whose end nobody saw,
    a create that may not have reached it); a create whose outcome even its backend lost stays held."""
    return [
        attempt
        for attempt in job.attempts
        if attempt.reservation_key
        and attempt.charge.outcome == event_pb2.CHARGE_OUTCOME_HOLD
        and attempt.charge.failure.reason != Reason.PROVIDER_UNCERTAIN
    ]


def _outbox_counts(job: gateway_pb2.RenderJob) -> tuple[int, int]:
    """The job's charges to tell the ledger, and its held attempts to reconcile."""
    return len(to_settle(job)), len(to_reconcile(job))


# A tenant's jobs queued or running, from the figures kept (parameters: the tenant, then _UNFINISHED).
_UNFINISHED_COUNT = (
    "(SELECT COALESCE(SUM(figures.jobs), 0) FROM tenant_job_figures AS figures"
    " WHERE figures.tenant_id = ? AND figures.state IN (?, ?))"
)


def _refuse_beyond(tenant_id: str, unfinished: int, max_unfinished: int | None) -> None:
    if max_unfinished is not None and unfinished >= max_unfinished:
        raise TooManyUnfinished(f"tenant {tenant_id} has {unfinished} jobs queued or running")


def _not_owners(job_id: str, owner: str | None, why: str) -> ClaimLost:
    return ClaimLost(f"job {job_id} is not {owner}'s to drive: {why}")


def _now() -> timestamp_pb2.Timestamp:
    time = timestamp_pb2.Timestamp()
    time.GetCurrentTime()
    return time


# A job's position orders jobs (pages, claims); the newest job is never deleted (purge_ended), so
# SQLite's rowid grows as AUTOINCREMENT's would, without its sqlite_sequence write at every create
# (stores made before keep it).
# jobs_state (state, position) served what jobs_dispatch and jobs_tenant_state serve now, and every
# create and change of state paid for it: dropped. The two: 9 µs of a create's 63 in its transaction.
_SCHEMAS = {
    "sqlite": """
CREATE TABLE IF NOT EXISTS jobs (
    position INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    request_id TEXT NOT NULL UNIQUE,
    fingerprint TEXT NOT NULL,
    state INTEGER NOT NULL,
    job BLOB NOT NULL,
    trace_context TEXT NOT NULL DEFAULT '{}',
    claim_owner TEXT,
    claim_expires REAL,
    unsettled INTEGER NOT NULL DEFAULT 0,
    held INTEGER NOT NULL DEFAULT 0,
    tenant_id TEXT NOT NULL DEFAULT '',
    priority INTEGER NOT NULL DEFAULT 0,
    reviewed INTEGER NOT NULL DEFAULT 0,
    approved INTEGER NOT NULL DEFAULT 0,
    quoted_micros INTEGER NOT NULL DEFAULT 0,
    cost_micros INTEGER NOT NULL DEFAULT 0,
    ended REAL
);
DROP INDEX IF EXISTS jobs_state;
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (job_id, sequence)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_revisions (
    job_id TEXT NOT NULL,
    plan_version INTEGER NOT NULL,
    revision BLOB NOT NULL,
    PRIMARY KEY (job_id, plan_version)
) WITHOUT ROWID;
-- Each tenant's jobs by state, and what GetUsage sums of them (the columns of the same names in
-- jobs): kept by the database (_FIGURES_TRIGGERS) in the transaction that writes a job, in shards
-- (_FIGURES_SHARDS) that a tenant's concurrent writers share less.
CREATE TABLE IF NOT EXISTS tenant_job_figures (
    tenant_id TEXT NOT NULL,
    state INTEGER NOT NULL,
    shard INTEGER NOT NULL,
    jobs INTEGER NOT NULL,
    reviewed INTEGER NOT NULL,
    approved INTEGER NOT NULL,
    quoted_micros INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, state, shard)
) WITHOUT ROWID;
""",
    "postgresql": """
CREATE TABLE IF NOT EXISTS jobs (
    position BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    request_id TEXT NOT NULL UNIQUE,
    fingerprint TEXT NOT NULL,
    state INTEGER NOT NULL,
    job BYTEA NOT NULL,
    trace_context TEXT NOT NULL DEFAULT '{}',
    claim_owner TEXT,
    claim_expires DOUBLE PRECISION,
    unsettled INTEGER NOT NULL DEFAULT 0,
    held INTEGER NOT NULL DEFAULT 0,
    tenant_id TEXT NOT NULL DEFAULT '',
    priority INTEGER NOT NULL DEFAULT 0,
    reviewed INTEGER NOT NULL DEFAULT 0,
    approved INTEGER NOT NULL DEFAULT 0,
    quoted_micros BIGINT NOT NULL DEFAULT 0,
    cost_micros BIGINT NOT NULL DEFAULT 0,
    ended DOUBLE PRECISION
);
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS claim_owner TEXT;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS tenant_id TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant_id, position);
CREATE INDEX IF NOT EXISTS jobs_tenant_state ON jobs (tenant_id, state, position);
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS claim_expires DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS unsettled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS held INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS jobs_unsettled ON jobs (position) WHERE unsettled > 0;
CREATE INDEX IF NOT EXISTS jobs_held ON jobs (position) WHERE held > 0;
DROP INDEX IF EXISTS jobs_state;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS priority INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS jobs_dispatch ON jobs (state, priority DESC, position);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    event BYTEA NOT NULL,
    PRIMARY KEY (job_id, sequence)
);
CREATE TABLE IF NOT EXISTS job_revisions (
    job_id TEXT NOT NULL,
    plan_version BIGINT NOT NULL,
    revision BYTEA NOT NULL,
    PRIMARY KEY (job_id, plan_version)
);
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS reviewed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS approved INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS quoted_micros BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS cost_micros BIGINT NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS tenant_job_figures (
    tenant_id TEXT NOT NULL,
    state INTEGER NOT NULL,
    shard INTEGER NOT NULL,
    jobs BIGINT NOT NULL,
    reviewed BIGINT NOT NULL,
    approved BIGINT NOT NULL,
    quoted_micros BIGINT NOT NULL,
    cost_micros BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, state, shard)
);
""",
}
# Columns added to jobs after its first version, which an older SQLite store gets on opening
# (PostgreSQL's script adds them itself). claim_owner: the gateway process driving the job (NULL: none);
# claim_expires: when its lease runs out unless renewed, in seconds since the epoch.
_SQLITE_ADDED_COLUMNS = {
    "trace_context": "TEXT NOT NULL DEFAULT '{}'",
    "claim_owner": "TEXT",
    "claim_expires": "REAL",
    # Attempt charges the spend ledger has not acknowledged yet.
    "unsettled": "INTEGER NOT NULL DEFAULT 0",
    # Held attempts their backends may yet account for.
    "held": "INTEGER NOT NULL DEFAULT 0",
    # The tenant the job belongs to ('' for jobs made before tenants: nobody's).
    "tenant_id": "TEXT NOT NULL DEFAULT ''",
    # Its scheduling priority (gateway_pb2.Priority, its preset's): claimable jobs come highest first.
    "priority": "INTEGER NOT NULL DEFAULT 0",
    # GetUsage's figures of the job (1 or 0; micro-USD), the sums of which tenant_job_figures keeps:
    # it was created in review (with its plan's first revision); its log holds an approval; its
    # quote's price; its cost.
    "reviewed": "INTEGER NOT NULL DEFAULT 0",
    "approved": "INTEGER NOT NULL DEFAULT 0",
    "quoted_micros": "INTEGER NOT NULL DEFAULT 0",
    "cost_micros": "INTEGER NOT NULL DEFAULT 0",
}
# When a job ended (Unix seconds; NULL while it runs): what its retention counts from. A store from before
# it gets the column and its ended jobs' ends in one transaction (_keep_ends).
_ENDED_COLUMN = {"sqlite": "REAL", "postgresql": "DOUBLE PRECISION"}
# An older replica, during a rolling update, ends a job without its end: the database writes it then
# (its own clock, which is the replicas' in production), so that the job is purged in its time.
_ENDS_KEPT = "jobs_ended"
_TERMINAL_LIST = ", ".join(str(state) for state in sorted(TERMINAL_STATES))
_ENDS_KEPT_TRIGGERS = {
    "sqlite": [
        f"CREATE TRIGGER {_ENDS_KEPT} AFTER UPDATE OF state ON jobs"
        f" WHEN NEW.ended IS NULL AND NEW.state IN ({_TERMINAL_LIST})"
        " BEGIN UPDATE jobs SET ended = (julianday('now') - 2440587.5) * 86400.0 WHERE job_id = NEW.job_id; END"
    ],
    "postgresql": [
        f"CREATE OR REPLACE FUNCTION {_ENDS_KEPT}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "NEW.ended := extract(epoch FROM clock_timestamp()); RETURN NEW; END $$",
        f"CREATE TRIGGER {_ENDS_KEPT} BEFORE UPDATE OF state ON jobs FOR EACH ROW"
        f" WHEN (NEW.ended IS NULL AND NEW.state IN ({_TERMINAL_LIST})) EXECUTE FUNCTION {_ENDS_KEPT}()",
    ],
}
# The jobs a purge may delete, by end: one held or unsettled is not in it, so a purge reads only what it
# deletes however many such jobs wait (on jobs (ended), every batch read them all: 35 ms at 199,500).
_PURGEABLE = "ended IS NOT NULL AND unsettled = 0 AND held = 0"
# The videos each job names (videos_named); and local videos its purged jobs named that no kept job
# does, to delete (aiprod_gateway.videos; a bucket's lifecycle rule deletes those in GCS).
_JOB_VIDEOS = {
    dialect: (
        f"CREATE TABLE job_videos (job_id TEXT NOT NULL, uri TEXT NOT NULL, PRIMARY KEY (job_id, uri)){kind}",
        "CREATE INDEX job_videos_uri ON job_videos (uri)",
        f"CREATE TABLE unnamed_videos (uri TEXT PRIMARY KEY){kind}",
    )
    for dialect, kind in (("sqlite", " WITHOUT ROWID"), ("postgresql", ""))
}
_NAMED = "EXISTS (SELECT 1 FROM job_videos WHERE job_videos.uri = unnamed_videos.uri)"
_NAME_VIDEO = "INSERT INTO job_videos (job_id, uri) VALUES (?, ?) ON CONFLICT DO NOTHING"


def videos_named(job: gateway_pb2.RenderJob) -> set[str]:
    """The URIs of every video the job names: its result, its shots' and its attempts' outputs."""
    outputs = [job.result, *(shot.output for shot in job.shots), *(a.charge.output for a in job.attempts)]
    return {output.video.uri for output in outputs if output.video.uri}


# GetUsage counted a tenant's jobs, and summed their quotes and costs from every finished job's blob
# and an approval from every cancelled job's log, at every call: a second at 100,000 jobs, on the event
# loop. The database keeps the sums by (tenant, state) instead, with triggers, so that a replica of the
# version before, during a rolling update, keeps the counts by state too (the figures of a job it
# creates or changes keep the columns it does not write: that job's quote, cost or approval may be
# missed). A job's share: its count, whether it was reviewed, approved in review, and its quoted
# price and cost when it holds a quote.
_FIGURES_COLUMNS = ("state", "reviewed", "approved", "quoted_micros", "cost_micros")
# A job's figures count in the shard of its position: on PostgreSQL a row of sums is locked by its
# writer until it commits, and one row a (tenant, state) made a tenant's creates commit one at a time
# (1,422-1,560 -> 1,063-1,137 creates a second at 32 at once, in process; in 32 shards, as many as
# without the sums, within the box's spread).
_FIGURES_SHARDS = 32  # a power of two: the shard is the position's low bits
_FIGURES_SHARES = (
    "1",
    "{row}.reviewed",
    "{row}.reviewed * {row}.approved",
    "{row}.quoted_micros",
    "CASE WHEN {row}.quoted_micros > 0 THEN {row}.cost_micros ELSE 0 END",
)


def _add_figures(row: str, sign: str = "") -> str:
    jobs, reviewed, approved, quoted, cost = (f"{sign}({share.format(row=row)})" for share in _FIGURES_SHARES)
    return (
        "INSERT INTO tenant_job_figures"
        " (tenant_id, state, shard, jobs, reviewed, approved, quoted_micros, cost_micros) "
        f"VALUES ({row}.tenant_id, {row}.state, {row}.position & {_FIGURES_SHARDS - 1}, "
        f"{jobs}, {reviewed}, {approved}, {quoted}, {cost}) "
        "ON CONFLICT (tenant_id, state, shard) DO UPDATE SET jobs = tenant_job_figures.jobs + excluded.jobs, "
        "reviewed = tenant_job_figures.reviewed + excluded.reviewed, "
        "approved = tenant_job_figures.approved + excluded.approved, "
        "quoted_micros = tenant_job_figures.quoted_micros + excluded.quoted_micros, "
        "cost_micros = tenant_job_figures.cost_micros + excluded.cost_micros"
    )


_FIGURES_TRIGGER = "jobs_tenant_figures"
# Most of a job's events change none of its figures (progress, an attempt): those fire nothing.
_FIGURES_CHANGED = " OR ".join(f"OLD.{column} <> NEW.{column}" for column in _FIGURES_COLUMNS)
_FIGURES_TRIGGERS = {
    "sqlite": [
        f"CREATE TRIGGER {_FIGURES_TRIGGER}_insert AFTER INSERT ON jobs BEGIN {_add_figures('NEW')}; END",
        f"CREATE TRIGGER {_FIGURES_TRIGGER}_update AFTER UPDATE OF {', '.join(_FIGURES_COLUMNS)} ON jobs "
        f"WHEN {_FIGURES_CHANGED} "
        f"BEGIN {_add_figures('OLD', '-')}; {_add_figures('NEW')}; END",
    ],
    "postgresql": [
        f"CREATE OR REPLACE FUNCTION {_FIGURES_TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF TG_OP = 'UPDATE' THEN {_add_figures('OLD', '-')}; END IF; {_add_figures('NEW')}; RETURN NULL; END $$",
        f"CREATE TRIGGER {_FIGURES_TRIGGER}_insert AFTER INSERT ON jobs "
        f"FOR EACH ROW EXECUTE FUNCTION {_FIGURES_TRIGGER}()",
        f"CREATE TRIGGER {_FIGURES_TRIGGER}_update AFTER UPDATE OF {', '.join(_FIGURES_COLUMNS)} ON jobs "
        f"FOR EACH ROW WHEN ({_FIGURES_CHANGED}) EXECUTE FUNCTION {_FIGURES_TRIGGER}()",
    ],
}
# A store from before the triggers: its sums, once its jobs' columns are filled (_fill_figures).
_FIGURES_FROM_JOBS = (
    "INSERT INTO tenant_job_figures"
    " (tenant_id, state, shard, jobs, reviewed, approved, quoted_micros, cost_micros) "
    f"SELECT tenant_id, state, position & {_FIGURES_SHARDS - 1}, COUNT(*), SUM(reviewed), SUM(reviewed * approved), "
    "SUM(quoted_micros), SUM(CASE WHEN quoted_micros > 0 THEN cost_micros ELSE 0 END) FROM jobs "
    f"GROUP BY tenant_id, state, position & {_FIGURES_SHARDS - 1}"
)


class SqlJobStore(JobStore):
    """Every method is one statement or one transaction. A job's writers take the job's lock, so its
    events are numbered without gaps or repeats whichever replica appends them; claims take it too, so
    that none slips between a driver's check of its claim and its write."""

    def __init__(self, database: Database, clock: Callable[[], float] = time.time) -> None:
        self._db = database
        self._clock = clock
        # The watchers in this process, by job; the events this process is committing, (job id, sequence).
        self._watchers: dict[str, set[News]] = {}
        self._appending: set[tuple[str, int]] = set()

    @classmethod
    async def open(cls, database: Database, clock: Callable[[], float] = time.time) -> "SqlJobStore":
        """Creates the tables if needed and starts following appended events. clock: seconds since the
        epoch, for leases and ends."""
        await database.create_schema(_SCHEMAS)
        if database.dialect == "sqlite":
            columns = {row[1] for row in await database.fetchall("PRAGMA table_info(jobs)")}
            async with database.transaction() as transaction:
                for column, definition in _SQLITE_ADDED_COLUMNS.items():
                    if column not in columns:
                        await transaction.execute(f"ALTER TABLE jobs ADD COLUMN {column} {definition}")
                # One SQLite file has one gateway at a time: claims found in it are a previous process's,
                # dead, and its jobs are resumed at once rather than after their leases.
                # Only queued and running jobs are claimed (an ended job's claim ends with it): read on their
                # index, not the whole table (0.7 s at 1,000,000 jobs).
                await transaction.execute(
                    "UPDATE jobs SET claim_owner = NULL, claim_expires = NULL"
                    " WHERE state IN (?, ?) AND claim_owner IS NOT NULL",
                    _UNFINISHED,
                )
                for column in ("unsettled", "held"):
                    await transaction.execute(
                        f"CREATE INDEX IF NOT EXISTS jobs_{column} ON jobs (position) WHERE {column} > 0"
                    )
                await transaction.execute(
                    "CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant_id, position)"
                )
                await transaction.execute(
                    "CREATE INDEX IF NOT EXISTS jobs_tenant_state ON jobs (tenant_id, state, position)"
                )
                await transaction.execute(
                    "CREATE INDEX IF NOT EXISTS jobs_dispatch ON jobs (state, priority DESC, position)"
                )
        async with database.transaction() as transaction:
            await transaction.lock("job-figures")  # another replica may be opening it too
            if not await has_trigger(transaction, database.dialect, "jobs", f"{_FIGURES_TRIGGER}_insert"):
                if database.dialect == "postgresql":
                    # No job written between the sums and the triggers (a replica running).
                    await transaction.execute("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
                await cls._fill_figures(transaction)
                for statement in _FIGURES_TRIGGERS[database.dialect]:
                    await transaction.execute(statement)
                await transaction.execute("DELETE FROM tenant_job_figures")
                await transaction.execute(_FIGURES_FROM_JOBS)
        await cls._keep_ends(database, clock())
        await cls._name_videos(database)
        store = cls(database, clock)
        await database.listen(EVENTS_CHANNEL, store._announced)
        return store

    @staticmethod
    async def _keep_ends(database: Database, now: float) -> None:
        """Gives a store from before them its jobs' ends, in the transaction that adds the column (a start
        cut short in between would leave the jobs ended before it without an end, never purged): those
        ended count their retention from now, never shorter than they should. A job an older replica
        ends during a rolling update gets its end from the database (_ENDS_KEPT)."""
        async with database.transaction() as transaction:
            await transaction.lock("job-ends")  # another replica may be opening it too
            if not await has_column(transaction, database.dialect, "jobs", "ended"):
                await transaction.execute(
                    f"ALTER TABLE jobs ADD COLUMN ended {_ENDED_COLUMN[database.dialect]}"
                )
                ended = ", ".join("?" * len(TERMINAL_STATES))
                await transaction.execute(
                    f"UPDATE jobs SET ended = ? WHERE state IN ({ended})", (now, *TERMINAL_STATES)
                )
            await transaction.execute(
                f"CREATE INDEX IF NOT EXISTS jobs_purgeable ON jobs (ended) WHERE {_PURGEABLE}"
            )
            if not await has_trigger(transaction, database.dialect, "jobs", _ENDS_KEPT):
                for statement in _ENDS_KEPT_TRIGGERS[database.dialect]:
                    await transaction.execute(statement)

    @staticmethod
    async def _name_videos(database: Database) -> None:
        """Makes the table of the videos each job names, filled from the jobs of a store from before it
        in the transaction that creates it (a start cut short in between would leave their videos named
        by nobody, deleted past retention while their jobs are kept)."""
        async with database.transaction() as transaction:
            await transaction.lock("job-videos")  # another replica may be opening it too
            if await has_column(transaction, database.dialect, "job_videos", "uri"):
                return
            for statement in _JOB_VIDEOS[database.dialect]:
                await transaction.execute(statement)
            after = 0
            while True:  # a page at a time: a store may hold many jobs
                page = await transaction.fetchall(
                    "SELECT position, job_id, job FROM jobs WHERE position > ? ORDER BY position LIMIT 500",
                    (after,),
                )
                if not page:
                    return
                named = [
                    (job_id, uri)
                    for _, job_id, blob in page
                    for uri in videos_named(gateway_pb2.RenderJob.FromString(blob))
                ]
                await transaction.executemany(_NAME_VIDEO, named)
                after = page[-1][0]

    @staticmethod
    async def _fill_figures(transaction: Transaction) -> None:
        """Fills every job's figures columns from its revisions, log and blob (a store from before them),
        as GetUsage summed them at every call."""
        await transaction.execute(
            "UPDATE jobs SET reviewed = 1 WHERE job_id IN (SELECT job_id FROM job_revisions)"
        )
        # A reviewed job past review was approved; a cancelled one if its log says so.
        await transaction.execute(
            "UPDATE jobs SET approved = 1 WHERE reviewed = 1 AND state IN (?, ?, ?, ?)", _PAST_REVIEW
        )
        cancelled = await transaction.fetchall(
            "SELECT job_id FROM jobs WHERE reviewed = 1 AND state = ?", (job_pb2.JOB_STATE_CANCELLED,)
        )
        approved = []
        for (job_id,) in cancelled:
            events = await transaction.fetchall("SELECT event FROM job_events WHERE job_id = ?", (job_id,))
            if any(gateway_pb2.JobEvent.FromString(row[0]).HasField("approved") for row in events):
                approved.append((job_id,))
        await transaction.executemany("UPDATE jobs SET approved = 1 WHERE job_id = ?", approved)
        after = 0
        while True:  # a page at a time: a store may hold many jobs
            page = await transaction.fetchall(
                "SELECT position, job FROM jobs WHERE position > ? ORDER BY position LIMIT 500", (after,)
            )
            figures = []
            for position, blob in page:
                job = gateway_pb2.RenderJob.FromString(blob)
                figures.append((job.quote.price.amount_micros, job.cost.amount_micros, position))
                after = position
            await transaction.executemany(
                "UPDATE jobs SET quoted_micros = ?, cost_micros = ? WHERE position = ?", figures
            )
            if len(page) < 500:
                return

    def _announced(self, payload: str | None) -> None:
        """An appended event's announcement, "<job id> <sequence>" (None: announcements may have been
        missed). Its watchers here look in the log, unless the event is this process's: append_event
        hands it over (it may hear of its commit before its own commit call returns)."""
        if payload is None:
            for watchers in self._watchers.values():
                for news in watchers:
                    news.look()
            return
        job_id, _, sequence = payload.partition(" ")
        # A replica of the version before names the job alone: its every watcher looks.
        number = int(sequence) if sequence.isdigit() else None
        if number is not None and (job_id, number) in self._appending:
            return
        for news in self._watchers.get(job_id, ()):
            if number is None or news.handed < number:
                news.look()

    @contextlib.contextmanager
    def following(self, job_id: str) -> Iterator[News]:
        news = News()
        watchers = self._watchers.setdefault(job_id, set())
        watchers.add(news)
        try:
            yield news
        finally:
            watchers.discard(news)
            if not watchers and self._watchers.get(job_id) is watchers:
                del self._watchers[job_id]

    @staticmethod
    async def _load(queries: Queries, job_id: str) -> gateway_pb2.RenderJob | None:
        row = await queries.fetchone("SELECT job FROM jobs WHERE job_id = ?", (job_id,))
        return gateway_pb2.RenderJob.FromString(row[0]) if row else None

    @staticmethod
    async def _check_unfinished(transaction: Transaction, tenant_id: str, max_unfinished: int | None) -> None:
        """TooManyUnfinished when the tenant has max_unfinished jobs queued or running; under its lock.
        Counted from the tenant's kept figures (a row a state and shard), not its jobs: a create or an
        approval under a large limit no longer reads every job the tenant has in flight."""
        row = await transaction.fetchone(f"SELECT {_UNFINISHED_COUNT}", (tenant_id, *_UNFINISHED))
        _refuse_beyond(tenant_id, int(row[0]) if row else 0, max_unfinished)

    async def create_job(
        self,
        job: gateway_pb2.RenderJob,
        fingerprint: str,
        trace_context: Mapping[str, str] | None = None,
        revision: gateway_pb2.PlanRevision | None = None,
        max_unfinished: int | None = None,
        also: Callable[[Transaction], Awaitable[None]] | None = None,
        claim: tuple[str, float] | None = None,
    ) -> tuple[gateway_pb2.RenderJob, bool]:
        limited = max_unfinished is not None and job.state in _UNFINISHED
        owner, lease_seconds = claim if claim is not None and job.state in _UNFINISHED else (None, 0.0)
        async with self._db.transaction() as transaction:
            request_key = f"{job.tenant_id}/{job.request_id}"
            # Two replicas creating under one request_id: the second waits, then finds the first's job.
            # A queued job under a limit: the tenant's other creates and approvals wait too.
            await transaction.lock(
                f"job-request:{request_key}", *([f"tenant:{job.tenant_id}"] if limited else [])
            )
            # The job under this request id, if any, and the tenant's unfinished count: one read (on
            # PostgreSQL a round trip fewer: the create's transaction takes two).
            row = await transaction.fetchone(
                f"SELECT jobs.fingerprint, jobs.job, {_UNFINISHED_COUNT if limited else '0'}"
                " FROM (SELECT 1) AS one LEFT JOIN jobs ON jobs.request_id = ?",
                ((job.tenant_id, *_UNFINISHED) if limited else ()) + (request_key,),
            )
            if row is not None and row[1] is not None:
                if row[0] != fingerprint:
                    raise RequestIdConflict(job.request_id)
                return gateway_pb2.RenderJob.FromString(row[1]), False
            if limited:
                _refuse_beyond(job.tenant_id, int(row[2]), max_unfinished)
            if also is not None:
                await also(transaction)
            job.last_sequence = 1
            event = gateway_pb2.JobEvent(
                job_id=job.job_id,
                sequence=1,
                create_time=job.create_time,
                state=job.state,
                message="job created",
            )  # previous_state: unspecified, the job had none
            if job.HasField("quote"):
                event.quoted.CopyFrom(job.quote)
            if revision is not None:
                event.plan_updated.CopyFrom(revision)
                await self._insert_revision(transaction, job.job_id, revision)
            await transaction.execute(
                "INSERT INTO jobs (job_id, request_id, fingerprint, state, job, trace_context, tenant_id,"
                " priority, reviewed, quoted_micros, cost_micros, ended, claim_owner, claim_expires)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.job_id,
                    request_key,
                    fingerprint,
                    job.state,
                    job.SerializeToString(),
                    json.dumps(dict(trace_context or {})),
                    job.tenant_id,
                    job.priority,
                    int(revision is not None),
                    job.quote.price.amount_micros,
                    job.cost.amount_micros,
                    self._clock() if job.state in TERMINAL_STATES else None,
                    owner,
                    self._clock() + lease_seconds if owner is not None else None,
                ),
            )
            await transaction.execute(
                "INSERT INTO job_events (job_id, sequence, event) VALUES (?, 1, ?)",
                (job.job_id, event.SerializeToString()),
            )
        return job, True

    async def job_for_request(
        self, tenant_id: str, request_id: str, fingerprint: str
    ) -> gateway_pb2.RenderJob | None:
        row = await self._db.fetchone(
            "SELECT fingerprint, job FROM jobs WHERE request_id = ?", (f"{tenant_id}/{request_id}",)
        )
        if row is None:
            return None
        if row[0] != fingerprint:
            raise RequestIdConflict(request_id)
        return gateway_pb2.RenderJob.FromString(row[1])

    async def get_job(self, job_id: str, tenant_id: str | None = None) -> gateway_pb2.RenderJob | None:
        if tenant_id is None:
            return await self._load(self._db, job_id)
        row = await self._db.fetchone(
            "SELECT job FROM jobs WHERE job_id = ? AND tenant_id = ?", (job_id, tenant_id)
        )
        return gateway_pb2.RenderJob.FromString(row[0]) if row else None

    async def list_jobs(
        self, tenant_id: str, states: Sequence[int], limit: int, before: int | None
    ) -> JobPage:
        # Several states: each one's newest from its own index range (tenant, state, position), merged.
        # One range over them all was read back from the newest job until the page filled, so every job
        # of the tenant when fewer were in those states (0.4 s at 700,000 jobs, where these take 0.1 ms).
        after, cursor = ("", ()) if before is None else (" AND position < ?", (before,))
        kinds = list(dict.fromkeys(states))
        state = " AND state = ?" if kinds else ""
        newest = (
            f"SELECT position, job FROM jobs WHERE tenant_id = ?{state}{after} ORDER BY position DESC LIMIT ?"
        )
        ranges = [(tenant_id, kind, *cursor, limit + 1) for kind in kinds] or [
            (tenant_id, *cursor, limit + 1)
        ]
        query, parameters = newest, ranges[0]
        if len(ranges) > 1:
            query = " UNION ALL ".join(
                f"SELECT position, job FROM ({newest}) AS in_state_{n}" for n in range(len(ranges))
            )
            query += " ORDER BY position DESC LIMIT ?"
            parameters = (*(value for one in ranges for value in one), limit + 1)
        rows = await self._db.fetchall(query, parameters)
        jobs = [gateway_pb2.RenderJob.FromString(row[1]) for row in rows[:limit]]
        return JobPage(jobs, rows[limit - 1][0] if len(rows) > limit else None)

    async def append_event(
        self,
        job_id: str,
        message: str,
        update: JobUpdate,
        render_event: object | None = None,
        owner: str | None = None,
        details: gateway_pb2.JobEvent | None = None,
        max_unfinished: int | None = None,
    ) -> gateway_pb2.RenderJob:
        job, _ = await self._appended(
            job_id, [Entry(message, update, render_event)], owner, details, max_unfinished
        )
        return job

    async def append_events(
        self, job_id: str, entries: Sequence[Entry], owner: str | None = None
    ) -> gateway_pb2.RenderJob:
        job, unwritten = await self._appended(job_id, entries, owner)
        if unwritten:
            raise _not_owners(job_id, owner, "it has ended")
        return job

    async def _appended(
        self,
        job_id: str,
        entries: Sequence[Entry],
        owner: str | None,
        details: gateway_pb2.JobEvent | None = None,
        max_unfinished: int | None = None,
    ) -> tuple[gateway_pb2.RenderJob, int]:
        """_append, its events handed to this process's watchers once committed: the job as written, and
        how many entries were not (they came after the job's end)."""
        committing: list[tuple[str, int]] = []
        try:
            events, job = await self._append(job_id, entries, owner, details, max_unfinished, committing)
        except BaseException:
            # Its commit's outcome is unknown here: this process's watchers look in the log.
            for news in self._watchers.get(job_id, ()) if committing else ():
                news.look()
            raise
        finally:
            self._appending.difference_update(committing)
        # Committed: this process's watchers have them without a read (the announcement says nothing new).
        for news in self._watchers.get(job_id, ()):
            for event in events:
                news.hand(event)
        return job, len(entries) - len(events)

    async def _append(
        self,
        job_id: str,
        entries: Sequence[Entry],
        owner: str | None,
        details: gateway_pb2.JobEvent | None,
        max_unfinished: int | None,
        committing: list[tuple[str, int]],
    ) -> tuple[list[gateway_pb2.JobEvent], gateway_pb2.RenderJob]:
        """append_events' transaction: the events and the job written. details and max_unfinished are
        append_event's, for its one entry. committing: the last event's (job id, sequence), the one
        announced, once it is committing."""
        async with self._db.transaction() as transaction:
            tenant_id = None
            if max_unfinished is not None:
                # A job's tenant never changes: read before its lock, so that both are asked for at once.
                owned = await transaction.fetchone("SELECT tenant_id FROM jobs WHERE job_id = ?", (job_id,))
                tenant_id = owned[0] if owned else None
            await transaction.lock(
                f"job:{job_id}", *([f"tenant:{tenant_id}"] if tenant_id is not None else [])
            )
            row = await transaction.fetchone(
                "SELECT job, claim_owner, approved FROM jobs WHERE job_id = ?", (job_id,)
            )
            if row is None:
                raise KeyError(job_id)
            job = gateway_pb2.RenderJob.FromString(row[0])
            approved = row[2]
            if owner is not None and (row[1] != owner or job.state in TERMINAL_STATES):
                why = "it has ended" if job.state in TERMINAL_STATES else "another replica claimed it"
                raise _not_owners(job_id, owner, why)
            first_state, named = job.state, videos_named(job)
            events: list[gateway_pb2.JobEvent] = []
            for message, update, render_event in entries:
                if owner is not None and job.state in TERMINAL_STATES:
                    break  # not the driver's to write once the job has ended, as a next append's would not be
                previous_state = job.state
                update(job)
                job.last_sequence += 1
                job.update_time.CopyFrom(_now())
                events.append(
                    gateway_pb2.JobEvent(
                        job_id=job_id,
                        sequence=job.last_sequence,
                        create_time=job.update_time,
                        state=job.state,
                        previous_state=previous_state,
                        message=message,
                        render=render_event,
                    )
                )
            if tenant_id is not None and job.state in _UNFINISHED and first_state not in _UNFINISHED:
                await self._check_unfinished(transaction, tenant_id, max_unfinished)
            if details is not None:
                events[0].MergeFrom(details)
                if details.HasField("plan_updated"):
                    await self._insert_revision(transaction, job_id, details.plan_updated)
                if details.HasField("approved"):
                    approved = 1
            # An end: nothing is left to drive, whoever ended it, so the claim ends with it; its retention
            # counts from its first end (written here, with the state: _ENDS_KEPT is for older replicas).
            ends = job.state in TERMINAL_STATES
            written = await transaction.fetchone(
                "UPDATE jobs SET state = ?, job = ?, unsettled = ?, held = ?, approved = ?, quoted_micros = ?,"
                " cost_micros = ?"
                + (", claim_owner = NULL, claim_expires = NULL, ended = COALESCE(ended, ?)" if ends else "")
                + " WHERE job_id = ? RETURNING position",
                (
                    job.state,
                    job.SerializeToString(),
                    *_outbox_counts(job),
                    approved,
                    job.quote.price.amount_micros,
                    job.cost.amount_micros,
                    *((self._clock(),) if ends else ()),
                    job_id,
                ),
            )
            if written is None:
                # Purged past its retention since it was read (PostgreSQL: the read takes no row lock):
                # no event is logged for a job that is no more.
                raise KeyError(job_id)
            # One statement for them all: one round trip on PostgreSQL.
            await transaction.execute(
                "INSERT INTO job_events (job_id, sequence, event) VALUES "
                + ", ".join(["(?, ?, ?)"] * len(events)),
                tuple(
                    value for event in events for value in (job_id, event.sequence, event.SerializeToString())
                ),
            )
            if newly_named := videos_named(job) - named:
                await transaction.executemany(_NAME_VIDEO, [(job_id, uri) for uri in newly_named])
            last = events[-1].sequence
            committing.append((job_id, last))
            self._appending.add(committing[0])
            await transaction.notify(EVENTS_CHANNEL, f"{job_id} {last}")
        return events, job

    async def events_after(self, job_id: str, sequence: int) -> list[gateway_pb2.JobEvent]:
        rows = await self._db.fetchall(
            "SELECT event FROM job_events WHERE job_id = ? AND sequence > ? ORDER BY sequence",
            (job_id, sequence),
        )
        return [gateway_pb2.JobEvent.FromString(row[0]) for row in rows]

    async def job_and_events_after(
        self, job_id: str, sequence: int, tenant_id: str | None = None
    ) -> tuple[gateway_pb2.RenderJob | None, list[gateway_pb2.JobEvent]]:
        # One statement where a watch's start took two: the job (sequence 0, before any event's) and
        # its log after sequence; another tenant's job's events are read and dropped with it.
        tenant, parameters = ("", ()) if tenant_id is None else (" AND tenant_id = ?", (tenant_id,))
        rows = await self._db.fetchall(
            f"SELECT 0, job FROM jobs WHERE job_id = ?{tenant} UNION ALL"
            " SELECT sequence, event FROM job_events WHERE job_id = ? AND sequence > ? ORDER BY 1",
            (job_id, *parameters, job_id, sequence),
        )
        if not rows or rows[0][0] != 0:
            return None, []
        return gateway_pb2.RenderJob.FromString(rows[0][1]), [
            gateway_pb2.JobEvent.FromString(row[1]) for row in rows[1:]
        ]

    async def claimable_jobs(self, limit: int) -> list[str]:
        rows = await self._db.fetchall(
            "SELECT job_id FROM jobs WHERE state IN (?, ?) AND (claim_owner IS NULL OR claim_expires < ?)"
            " ORDER BY priority DESC, position LIMIT ?",
            (*_UNFINISHED, self._clock(), limit),
        )
        return [row[0] for row in rows]

    async def claim(self, job_id: str, owner: str, lease_seconds: float) -> Claimed | None:
        async with self._db.transaction() as transaction:
            await transaction.lock(f"job:{job_id}")
            now = self._clock()
            # One statement, so that of owners racing for one job exactly one finds it free.
            row = await transaction.fetchone(
                "UPDATE jobs SET claim_owner = ?, claim_expires = ? WHERE job_id = ? AND state IN (?, ?)"
                " AND (claim_owner IS NULL OR claim_owner = ? OR claim_expires < ?)"
                " RETURNING job, trace_context",
                (owner, now + lease_seconds, job_id, *_UNFINISHED, owner, now),
            )
        return None if row is None else Claimed(gateway_pb2.RenderJob.FromString(row[0]), json.loads(row[1]))

    async def renew_claims(self, owner: str, job_ids: Sequence[str], lease_seconds: float) -> set[str]:
        if not job_ids:
            return set()
        renewed: set[str] = set()
        async with self._db.transaction() as transaction:
            expires = self._clock() + lease_seconds
            for some in in_batches(job_ids):
                rows = await transaction.fetchall(
                    "UPDATE jobs SET claim_expires = ? WHERE claim_owner = ? AND state IN (?, ?)"
                    f" AND job_id IN ({', '.join('?' * len(some))}) RETURNING job_id",
                    (expires, owner, *_UNFINISHED, *some),
                )
                renewed.update(row[0] for row in rows)
        return renewed

    async def release_claims(self, owner: str, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        async with self._db.transaction() as transaction:
            for some in in_batches(job_ids):
                await transaction.execute(
                    "UPDATE jobs SET claim_owner = NULL, claim_expires = NULL"
                    f" WHERE claim_owner = ? AND job_id IN ({', '.join('?' * len(some))})",
                    (owner, *some),
                )

    async def unsettled_jobs(self, limit: int) -> list[gateway_pb2.RenderJob]:
        rows = await self._db.fetchall(
            "SELECT job FROM jobs WHERE unsettled > 0 ORDER BY position LIMIT ?", (limit,)
        )
        return [gateway_pb2.RenderJob.FromString(row[0]) for row in rows]

    async def held_jobs(self, limit: int, after: int) -> list[tuple[int, str]]:
        rows = await self._db.fetchall(
            "SELECT position, job_id FROM jobs WHERE held > 0 AND position > ? ORDER BY position LIMIT ?",
            (after, limit),
        )
        return [(row[0], row[1]) for row in rows]

    async def mark_settled(self, job_id: str, reservation_keys: Sequence[str]) -> gateway_pb2.RenderJob:
        async with self._db.transaction() as transaction:
            await transaction.lock(f"job:{job_id}")
            job = await self._load(transaction, job_id)
            if job is None:
                raise KeyError(job_id)
            for attempt in job.attempts:
                if attempt.reservation_key in reservation_keys and attempt.HasField("charge"):
                    attempt.settled = True
            written = await transaction.fetchone(
                "UPDATE jobs SET job = ?, unsettled = ?, held = ? WHERE job_id = ? RETURNING position",
                (job.SerializeToString(), *_outbox_counts(job), job_id),
            )
            if written is None:  # purged since it was read, as in _append
                raise KeyError(job_id)
        return job

    async def purge_ended(self, before: float, limit: int) -> int:
        # Ended before the cutoff (only an ended job has an end, and an end is final: no state condition,
        # which SQLite would read on jobs_dispatch, every ended job at every batch), its charges settled
        # and none held (money the ledger or a backend may still account for keeps its job). The
        # conditions again on the row deleted, which PostgreSQL checks anew on a row changed since the
        # selection. The newest job is kept: SQLite gives a new job the position after the largest
        # kept, and a position must never be given twice.
        purgeable = f"ended < ? AND {_PURGEABLE}"
        async with self._db.transaction() as transaction:
            await transaction.lock("jobs-purge")  # replicas purge one at a time, not the same rows
            rows = await transaction.fetchall(
                f"DELETE FROM jobs WHERE {purgeable} AND job_id IN (SELECT job_id FROM jobs WHERE {purgeable}"
                " AND position < (SELECT MAX(position) FROM jobs) ORDER BY ended LIMIT ?) RETURNING job_id",
                (before, before, limit),
            )
            job_ids = [row[0] for row in rows]
            for some in in_batches(job_ids):
                listed = ", ".join("?" * len(some))
                for table in ("job_events", "job_revisions"):
                    await transaction.execute(f"DELETE FROM {table} WHERE job_id IN ({listed})", tuple(some))
                # Their local videos, to delete unless a kept job names them too (looked at then).
                await transaction.execute(
                    "INSERT INTO unnamed_videos (uri) SELECT DISTINCT uri FROM job_videos"
                    f" WHERE job_id IN ({listed}) AND uri LIKE ? ON CONFLICT DO NOTHING",
                    (*some, "file:%"),
                )
                await transaction.execute(f"DELETE FROM job_videos WHERE job_id IN ({listed})", tuple(some))
        return len(job_ids)

    async def unnamed_videos(self, limit: int) -> list[str]:
        async with self._db.transaction() as transaction:
            await transaction.execute(f"DELETE FROM unnamed_videos WHERE {_NAMED}")
            rows = await transaction.fetchall("SELECT uri FROM unnamed_videos LIMIT ?", (limit,))
        return [row[0] for row in rows]

    async def forget_videos(self, uris: Sequence[str]) -> None:
        async with self._db.transaction() as transaction:
            for some in in_batches(uris):
                listed = ", ".join("?" * len(some))
                await transaction.execute(f"DELETE FROM unnamed_videos WHERE uri IN ({listed})", tuple(some))

    async def count_by_state(self, tenant_id: str) -> dict[int, int]:
        rows = await self._db.fetchall(
            "SELECT state, SUM(jobs) FROM tenant_job_figures WHERE tenant_id = ? GROUP BY state"
            " HAVING SUM(jobs) > 0",
            (tenant_id,),
        )
        return {state: int(count) for state, count in rows}

    async def close(self) -> None:
        await self._db.close()

    @staticmethod
    async def _insert_revision(
        transaction: Transaction, job_id: str, revision: gateway_pb2.PlanRevision
    ) -> None:
        await transaction.execute(
            "INSERT INTO job_revisions (job_id, plan_version, revision) VALUES (?, ?, ?)",
            (job_id, revision.plan_version, revision.SerializeToString()),
        )

    async def revisions(self, job_id: str) -> list[gateway_pb2.PlanRevision]:
        rows = await self._db.fetchall(
            "SELECT revision FROM job_revisions WHERE job_id = ? ORDER BY plan_version", (job_id,)
        )
        return [gateway_pb2.PlanRevision.FromString(row[0]) for row in rows]

    async def usage_figures(self, tenant_id: str) -> gateway_pb2.GetUsageResponse:
        rows = await self._db.fetchall(
            "SELECT state, SUM(reviewed), SUM(approved), SUM(quoted_micros), SUM(cost_micros)"
            " FROM tenant_job_figures WHERE tenant_id = ? GROUP BY state",
            (tenant_id,),
        )
        # Jobs created in review: one past review (queued or beyond) was approved, one still waiting
        # neither; a cancelled one was approved only if its log says so.
        approved = cancelled = quoted = actual = 0
        for state, reviewed, approved_in_review, quoted_micros, cost_micros in rows:
            if state in _PAST_REVIEW:
                approved += int(reviewed)
            elif state == job_pb2.JOB_STATE_CANCELLED:
                approved += int(approved_in_review)
                cancelled += int(reviewed) - int(approved_in_review)
            if state in _FINISHED:
                quoted += int(quoted_micros)
                actual += int(cost_micros)
        return gateway_pb2.GetUsageResponse(
            approval_rate=approved / (approved + cancelled) if approved + cancelled else 0.0,
            quoted_total={"currency_code": "USD", "amount_micros": quoted},
            actual_total={"currency_code": "USD", "amount_micros": actual},
        )
