"""The event store's contract (what alerts and SLOs are computed from, and where each alert condition
stands), run against every implementation: SQLite and PostgreSQL."""

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from aiprod.common.v1 import backend_pb2, job_pb2
from aiprod_metrics.events import BackendError, EventStore, JobOutcome, Share, SqlEventStore

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
SUCCEEDED, FAILED = job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED
RUNWAY, VEO = backend_pb2.BACKEND_RUNWAY, backend_pb2.BACKEND_VEO

OpenStore = Callable[[], Awaitable[EventStore]]


@pytest.fixture
def open_store(open_database) -> OpenStore:
    """Opens a store on the one database: another connection each call, as another replica would have."""

    async def open_one() -> EventStore:
        return await SqlEventStore.open(await open_database("events"))

    return open_one


@pytest.fixture
async def store(open_store: OpenStore) -> EventStore:
    return await open_store()


def outcome(
    job_id: str, ago: timedelta, state: int = SUCCEEDED, qc: float | None = 0.9, seconds: float | None = 60
) -> JobOutcome:
    return JobOutcome(job_id, NOW - ago, RUNWAY, state, qc, seconds, 250_000)


async def test_outcomes_feed_quality_durations_and_shares(store):
    await store.record(
        [
            outcome("a", timedelta(minutes=1), qc=0.9, seconds=100),
            outcome("b", timedelta(minutes=2), qc=0.3, seconds=2000),
            outcome("c", timedelta(minutes=3), state=FAILED, qc=None, seconds=30),
            outcome("d", 2 * HOUR, qc=0.1, seconds=5000),  # outside the windows below
            outcome("e", timedelta(minutes=4), qc=0.6, seconds=None),
        ],
        [],
    )
    since = NOW - HOUR
    count, mean = await store.quality(since, SUCCEEDED)
    assert (count, mean) == (3, pytest.approx(0.6))
    assert await store.durations(since) == [30, 100, 2000]
    assert await store.latency_share(since, 900) == Share(good=2, total=3)
    assert await store.quality_share(since, SUCCEEDED, 0.6) == Share(good=2, total=3)
    assert await store.quality(NOW, SUCCEEDED) == (0, 0)
    assert await store.latency_share(NOW, 900) == Share(0, 0)


async def test_a_batch_sent_again_counts_once(store):
    batch = [outcome("a", timedelta(minutes=1)), outcome("b", timedelta(minutes=1))]
    errors = [BackendError("a", NOW - timedelta(minutes=1), RUNWAY, "PROVIDER_ERROR")]
    await store.record(batch, errors)
    await store.record(batch, errors)
    # Without a job id, nothing to deduplicate on: each counts.
    await store.record([outcome("", timedelta(minutes=1))] * 2, [])
    assert (await store.quality(NOW - HOUR, SUCCEEDED))[0] == 4
    assert await store.error_counts(NOW - HOUR) == {RUNWAY: 1}


async def test_errors_count_per_backend_in_the_window_and_prune_forgets(store):
    await store.record(
        [outcome("old", 3 * HOUR)],
        [
            BackendError("a", NOW - timedelta(minutes=5), RUNWAY, "PROVIDER_ERROR"),
            BackendError("b", NOW - timedelta(minutes=6), RUNWAY, "TIMEOUT"),
            BackendError("c", NOW - 2 * HOUR, VEO, "PROVIDER_ERROR"),
        ],
    )
    # A backend with only older errors kept is listed with 0: its alert can resolve.
    assert await store.error_counts(NOW - HOUR) == {RUNWAY: 2, VEO: 0}
    await store.prune(NOW - HOUR)
    assert await store.error_counts(NOW - HOUR) == {RUNWAY: 2}
    assert await store.durations(NOW - 4 * HOUR) == []


async def test_conditions_keep_since_when_they_hold(store):
    key, errors = ("mean_quality_low", 0), ("backend_errors_high", RUNWAY)
    first = await store.track_conditions({key: False, errors: True}, NOW)
    assert (first[key].firing, first[key].since, first[key].previous) == (False, NOW, None)
    assert (first[errors].firing, first[errors].previous, first[errors].changed) == (True, None, True)
    later = await store.track_conditions({key: True, errors: True}, NOW + HOUR)
    assert (later[key].since, later[key].previous, later[key].changed) == (NOW + HOUR, False, True)
    assert (later[errors].since, later[errors].changed) == (NOW, False)
    # Only the conditions asked about are answered; the others keep their state.
    again = await store.track_conditions({key: True}, NOW + 2 * HOUR)
    assert set(again) == {key} and again[key].since == NOW + HOUR
    assert (await store.track_conditions({errors: True}, NOW + 3 * HOUR))[errors].since == NOW


