"""A tenant's SLA tier, enforced: requests per minute, jobs queued or running at once, and what the tier
makes of a job's spec (its deadline, its quality floor, its longest duration).

Requests per minute are counted in the gateway's shared database (`aiprod_kit.database`: one SQLite file,
or PostgreSQL shared by every replica), one row per tenant, so that the limit holds in total across
replicas. A replica takes a lease of calls at a time (a twentieth of the limit, at least one; one lease
asked at a time per tenant, however many of its calls arrive together) in one atomic statement that
learns the new count, and spends it locally: a call costs no write, and the replicas together never
admit more than the limit (a lease another replica leaves unused can refuse a tenant a few calls
early, never admit one too many; with small limits the lease is one call, exact).
A tenant's window is a fixed minute that starts with its first call after the previous one ended, so a
burst is never split across two windows (and never gets twice the limit). A refused tenant is refused
here, without asking the database, until its window ends: counts only grow within a window.

Jobs at once are counted by the job store in the transaction that stores or approves the job, under the
tenant's lock (`SqlJobStore.create_job`, `append_event`'s max_unfinished); this module words the refusal.
"""

import asyncio
import math
import time
from collections.abc import Callable, Mapping

from google.protobuf import timestamp_pb2

from aiprod.common.v1 import render_pb2
from aiprod_gateway.tenancy import Tenant, tier_name
from aiprod_gateway.tiers import TierPolicy
from aiprod_kit.database import Database
from aiprod_kit.errors import ErrorReason, InvalidArgument, ResourceExhausted

# The length of a rate window, in seconds.
WINDOW_SECONDS = 60.0
# What a refusal for too many jobs at once asks the caller to wait: jobs take longer than this to end,
# but a cancel or an end elsewhere may free a place at any time.
CONCURRENCY_RETRY_SECONDS = 5.0

_SCHEMAS = {
    "sqlite": """
CREATE TABLE IF NOT EXISTS tenant_requests (
    tenant_id TEXT PRIMARY KEY,
    window_start REAL NOT NULL,
    requests INTEGER NOT NULL
) WITHOUT ROWID;
""",
    "postgresql": """
CREATE TABLE IF NOT EXISTS tenant_requests (
    tenant_id TEXT PRIMARY KEY,
    window_start DOUBLE PRECISION NOT NULL,
    requests BIGINT NOT NULL
);
""",
}

# One statement: the tenant's count in its current window, one more, a new window if the last one ended.
# In SET, both CASEs read the row as it was.
_COUNT = """
INSERT INTO tenant_requests (tenant_id, window_start, requests) VALUES (?, ?, ?)
ON CONFLICT (tenant_id) DO UPDATE SET
    requests = CASE WHEN tenant_requests.window_start <= ? THEN excluded.requests
        ELSE tenant_requests.requests + excluded.requests END,
    window_start = CASE WHEN tenant_requests.window_start <= ?
        THEN excluded.window_start ELSE tenant_requests.window_start END
RETURNING window_start, requests
"""


