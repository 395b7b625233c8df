"""The event store's contract (what alerts and SLOs are computed from, and where each alert condition
stands), run against every implementation: SQLite and PostgreSQL."""

import asyncio
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