async def test_conditions_survive_reopening_and_replicas_agree(open_store):
    key = ("job_latency_p95_high", 0)
    first = await open_store()
    await first.track_conditions({key: True}, NOW)
    await first.close()
    replicas = [await open_store(), await open_store()]
    # Both replicas see the condition resolve at about the same time: one records it, both report it.
    seen = await asyncio.gather(
        *(replicas[n % 2].track_conditions({key: False}, NOW + timedelta(seconds=n + 1)) for n in range(6))
    )
    assert [answer[key].changed for answer in seen].count(True) == 1
    assert len({answer[key].since for answer in seen}) == 1
    assert (await replicas[0].track_conditions({key: False}, NOW + HOUR))[key].since == seen[0][key].since


LATENCY_UNDER, QUALITY_AT_LEAST = 900.0, 0.6


def drawn_outcomes(seed: int, count: int, hours: int) -> list[JobOutcome]:
    """Outcomes over the last hours, some exactly on an hour or on a threshold, some without a duration
    or a score, of three states."""
    draw = random.Random(seed)
    outcomes = []
    for index in range(count):
        ago = timedelta(seconds=draw.choice([draw.uniform(0, hours * 3600), 3600 * draw.randint(0, hours)]))
        state = draw.choice([SUCCEEDED, SUCCEEDED, FAILED, job_pb2.JOB_STATE_CANCELLED])
        qc = draw.choice([None, QUALITY_AT_LEAST, round(draw.random(), 2)]) if state == SUCCEEDED else None
        seconds = draw.choice([None, LATENCY_UNDER, draw.uniform(10, 2000)])
        outcomes.append(outcome(f"job{index}", ago, state=state, qc=qc, seconds=seconds))
    return outcomes


def recorded(*batches: list[JobOutcome]) -> list[JobOutcome]:
    """The outcomes a store keeps of these batches: the first of each job and state."""
    kept: dict[tuple[str, int], JobOutcome] = {}
    for batch in batches:
        for one in batch:
            kept.setdefault((one.job_id, one.state), one)
    return list(kept.values())


def counted(
    outcomes: list[JobOutcome],
    since: datetime,
    under: float = LATENCY_UNDER,
    at_least: float = QUALITY_AT_LEAST,
) -> tuple[Share, Share]:
    """The SLO shares since then, counted here one outcome at a time."""
    timed = [o for o in outcomes if o.time >= since and o.duration_seconds is not None]
    scored = [o for o in outcomes if o.time >= since and o.state == SUCCEEDED]
    return (
        Share(sum(o.duration_seconds < under for o in timed), len(timed)),
        Share(sum(o.qc_score is not None and o.qc_score >= at_least for o in scored), len(scored)),
    )


async def shares(
    store: EventStore, since: datetime, under: float = LATENCY_UNDER, at_least: float = QUALITY_AT_LEAST
) -> tuple[Share, Share]:
    return await store.latency_share(since, under), await store.quality_share(since, SUCCEEDED, at_least)


def windows(hours: int) -> list[datetime]:
    """Windows starting on an hour, within one, a microsecond either side of one, and before them all."""
    starts = [NOW - hours * HOUR - HOUR, NOW + HOUR]
    for hour in range(hours + 1):
        on = NOW - hour * HOUR
        starts += [
            on,
            on - timedelta(minutes=17),
            on - timedelta(microseconds=1),
            on + timedelta(microseconds=1),
        ]
    return starts


async def test_slo_shares_read_from_hours_count_every_outcome_once(store):
    """Counted by hour, every window's shares are those of the outcomes themselves."""
    await store.keep_slo_counts(LATENCY_UNDER, QUALITY_AT_LEAST)
    outcomes = drawn_outcomes(seed=7, count=300, hours=30)
    # In batches, one sent twice: an outcome recorded again counts once in the hours too.
    for first in range(0, len(outcomes), 50):
        await store.record(outcomes[first : first + 50], [])
    await store.record(outcomes[:50], [])
    for since in windows(30):
        assert await shares(store, since) == counted(outcomes, since), since
    # Other thresholds than those kept are counted from the outcomes.
    since = NOW - timedelta(hours=5, minutes=30)
    assert await shares(store, since, 100.0, 0.9) == counted(outcomes, since, 100.0, 0.9)
    # Forgetting the older outcomes leaves the windows after them as they were.
    forgotten = NOW - timedelta(hours=10, minutes=30)
    await store.prune(forgotten)
    for since in (since for since in windows(10) if since >= forgotten):
        assert await shares(store, since) == counted(outcomes, since), since