class RequestLimiter:
    """Each tenant's calls a minute, at most its tier's requests_per_minute, across every replica on the
    database."""

    def __init__(
        self,
        database: Database,
        tiers: Mapping[int, TierPolicy],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = database
        self._tiers = tiers
        self._clock = clock
        # Tenants refused in their current window: until when, on this replica's clock.
        self._exhausted: dict[str, float] = {}
        # Calls leased from the shared count and not spent yet: (when the window ends, how many).
        self._leases: dict[str, tuple[float, int]] = {}
        # Per tenant, held while a lease is asked for.
        self._leasing: dict[str, asyncio.Lock] = {}

    @classmethod
    async def open(
        cls, database: Database, tiers: Mapping[int, TierPolicy], clock: Callable[[], float] = time.time
    ) -> "RequestLimiter":
        """Creates its table if needed. clock: seconds since the epoch (replicas' clocks kept by NTP)."""
        await database.create_schema(_SCHEMAS)
        return cls(database, tiers, clock)

    async def admit(self, tenant: Tenant) -> None:
        """Counts one call of the tenant; RESOURCE_EXHAUSTED (RATE_LIMITED, with a RetryInfo until its
        window ends) when its tier's requests a minute are spent."""
        if self._spend(tenant):
            return
        # One lease asked at a time per tenant: calls arriving together while none is left wait for
        # that one rather than each asking its own and dropping the others (which spent the tenant's
        # minute in leases nobody used, and refused it after a burst of a few dozen calls).
        lock = self._leasing.setdefault(tenant.tenant_id, asyncio.Lock())
        async with lock:
            if self._spend(tenant):
                return
            await self._lease(tenant)

    def _spend(self, tenant: Tenant) -> bool:
        """Spends one call of the tenant's lease: True if there was one; raises while it is refused."""
        now = self._clock()
        window_end = self._exhausted.get(tenant.tenant_id)
        if window_end is not None:
            if now < window_end:
                raise _rate_limited(tenant, self._tiers[tenant.tier], window_end - now)
            del self._exhausted[tenant.tenant_id]
        lease_end, leased = self._leases.get(tenant.tenant_id, (0.0, 0))
        if leased > 0 and now < lease_end:
            self._leases[tenant.tenant_id] = (lease_end, leased - 1)
            return True
        return False

    async def _lease(self, tenant: Tenant) -> None:
        """Takes a lease from the shared count and spends one call of it; raises when none is left."""
        policy = self._tiers[tenant.tier]
        now = self._clock()
        limit = int(policy.requests_per_minute)
        asked = max(1, limit // 20)
        async with self._db.transaction() as transaction:
            row = await transaction.fetchone(
                _COUNT, (tenant.tenant_id, now, asked, now - WINDOW_SECONDS, now - WINDOW_SECONDS)
            )
        assert row is not None
        window_start, requests = float(row[0]), int(row[1])
        window_end = window_start + WINDOW_SECONDS
        granted = max(0, min(asked, limit - (requests - asked)))
        if granted == 0:
            self._leases.pop(tenant.tenant_id, None)
            self._exhausted[tenant.tenant_id] = window_end
            raise _rate_limited(tenant, policy, window_end - now)
        self._leases[tenant.tenant_id] = (window_end, granted - 1)


def _rate_limited(tenant: Tenant, policy: TierPolicy, retry_after: float) -> ResourceExhausted:
    limit = _figure(policy.requests_per_minute)
    return ResourceExhausted(
        f"tenant {tenant.tenant_id} made its {limit} calls this minute (tier {tier_name(tenant.tier)}); "
        f"try again in {math.ceil(retry_after)} s",
        reason=ErrorReason.RATE_LIMITED,
        metadata={"limit": limit, "tier": tier_name(tenant.tier)},
        retry_after=max(retry_after, 0.0),
    )


def too_many_jobs(tenant: Tenant, policy: TierPolicy) -> ResourceExhausted:
    """The refusal of a job that would pass the tenant's jobs queued or running at once."""
    limit = _figure(policy.concurrent_jobs)
    return ResourceExhausted(
        f"tenant {tenant.tenant_id} has {limit} jobs queued or running, as many as tier "
        f"{tier_name(tenant.tier)} allows; try again once one ends",
        reason=ErrorReason.CONCURRENCY_LIMIT,
        metadata={"limit": limit, "tier": tier_name(tenant.tier)},
        retry_after=CONCURRENCY_RETRY_SECONDS,
    )


def apply_tier(
    spec: render_pb2.RenderSpec, tier: int, policy: TierPolicy, now: timestamp_pb2.Timestamp
) -> render_pb2.RenderSpec:
    """The (normalized) spec under the tenant's tier: its deadline the tier's latency from now unless it
    asks for a sooner one, its quality floor at least the tier's minimum; INVALID_ARGUMENT naming the
    tier when its duration is longer than the tier allows."""
    if spec.duration_seconds > policy.max_duration_seconds:
        raise InvalidArgument(
            [
                (
                    "spec.duration_seconds",
                    f"must be at most {policy.max_duration_seconds:g} s for tier {tier_name(tier)}, "
                    f"not {spec.duration_seconds:g}",
                )
            ],
            metadata={"tier": tier_name(tier), "max_duration_seconds": f"{policy.max_duration_seconds:g}"},
        )
    applied = render_pb2.RenderSpec()
    applied.CopyFrom(spec)
    constraints = applied.constraints
    deadline = timestamp_pb2.Timestamp()
    deadline.FromNanoseconds(now.ToNanoseconds() + round(policy.latency_seconds * 1e9))
    if (
        not constraints.HasField("deadline")
        or deadline.ToNanoseconds() < constraints.deadline.ToNanoseconds()
    ):
        constraints.deadline.CopyFrom(deadline)
    constraints.quality_floor = max(constraints.quality_floor, policy.quality_minimum)
    return applied


def _figure(value: float) -> str:
    """A configured figure as people write it: 10, not 10.0."""
    return f"{value:g}"
