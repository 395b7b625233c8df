"""SLA tier limits: requests a minute per tenant, counted atomically on the shared database (SQLite and
PostgreSQL, several limiters on one database as several replicas would be); the refusals' ErrorInfo and
RetryInfo; what a tier makes of a job's spec."""

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from google.protobuf import timestamp_pb2

from aiprod.common.v1 import render_pb2
from aiprod.gateway.v1 import admin_pb2
from aiprod_gateway.limits import (
    CONCURRENCY_RETRY_SECONDS,
    WINDOW_SECONDS,
    RequestLimiter,
    apply_tier,
    too_many_jobs,
)
from aiprod_gateway.tenancy import Tenant
from aiprod_gateway.tiers import DEFAULT_TIERS, TierPolicy
from aiprod_kit.database import SqliteDatabase
from aiprod_kit.errors import ErrorReason, InvalidArgument, ResourceExhausted

BRONZE = Tenant("team-a", admin_pb2.SLA_TIER_BRONZE, 0)
GOLD = Tenant("team-b", admin_pb2.SLA_TIER_GOLD, 0)
# 400 calls a minute: leases of 20.
PLATINUM = Tenant("team-c", admin_pb2.SLA_TIER_PLATINUM, 0)
TIERS = {
    **DEFAULT_TIERS,
    admin_pb2.SLA_TIER_BRONZE: TierPolicy(300, 0.6, 0.7, 2, 3, 30),
    admin_pb2.SLA_TIER_GOLD: TierPolicy(900, 0.7, 0.8, 10, 5, 120),
    admin_pb2.SLA_TIER_PLATINUM: TierPolicy(600, 0.6, 0.7, 5, 400, 60),
}

OpenLimiter = Callable[..., Awaitable[RequestLimiter]]


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def open_limiter(open_database) -> OpenLimiter:
    """Opens a limiter on the one database: another connection each call, as another replica's."""

    async def open_one(clock: Callable[[], float] = time.time) -> RequestLimiter:
        return await RequestLimiter.open(await open_database("jobs", private=True), TIERS, clock)

    return open_one


async def outcomes(limiter: RequestLimiter, tenant: Tenant, calls: int) -> list[ResourceExhausted | None]:
    results: list[ResourceExhausted | None] = []
    for _ in range(calls):
        try:
            await limiter.admit(tenant)
            results.append(None)
        except ResourceExhausted as error:
            results.append(error)
    return results


async def test_a_tenant_gets_its_tiers_calls_a_minute_then_a_refusal_until_its_window_ends(open_limiter):
    clock = Clock()
    limiter = await open_limiter(clock)
    assert await outcomes(limiter, BRONZE, 3) == [None] * 3
    clock.now += 20
    (refused,) = await outcomes(limiter, BRONZE, 1)
    assert refused is not None
    assert refused.reason == ErrorReason.RATE_LIMITED
    assert refused.metadata == {"limit": "3", "tier": "BRONZE"}
    # The window began with the first call: 40 s of it are left.
    assert refused.retry_after == pytest.approx(WINDOW_SECONDS - 20)
    assert [detail.TypeName() for detail in refused.details()] == [
        "google.rpc.ErrorInfo",
        "google.rpc.RetryInfo",
    ]
    assert "team-a" in refused.message and "BRONZE" in refused.message
    # Another tenant, another tier: its own count.
    assert await outcomes(limiter, GOLD, 5) == [None] * 5
    assert (await outcomes(limiter, GOLD, 1))[0] is not None
    # Once the window has ended, a new one.
    clock.now += WINDOW_SECONDS - 20
    results = await outcomes(limiter, BRONZE, 4)
    assert results[:3] == [None] * 3 and results[3] is not None
    assert results[3].retry_after == pytest.approx(WINDOW_SECONDS)