async def test_slo_counts_by_hour_start_from_the_outcomes_kept(open_store):
    """Outcomes recorded before the counts were kept, or kept for other thresholds, are counted again;
    a replica still asking with the old thresholds counts the outcomes themselves."""
    first = await open_store()
    before = drawn_outcomes(seed=3, count=120, hours=12)
    await first.record(before, [])
    await first.keep_slo_counts(100.0, 0.9)
    after = drawn_outcomes(seed=4, count=120, hours=12)[60:]  # some of the same jobs: kept once
    await first.record(after, [])
    restarted = await open_store()
    await restarted.keep_slo_counts(LATENCY_UNDER, QUALITY_AT_LEAST)
    outcomes = recorded(before, after)
    for since in windows(12):
        assert await shares(restarted, since) == counted(outcomes, since), since
        assert await shares(first, since, 100.0, 0.9) == counted(outcomes, since, 100.0, 0.9), since


async def test_whole_hours_are_read_from_their_counts(store, open_database):
    """The counts kept by hour are each hour's and state's, and a share reads them, not the outcomes:
    outcomes deleted under the store (no trigger sees it) still count in their whole hours."""
    await store.keep_slo_counts(LATENCY_UNDER, QUALITY_AT_LEAST)
    outcomes = drawn_outcomes(seed=11, count=200, hours=6)
    await store.record(outcomes, [])
    database = await open_database("events")
    expected: dict[tuple[int, int], list[int]] = {}
    for one in outcomes:
        hour = int((one.time - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()) // 3600
        counts = expected.setdefault((hour, one.state), [0, 0, 0, 0])
        counts[0] += 1
        counts[1] += one.duration_seconds is not None
        counts[2] += one.duration_seconds is not None and one.duration_seconds < LATENCY_UNDER
        counts[3] += one.qc_score is not None and one.qc_score >= QUALITY_AT_LEAST
    rows = await database.fetchall("SELECT hour, state, outcomes, timed, fast, scored FROM job_outcome_hours")
    assert {(hour, state): list(counts) for hour, state, *counts in rows} == expected
    since = NOW - timedelta(hours=5, minutes=30)
    before = await shares(store, since)
    async with database.transaction() as transaction:
        await transaction.execute(
            "DELETE FROM job_outcomes WHERE time >= ?", (int(NOW.timestamp()) * 10**6 - 3 * 3600 * 10**6,)
        )
    assert await shares(store, since) == before
    # Other thresholds than those kept read the outcomes left.
    assert await shares(store, since, 100.0, 0.9) == counted(
        [o for o in outcomes if o.time < NOW - 3 * HOUR], since, 100.0, 0.9
    )


async def test_replicas_recording_the_same_hours_at_once_all_succeed(open_store):
    """On PostgreSQL an hour's counts are locked by their writer until it commits: batches of two
    replicas writing the same hours' counts at once, in opposite orders or one part of the other, must
    not deadlock."""
    first, second = await open_store(), await open_store()
    await first.keep_slo_counts(LATENCY_UNDER, QUALITY_AT_LEAST)
    recorded_outcomes = []
    for round_ in range(150):
        one = [outcome(f"x{round_}", HOUR), outcome(f"y{round_}", HOUR, state=FAILED, qc=None)]
        two = [outcome(f"z{round_}", HOUR, state=FAILED, qc=None), outcome(f"w{round_}", HOUR)]
        await asyncio.gather(first.record(one, []), second.record(two, []))
        recorded_outcomes += one + two
    # A batch and part of it (the other replica's): its keys and their hour's counts.
    for round_ in range(30):
        batch = [outcome(f"b{round_}-{n}", HOUR) for n in range(60)]
        await asyncio.gather(first.record(batch, []), second.record(batch[30:], []))
        recorded_outcomes += batch
    assert await shares(second, NOW - 2 * HOUR) == counted(recorded_outcomes, NOW - 2 * HOUR)


async def test_an_outcome_before_1970_counts_in_its_own_hour(store):
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    await store.keep_slo_counts(LATENCY_UNDER, QUALITY_AT_LEAST)
    await store.record(
        [JobOutcome("early", epoch - timedelta(minutes=30), RUNWAY, SUCCEEDED, 0.9, 60, 0)], []
    )
    assert await shares(store, epoch) == (Share(0, 0), Share(0, 0))
    assert await shares(store, epoch - HOUR) == (Share(1, 1), Share(1, 1))