async def test_the_limit_holds_in_total_across_replicas_calling_at_once(open_limiter):
    clock = Clock()
    replicas = [await open_limiter(clock) for _ in range(3)]
    calls = [replica.admit(BRONZE) for replica in replicas for _ in range(4)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    admitted = [result for result in results if result is None]
    refused = [result for result in results if isinstance(result, ResourceExhausted)]
    assert (len(admitted), len(refused)) == (3, 9), results
    assert {error.reason for error in refused} == {ErrorReason.RATE_LIMITED}
    # A replica that never refused the tenant itself still counts the others' calls.
    fresh = await open_limiter(clock)
    assert (await outcomes(fresh, BRONZE, 1))[0] is not None


async def test_a_burst_of_calls_at_once_gets_the_whole_limit_on_one_replica(open_limiter):
    # Forty calls arriving together once asked forty leases of 20 and kept the last: the tenant was
    # refused after 20 of them, its minute spent in leases nobody used.
    clock = Clock()
    limiter = await open_limiter(clock)
    burst = await asyncio.gather(*(limiter.admit(PLATINUM) for _ in range(40)), return_exceptions=True)
    assert burst == [None] * 40
    # The rest of the minute's calls, one by one: exactly the limit in all, then a refusal.
    rest = await outcomes(limiter, PLATINUM, 361)
    assert rest[:360] == [None] * 360 and rest[360] is not None
    assert rest[360].reason == ErrorReason.RATE_LIMITED


async def test_a_refused_tenant_is_refused_without_the_database_until_its_window_ends(tmp_path):
    clock = Clock()
    database = SqliteDatabase(tmp_path / "jobs.sqlite3", "jobs", private=True)
    limiter = await RequestLimiter.open(database, TIERS, clock)
    await outcomes(limiter, BRONZE, 4)
    await database.close()  # a query now would fail
    (refused,) = await outcomes(limiter, BRONZE, 1)
    assert refused is not None and refused.reason == ErrorReason.RATE_LIMITED


def test_too_many_jobs_names_the_limit_and_tier_and_when_to_try_again():
    error = too_many_jobs(BRONZE, TIERS[admin_pb2.SLA_TIER_BRONZE])
    assert error.reason == ErrorReason.CONCURRENCY_LIMIT
    assert error.metadata == {"limit": "2", "tier": "BRONZE"}
    assert error.retry_after == CONCURRENCY_RETRY_SECONDS
    assert error.code.name == "RESOURCE_EXHAUSTED"


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def spec(duration: float = 8, floor: float = 0.6, deadline: float | None = None) -> render_pb2.RenderSpec:
    made = render_pb2.RenderSpec(prompt="a lighthouse", preset="quick_social", duration_seconds=duration)
    made.constraints.quality_floor = floor
    if deadline is not None:
        made.constraints.deadline.CopyFrom(timestamp(deadline))
    return made


NOW = 1_800_000_000.0


def test_the_tiers_latency_is_the_deadline_unless_the_request_asks_sooner():
    gold = TIERS[admin_pb2.SLA_TIER_GOLD]
    applied = apply_tier(spec(), admin_pb2.SLA_TIER_GOLD, gold, timestamp(NOW))
    assert applied.constraints.deadline == timestamp(NOW + 900)
    sooner = apply_tier(spec(deadline=NOW + 60), admin_pb2.SLA_TIER_GOLD, gold, timestamp(NOW))
    assert sooner.constraints.deadline == timestamp(NOW + 60)
    later = apply_tier(spec(deadline=NOW + 3600), admin_pb2.SLA_TIER_GOLD, gold, timestamp(NOW))
    assert later.constraints.deadline == timestamp(NOW + 900)


def test_the_tiers_quality_minimum_is_the_floor_at_least():
    platinum = DEFAULT_TIERS[admin_pb2.SLA_TIER_PLATINUM]
    raised = apply_tier(spec(floor=0.6), admin_pb2.SLA_TIER_PLATINUM, platinum, timestamp(NOW))
    assert raised.constraints.quality_floor == 0.9
    bronze = TIERS[admin_pb2.SLA_TIER_BRONZE]
    kept = apply_tier(spec(floor=0.8), admin_pb2.SLA_TIER_BRONZE, bronze, timestamp(NOW))
    assert kept.constraints.quality_floor == 0.8
    original = spec(floor=0.6)
    apply_tier(original, admin_pb2.SLA_TIER_PLATINUM, platinum, timestamp(NOW))
    assert original.constraints.quality_floor == 0.6  # a copy, the caller's spec untouched


def test_a_duration_over_the_tiers_maximum_is_invalid_naming_the_tier():
    bronze = TIERS[admin_pb2.SLA_TIER_BRONZE]
    assert apply_tier(spec(duration=30), admin_pb2.SLA_TIER_BRONZE, bronze, timestamp(NOW))
    with pytest.raises(InvalidArgument) as raised:
        apply_tier(spec(duration=31), admin_pb2.SLA_TIER_BRONZE, bronze, timestamp(NOW))
    assert raised.value.violations == [
        ("spec.duration_seconds", "must be at most 30 s for tier BRONZE, not 31")
    ]
    assert raised.value.metadata["tier"] == "BRONZE"


async def test_a_replica_leases_calls_in_batches_and_replicas_never_admit_more_than_the_limit(open_limiter):
    """With a limit of 100, a replica takes 5 calls at a time: 100 calls cost it 20 counts, not 100; and
    two replicas sharing the count admit at most the limit together."""
    tiers = {**TIERS, admin_pb2.SLA_TIER_GOLD: TierPolicy(900, 0.7, 0.8, 10, 100, 120)}
    clock = Clock()
    first, second = await open_limiter(clock), await open_limiter(clock)
    first._tiers = second._tiers = tiers
    writes = 0
    count = first._db.transaction

    def counting_transaction(*args, **kwargs):
        nonlocal writes
        writes += 1
        return count(*args, **kwargs)

    first._db.transaction = counting_transaction  # type: ignore[method-assign]
    assert await outcomes(first, GOLD, 60) == [None] * 60
    assert writes == 12
    results = await outcomes(second, GOLD, 60) + await outcomes(first, GOLD, 10)
    admitted = results.count(None)
    assert 60 + admitted <= 100
    assert 60 + admitted >= 100 - 5  # at most the other replica's unspent lease is lost
