"""The job store's contract, run against every implementation: SQLite and PostgreSQL."""

import asyncio
import contextlib
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable

import pytest

from aiprod.common.v1 import event_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_gateway.store import (
    EVENTS_CHANNEL,
    ClaimLost,
    Entry,
    JobStore,
    RequestIdConflict,
    SqlJobStore,
    TooManyUnfinished,
)
from aiprod_kit.database import SqliteDatabase

OpenStore = Callable[..., Awaitable[JobStore]]
LEASE = 30.0


class Clock:
    """Seconds since the epoch, moved by the test: leases run out without waiting for them."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def open_store(open_database) -> OpenStore:
    """Opens a store on the one database: another connection each call, as another replica would have."""

    async def open_one(clock: Callable[[], float] = time.time) -> JobStore:
        # As the gateway opens it: a file of its own, used from the event loop.
        return await SqlJobStore.open(await open_database("jobs", private=True), clock)

    return open_one


@pytest.fixture
async def store(open_store: OpenStore) -> JobStore:
    return await open_store()


def job(job_id: str, request_id: str, state: int = job_pb2.JOB_STATE_QUEUED) -> gateway_pb2.RenderJob:
    return gateway_pb2.RenderJob(job_id=job_id, request_id=request_id, state=state, tenant_id="acme")


def set_state(state: int):
    def update(job: gateway_pb2.RenderJob) -> None:
        job.state = state

    return update


async def test_create_is_idempotent_on_request_id(store):
    created, fresh = await store.create_job(job("job_a", "r1"), "fingerprint-1")
    again, fresh_again = await store.create_job(job("job_b", "r1"), "fingerprint-1")
    assert (fresh, fresh_again) == (True, False)
    assert again.job_id == created.job_id == "job_a"
    with pytest.raises(RequestIdConflict):
        await store.create_job(job("job_c", "r1"), "fingerprint-2")
    assert await store.get_job("job_c") is None


async def test_events_are_numbered_and_applied_atomically(store):
    await store.create_job(job("job_a", "r1"), "f")
    await store.append_event("job_a", "running", set_state(job_pb2.JOB_STATE_RUNNING))

    def failing(job: gateway_pb2.RenderJob) -> None:
        job.state = job_pb2.JOB_STATE_FAILED
        raise ValueError("refused")

    with pytest.raises(ValueError):
        await store.append_event("job_a", "never", failing)
    stored = await store.get_job("job_a")
    assert stored.state == job_pb2.JOB_STATE_RUNNING
    assert stored.last_sequence == 2
    assert [e.sequence for e in await store.events_after("job_a", 0)] == [1, 2]


async def test_a_watch_starts_from_the_job_and_its_log_as_one_read_saw_them(store, monkeypatch):
    """A watch's start: the job with its events after the sequence asked; nothing for a job that does
    not exist or is another tenant's; an ended job watched past its end ends at once, read once."""
    await store.create_job(job("job_a", "r1"), "f")  # acme's
    for state in (job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_SUCCEEDED):
        await store.append_event("job_a", "next", set_state(state))

    read, events = await store.job_and_events_after("job_a", 1, "acme")
    assert (read.job_id, read.state, read.last_sequence) == ("job_a", job_pb2.JOB_STATE_SUCCEEDED, 3)
    assert [event.sequence for event in events] == [2, 3]
    read, events = await store.job_and_events_after("job_a", 3)
    assert (read.job_id, events) == ("job_a", [])
    assert await store.job_and_events_after("job_a", 0, "other") == (None, [])
    assert await store.job_and_events_after("job_missing", 0) == (None, [])

    async def unread(*arguments):
        raise AssertionError("the job was read again")

    monkeypatch.setattr(store, "get_job", unread)
    monkeypatch.setattr(store, "events_after", unread)
    async with store.watching("job_a", 3, "acme") as (read, events):
        assert read.state == job_pb2.JOB_STATE_SUCCEEDED
        assert [event async for event in events] == []


def following(store: SqlJobStore, job_id: str) -> "asyncio.Task[list[int]]":
    """A watch of the job from its start, running: the sequences it yields, once it ends."""

    async def follow() -> list[int]:
        async with store.watching(job_id, 0) as (_, events):
            return [event.sequence async for event in events]

    return asyncio.create_task(follow())


async def test_watch_replays_then_follows_until_terminal(store):
    await store.create_job(job("job_a", "r1"), "f")

    watcher = following(store, "job_a")
    await store.append_event("job_a", "running", set_state(job_pb2.JOB_STATE_RUNNING))
    await store.append_event("job_a", "done", set_state(job_pb2.JOB_STATE_SUCCEEDED))
    assert await asyncio.wait_for(watcher, 5) == [1, 2, 3]


async def test_a_watcher_is_handed_what_its_process_appends_without_reading_the_log(store, monkeypatch):
    await store.create_job(job("job_a", "r1"), "f")
    reads = []

    def counted(name: str):
        read = getattr(store, name)

        async def reading(*arguments):
            reads.append((name, *arguments[1:2]))
            return await read(*arguments)

        monkeypatch.setattr(store, name, reading)

    for name in ("job_and_events_after", "events_after", "get_job"):
        counted(name)
    seen: list[int] = []

    async def follow() -> None:
        async with store.watching("job_a", 0) as (_, events):
            async for event in events:
                seen.append(event.sequence)

    watcher = asyncio.create_task(follow())
    await asyncio.sleep(0)  # the watcher reads the log once, then waits for news
    for n in range(4):
        await store.append_event("job_a", f"progress {n}", set_state(job_pb2.JOB_STATE_RUNNING))
    await asyncio.gather(*(store.append_event("job_a", "more", lambda job: None) for _ in range(3)))
    await store.append_event("job_a", "done", set_state(job_pb2.JOB_STATE_SUCCEEDED))
    await asyncio.wait_for(watcher, 5)
    assert seen == list(range(1, 10))
    assert reads == [("job_and_events_after", 0)]  # the job and its log, in one read at the start


@pytest.mark.parametrize("open_database", ["postgres"], indirect=True)
async def test_a_watcher_reads_the_log_for_what_another_replica_appended_between_its_own(open_store):
    watching, appending = await open_store(), await open_store()
    await watching.create_job(job("job_a", "r1"), "f")

    watcher = following(watching, "job_a")
    await asyncio.sleep(0.2)  # the watcher is waiting for news
    await appending.append_event("job_a", "elsewhere", set_state(job_pb2.JOB_STATE_RUNNING))
    await watching.append_event("job_a", "here", lambda job: None)
    await appending.append_event("job_a", "elsewhere again", lambda job: None)
    await watching.append_event("job_a", "done here", set_state(job_pb2.JOB_STATE_SUCCEEDED))
    assert await asyncio.wait_for(watcher, 5) == [1, 2, 3, 4, 5]


async def test_listing_by_several_states_pages_through_each_of_them_newest_first(store):
    """Jobs of several states, a tenant's own only, newest first, page after page, whatever the page's
    size and however the states are named (a state named twice counts once)."""
    draw = random.Random(5)
    states = [job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_SUCCEEDED]
    made = []
    for n in range(60):
        one = job(f"job_{n}", f"r{n}", draw.choice(states))
        one.tenant_id = draw.choice(["acme", "acme", "other"])
        await store.create_job(one, "f")
        made.append(one)
    for asked in ([states[0], states[2]], [states[1], states[0], states[1]], states):
        expected = [j.job_id for j in reversed(made) if j.tenant_id == "acme" and j.state in asked]
        for limit in (1, 4, 100):
            listed, cursor = [], None
            while True:
                page = await store.list_jobs("acme", asked, limit, cursor)
                assert len(page.jobs) <= limit
                listed += [j.job_id for j in page.jobs]
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            assert listed == expected, (asked, limit)


async def test_listing_pages_newest_first_and_claimable_jobs_oldest_first(store):
    for n in range(5):
        await store.create_job(job(f"job_{n}", f"r{n}"), "f")
    await store.append_event("job_1", "done", set_state(job_pb2.JOB_STATE_SUCCEEDED))
    first = await store.list_jobs("acme", [], 2, None)
    second = await store.list_jobs("acme", [], 2, first.next_cursor)
    assert [j.job_id for j in first.jobs + second.jobs] == ["job_4", "job_3", "job_2", "job_1"]
    assert [
        j.job_id for j in (await store.list_jobs("acme", [job_pb2.JOB_STATE_SUCCEEDED], 10, None)).jobs
    ] == ["job_1"]
    assert await store.claimable_jobs(10) == ["job_0", "job_2", "job_3", "job_4"]
    assert await store.claimable_jobs(2) == ["job_0", "job_2"]
    assert await store.count_by_state("acme") == {job_pb2.JOB_STATE_QUEUED: 4, job_pb2.JOB_STATE_SUCCEEDED: 1}


async def test_a_job_keeps_the_trace_context_it_was_created_in(store):
    context = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    await store.create_job(job("job_a", "r1"), "f", context)
    await store.create_job(job("job_b", "r2"), "f")
    # Its claim answers it with the trace context, for its drive to continue that trace.
    job_a, traced = await store.claim("job_a", "one", LEASE)
    assert (job_a, traced) == (await store.get_job("job_a"), context)
    assert (await store.claim("job_b", "one", LEASE)).trace_context == {}
    assert await store.claim("job_unknown", "one", LEASE) is None


async def test_racing_creates_of_one_request_id_store_one_job(open_store):
    stores = [await open_store(), await open_store()]
    outcomes = await asyncio.gather(
        *(stores[n % 2].create_job(job(f"job_{n}", "same"), "f") for n in range(10))
    )
    assert [created for _, created in outcomes].count(True) == 1
    assert len({stored.job_id for stored, _ in outcomes}) == 1
    assert sum((await stores[0].count_by_state("acme")).values()) == 1


async def test_racing_appends_number_events_without_gaps(open_store):
    stores = [await open_store(), await open_store()]
    await stores[0].create_job(job("job_a", "r1"), "f")
    await asyncio.gather(
        *(stores[n % 2].append_event("job_a", f"event {n}", lambda job: None) for n in range(20))
    )
    events = await stores[1].events_after("job_a", 0)
    assert [e.sequence for e in events] == list(range(1, 22))
    assert (await stores[0].get_job("job_a")).last_sequence == 21


# One SQLite file belongs to one gateway process; replicas share PostgreSQL.
@pytest.mark.parametrize("open_database", ["postgres"], indirect=True)
async def test_a_watcher_sees_events_another_replica_appends(open_store):
    """Replicas on one database: a watch on one follows the events another appends, as they come."""
    watching, appending = await open_store(), await open_store()
    await appending.create_job(job("job_a", "r1"), "f")

    watcher = following(watching, "job_a")
    await asyncio.sleep(0.2)  # the watcher is waiting for news
    started = asyncio.get_running_loop().time()
    await appending.append_event("job_a", "running", set_state(job_pb2.JOB_STATE_RUNNING))
    await appending.append_event("job_a", "done", set_state(job_pb2.JOB_STATE_SUCCEEDED))
    assert await asyncio.wait_for(watcher, 9) == [1, 2, 3]
    # Announced (NOTIFY), not found by the watcher's occasional look (every 10 s): well before it, with a
    # loaded box's slack.
    assert asyncio.get_running_loop().time() - started < 5.0


async def test_the_store_survives_reopening(open_store):
    first = await open_store()
    await first.create_job(job("job_a", "r1"), "f", {"traceparent": "00-ab-cd-01"})
    await first.create_job(job("job_q", "rq"), "f", {"traceparent": "00-ab-cd-02"})
    await first.append_event("job_a", "done", set_state(job_pb2.JOB_STATE_SUCCEEDED))
    events = await first.events_after("job_a", 0)
    await first.close()
    second = await open_store()
    assert (await second.get_job("job_a")).state == job_pb2.JOB_STATE_SUCCEEDED
    assert await second.events_after("job_a", 0) == events
    assert (await second.claim("job_q", "one", LEASE)).trace_context == {"traceparent": "00-ab-cd-02"}
    assert (await second.create_job(job("job_b", "r1"), "f"))[1] is False


# Claims ---------------------------------------------------------------------------------------------


async def test_a_claim_is_taken_once_renewed_by_its_owner_and_released(store):
    await store.create_job(job("job_a", "r1"), "f")
    assert await store.claim("job_a", "one", LEASE)
    assert await store.claim("job_a", "one", LEASE)  # its own already
    assert not await store.claim("job_a", "two", LEASE)
    assert await store.claimable_jobs(10) == []
    assert await store.renew_claims("one", ["job_a"], LEASE) == {"job_a"}
    assert await store.renew_claims("two", ["job_a"], LEASE) == set()
    await store.release_claims("two", ["job_a"])  # not two's: it stays one's
    assert not await store.claim("job_a", "two", LEASE)
    await store.release_claims("one", ["job_a"])
    assert await store.claimable_jobs(10) == ["job_a"]
    assert await store.claim("job_a", "two", LEASE)
    assert await store.renew_claims("one", ["job_a"], LEASE) == set()


async def test_a_queued_job_created_with_a_claim_is_its_creators_from_its_first_transaction(open_store):
    clock = Clock()
    store = await open_store(clock)
    _, fresh = await store.create_job(job("job_a", "r1"), "f", claim=("one", LEASE))
    assert fresh
    # Nobody else finds it free, nor may take it; its creator drives it as it holds any claim.
    assert await store.claimable_jobs(10) == []
    assert not await store.claim("job_a", "two", LEASE)
    await store.append_events("job_a", [Entry("routed", lambda job: None)], owner="one")
    with pytest.raises(ClaimLost):
        await store.append_events("job_a", [Entry("routed", lambda job: None)], owner="two")
    assert await store.renew_claims("one", ["job_a"], LEASE) == {"job_a"}
    # Its lease runs out as a claim's does: a creator that died leaves it to the others.
    clock.now += LEASE + 1
    assert await store.claimable_jobs(10) == ["job_a"]
    assert await store.claim("job_a", "two", LEASE)

    # A job in review is not driven yet: created unclaimed; a retried create claims nothing.
    review = job("job_b", "r2", job_pb2.JOB_STATE_AWAITING_APPROVAL)
    await store.create_job(review, "f", claim=("one", LEASE))
    again, fresh = await store.create_job(job("job_c", "r1"), "f", claim=("three", LEASE))
    assert (again.job_id, fresh) == ("job_a", False)
    assert not await store.claim("job_a", "three", LEASE)
    await store.append_event("job_b", "approved", set_state(job_pb2.JOB_STATE_QUEUED))
    assert await store.claimable_jobs(10) == ["job_b"]  # the first replica with room drives it


async def test_a_replica_renews_and_releases_more_claims_than_one_statement_can_name(store):
    # A replica may drive tens of thousands of jobs (AIPROD_DISPATCH_MAX_IN_FLIGHT): more ids than one
    # statement takes parameters (SQLite 32,766; PostgreSQL 65,535).
    await store.create_job(job("job_a", "r1"), "f")
    await store.create_job(job("job_b", "r2"), "f")
    assert await store.claim("job_a", "one", LEASE) and await store.claim("job_b", "one", LEASE)
    held = [f"job-{n}" for n in range(70_000)] + ["job_b", "job_a"]
    assert await store.renew_claims("one", held, LEASE) == {"job_a", "job_b"}
    await store.release_claims("one", held)
    assert await store.claimable_jobs(10) == ["job_a", "job_b"]


async def test_a_claim_whose_lease_ran_out_is_taken_over(open_store):
    clock = Clock()
    store = await open_store(clock)
    await store.create_job(job("job_a", "r1"), "f")
    assert await store.claim("job_a", "dead", 10)
    clock.now += 9
    assert not await store.claim("job_a", "alive", 10)
    assert await store.renew_claims("dead", ["job_a"], 10) == {"job_a"}  # 10 s more from now
    clock.now += 9.5
    assert await store.claimable_jobs(10) == []
    clock.now += 1
    assert await store.claimable_jobs(10) == ["job_a"]
    assert await store.claim("job_a", "alive", 10)
    # The one that lost it finds out at its next renewal, and cannot take it back.
    assert await store.renew_claims("dead", ["job_a"], 10) == set()
    assert not await store.claim("job_a", "dead", 10)
    assert await store.claimable_jobs(10) == []


async def test_a_drivers_events_are_fenced_by_its_claim(store):
    await store.create_job(job("job_a", "r1"), "f")
    # Unclaimed: no driver may write.
    with pytest.raises(ClaimLost):
        await store.append_event("job_a", "routed", lambda job: None, owner="one")
    assert await store.claim("job_a", "one", LEASE)
    await store.append_event("job_a", "rendering", set_state(job_pb2.JOB_STATE_RUNNING), owner="one")
    with pytest.raises(ClaimLost):
        await store.append_event("job_a", "routed", lambda job: None, owner="two")
    # Anyone else's event (a cancel through the API) is written whoever drives the job, and ends it.
    await store.append_event("job_a", "cancelled", set_state(job_pb2.JOB_STATE_CANCELLED))
    with pytest.raises(ClaimLost, match="ended"):
        await store.append_event("job_a", "video ready", set_state(job_pb2.JOB_STATE_SUCCEEDED), owner="one")
    stored = await store.get_job("job_a")
    assert stored.state == job_pb2.JOB_STATE_CANCELLED
    assert [event.message for event in await store.events_after("job_a", 0)] == [
        "job created",
        "rendering",
        "cancelled",
    ]


async def test_events_that_came_together_are_appended_in_one_transaction_each_in_turn(store, monkeypatch):
    """A driver's burst (a render's QC, charge and end) is one transaction: each event numbered and
    applied in turn, its watchers handed every one, one announcement; fenced by the claim once, and
    nothing past the job's end is the driver's to write."""
    await store.create_job(job("job_a", "r1"), "f")
    assert await store.claim("job_a", "one", LEASE)
    with pytest.raises(ClaimLost):
        await store.append_events("job_a", [Entry("routed", lambda job: None)], owner="two")
    transactions, notified = 0, []
    begin = store._db.transaction

    @contextlib.asynccontextmanager
    async def counted():
        nonlocal transactions
        transactions += 1
        async with begin() as transaction:
            real = transaction.notify

            async def notify(channel: str, payload: str) -> None:
                notified.append(payload)
                await real(channel, payload)

            monkeypatch.setattr(transaction, "notify", notify)
            yield transaction

    monkeypatch.setattr(store._db, "transaction", counted)
    watcher = following(store, "job_a")
    await asyncio.sleep(0)  # the watcher has read the log and waits for news

    def progress(job: gateway_pb2.RenderJob) -> None:
        job.progress = job.progress + 0.5

    written = await store.append_events(
        "job_a",
        [
            Entry("rendering", set_state(job_pb2.JOB_STATE_RUNNING)),
            Entry("half", progress),
            Entry("video ready", set_state(job_pb2.JOB_STATE_SUCCEEDED)),
        ],
        owner="one",
    )
    assert (transactions, notified) == (1, ["job_a 4"])
    assert (written.state, written.progress, written.last_sequence) == (job_pb2.JOB_STATE_SUCCEEDED, 0.5, 4)
    assert await asyncio.wait_for(watcher, 5) == [1, 2, 3, 4]
    logged = await store.events_after("job_a", 0)
    assert [(event.sequence, event.message, event.previous_state, event.state) for event in logged[1:]] == [
        (2, "rendering", job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING),
        (3, "half", job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_RUNNING),
        (4, "video ready", job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_SUCCEEDED),
    ]
    assert await store.get_job("job_a") == written

    # Past the end: the events before it are written, the rest are not the driver's, which is told so.
    await store.create_job(job("job_b", "r2"), "f")
    assert await store.claim("job_b", "one", LEASE)
    with pytest.raises(ClaimLost, match="ended"):
        await store.append_events(
            "job_b",
            [Entry("failed", set_state(job_pb2.JOB_STATE_FAILED)), Entry("after", progress)],
            owner="one",
        )
    stored = await store.get_job("job_b")
    assert (stored.state, stored.progress, stored.last_sequence) == (job_pb2.JOB_STATE_FAILED, 0.0, 2)
    assert [event.message for event in await store.events_after("job_b", 0)] == ["job created", "failed"]


async def test_an_ended_job_holds_no_claim_and_cannot_be_claimed(store):
    for name in ("job_a", "job_b"):
        await store.create_job(job(name, name), "f")
        assert await store.claim(name, "one", LEASE)
    await store.append_event("job_a", "video ready", set_state(job_pb2.JOB_STATE_SUCCEEDED), owner="one")
    assert await store.renew_claims("one", ["job_a", "job_b"], LEASE) == {"job_b"}
    assert not await store.claim("job_a", "one", LEASE)
    assert await store.claimable_jobs(10) == []
    await store.create_job(job("job_c", "c", job_pb2.JOB_STATE_AWAITING_APPROVAL), "f")
    assert not await store.claim("job_c", "one", LEASE)  # nothing to drive before approval
    assert not await store.claim("job_unknown", "one", LEASE)


async def test_owners_racing_for_jobs_each_get_exactly_one_owner(open_store):
    stores = [await open_store(), await open_store()]
    names = [f"job_{n}" for n in range(10)]
    for name in names:
        await stores[0].create_job(job(name, name), "f")
    owners = ["one", "two", "three", "four"]
    claimed = await asyncio.gather(
        *(stores[n % 2].claim(name, owner, LEASE) for name in names for n, owner in enumerate(owners))
    )
    outcomes = [outcome is not None for outcome in claimed]
    won = [outcomes[i * len(owners) : (i + 1) * len(owners)] for i in range(len(names))]
    assert all(claims.count(True) == 1 for claims in won), won
    # Each job's winner, and only it, holds the claim.
    for name, claims in zip(names, won, strict=True):
        winner = owners[claims.index(True)]
        for owner in owners:
            held = await stores[1].renew_claims(owner, [name], LEASE)
            assert held == ({name} if owner == winner else set())


async def test_claims_outlive_a_reopened_store_on_postgres_not_on_sqlite(open_store, request):
    """PostgreSQL is shared by live replicas: their claims stand. A SQLite file has one gateway at a time:
    a claim found on opening it is a dead process's, let go of at once."""
    first = await open_store()
    await first.create_job(job("job_a", "r1"), "f")
    assert await first.claim("job_a", "previous", LEASE)
    second = await open_store()
    expected = [] if request.node.callspec.params["open_database"] == "postgres" else ["job_a"]
    assert await second.claimable_jobs(10) == expected


async def test_charges_to_tell_and_held_attempts_are_found_apart_until_settled(store):
    for job_id in ("job_paid", "job_held"):
        await store.create_job(job(job_id, job_id), "f")

    def charge(outcome: int):
        def update(stored: gateway_pb2.RenderJob) -> None:
            stored.attempts.add(
                attempt=1,
                reservation_key=f"{stored.job_id}:1",
                charge=event_pb2.AttemptCharge(outcome=outcome),
            )

        return update

    await store.append_event("job_paid", "charged", charge(event_pb2.CHARGE_OUTCOME_COMMIT))
    await store.append_event("job_held", "charged", charge(event_pb2.CHARGE_OUTCOME_HOLD))
    # A held attempt never stands in the way of a charge to tell the ledger, and the other way round.
    assert [job.job_id for job in await store.unsettled_jobs(1)] == ["job_paid"]
    assert [job_id for _, job_id in await store.held_jobs(10, 0)] == ["job_held"]
    settled = await store.mark_settled("job_paid", ["job_paid:1"])
    assert settled.attempts[0].settled
    assert await store.unsettled_jobs(10) == []
    # A cursor past the last held job finds nothing more: the next pass starts again from 0.
    [(position, _)] = await store.held_jobs(10, 0)
    assert await store.held_jobs(10, position) == []


async def test_a_tenant_sees_only_its_own_jobs_and_request_ids_are_per_tenant(store: SqlJobStore) -> None:
    mine = job("job_" + "a" * 32, "same-request")
    theirs = gateway_pb2.RenderJob(job_id="job_" + "b" * 32, request_id="same-request", tenant_id="other")
    assert (await store.create_job(mine, "fingerprint-1"))[1]
    # The same request id under another tenant is another job, even with another request behind it.
    assert (await store.create_job(theirs, "fingerprint-2"))[1]
    assert await store.get_job(mine.job_id, "acme") is not None
    assert await store.get_job(mine.job_id, "other") is None
    assert [j.job_id for j in (await store.list_jobs("other", [], 10, None)).jobs] == [theirs.job_id]
    assert await store.count_by_state("acme") == {job_pb2.JOB_STATE_QUEUED: 1}


async def test_claimable_jobs_come_highest_priority_first_then_oldest(store):
    priorities = [gateway_pb2.PRIORITY_LOW, gateway_pb2.PRIORITY_HIGH, gateway_pb2.PRIORITY_MEDIUM]
    for n, priority in enumerate([*priorities, gateway_pb2.PRIORITY_HIGH, gateway_pb2.PRIORITY_UNSPECIFIED]):
        made = job(f"job_{n}", f"r{n}")
        made.priority = priority
        await store.create_job(made, "f")
    assert await store.claimable_jobs(10) == ["job_1", "job_3", "job_2", "job_0", "job_4"]
    assert await store.claimable_jobs(2) == ["job_1", "job_3"]


async def test_a_tenants_jobs_queued_or_running_stay_within_its_limit(store):
    await store.create_job(job("job_a", "r1"), "f", max_unfinished=2)
    await store.create_job(job("job_b", "r2", job_pb2.JOB_STATE_RUNNING), "f", max_unfinished=2)
    with pytest.raises(TooManyUnfinished):
        await store.create_job(job("job_c", "r3"), "f", max_unfinished=2)
    assert await store.get_job("job_c") is None
    # A repeat of a stored request is its job, limit or not.
    assert (await store.create_job(job("job_x", "r1"), "f", max_unfinished=2))[0].job_id == "job_a"
    # Awaiting approval does not count, nor does another tenant's job.
    review = job("job_r", "r4", job_pb2.JOB_STATE_AWAITING_APPROVAL)
    assert (await store.create_job(review, "f", max_unfinished=2))[1]
    other = job("job_o", "r5")
    other.tenant_id = "other"
    assert (await store.create_job(other, "f", max_unfinished=2))[1]
    # Its approval would pass the limit: refused, nothing written.
    with pytest.raises(TooManyUnfinished):
        await store.append_event("job_r", "approved", set_state(job_pb2.JOB_STATE_QUEUED), max_unfinished=2)
    assert (await store.get_job("job_r")).last_sequence == 1
    # Other changes of a job under a limit are not refused: queued to running, an edit in review.
    await store.append_event("job_a", "running", set_state(job_pb2.JOB_STATE_RUNNING), max_unfinished=2)
    await store.append_event("job_r", "edited", lambda job: None, max_unfinished=2)
    # One ends: a place is free.
    await store.append_event("job_b", "done", set_state(job_pb2.JOB_STATE_SUCCEEDED))
    await store.append_event("job_r", "approved", set_state(job_pb2.JOB_STATE_QUEUED), max_unfinished=2)
    with pytest.raises(TooManyUnfinished):
        await store.create_job(job("job_d", "r6"), "f", max_unfinished=2)


async def test_replicas_creating_and_approving_at_once_stay_within_the_limit_in_total(open_store):
    stores = [await open_store(), await open_store()]
    for n in range(4):
        await stores[0].create_job(job(f"job_r{n}", f"review-{n}", job_pb2.JOB_STATE_AWAITING_APPROVAL), "f")

    async def attempt(call) -> bool:
        try:
            await call
            return True
        except TooManyUnfinished:
            return False

    creates = [stores[n % 2].create_job(job(f"job_{n}", f"r{n}"), "f", max_unfinished=3) for n in range(6)]
    approvals = [
        stores[n % 2].append_event(
            f"job_r{n}", "approved", set_state(job_pb2.JOB_STATE_QUEUED), max_unfinished=3
        )
        for n in range(4)
    ]
    outcomes = await asyncio.gather(*(attempt(call) for call in [*creates, *approvals]))
    assert outcomes.count(True) == 3, outcomes
    assert (await stores[1].count_by_state("acme")).get(job_pb2.JOB_STATE_QUEUED) == 3


async def test_an_announcement_sends_a_watcher_to_the_log_only_for_what_it_was_not_handed(tmp_path):
    """Announcements as the listener hears them (another replica's commits, or this process's own
    before its commit call returns); the payload of a replica of the version before names the job
    alone."""
    database = SqliteDatabase(tmp_path / "jobs.sqlite3", "jobs", private=True)
    store = await SqlJobStore.open(database)

    async def announce(payload: str) -> None:
        async with database.transaction() as transaction:
            await transaction.notify(EVENTS_CHANNEL, payload)

    try:
        with store.following("job_a") as news:

            async def heard() -> list[gateway_pb2.JobEvent] | None:
                return await asyncio.wait_for(news.next(), timeout=10)

            handed = gateway_pb2.JobEvent(sequence=3)
            news.hand(handed)
            await announce("job_a 3")
            await announce("job_b 9")
            assert await heard() == [handed]
            await announce("job_a 4")
            assert await heard() is None
            await announce("job_a")
            assert await heard() is None
    finally:
        await store.close()


async def test_a_store_made_before_keeps_its_jobs_order_and_loses_the_index_nothing_reads(tmp_path):
    """A SQLite store made by the version before (AUTOINCREMENT positions, the jobs_state index): its
    jobs and the ones created after it is opened again page in creation order; the index is gone."""
    path = tmp_path / "jobs.sqlite3"
    before = sqlite3.connect(path)
    before.executescript(
        """
        CREATE TABLE jobs (
            position INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL UNIQUE,
            request_id TEXT NOT NULL UNIQUE, fingerprint TEXT NOT NULL, state INTEGER NOT NULL,
            job BLOB NOT NULL, trace_context TEXT NOT NULL DEFAULT '{}', claim_owner TEXT,
            claim_expires REAL, unsettled INTEGER NOT NULL DEFAULT 0, held INTEGER NOT NULL DEFAULT 0,
            tenant_id TEXT NOT NULL DEFAULT '', priority INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX jobs_state ON jobs (state, position);
        """
    )
    old = job("job_0", "r0")
    before.execute(
        "INSERT INTO jobs (job_id, request_id, fingerprint, state, job, tenant_id) VALUES (?, ?, ?, ?, ?, ?)",
        ("job_0", "acme/r0", "f", old.state, old.SerializeToString(), "acme"),
    )
    before.commit()
    before.close()
    store = await SqlJobStore.open(SqliteDatabase(path, "jobs", private=True))
    try:
        for n in (1, 2):
            await store.create_job(job(f"job_{n}", f"r{n}"), "f")
        page = await store.list_jobs("acme", [], 10, None)
        assert [j.job_id for j in page.jobs] == ["job_2", "job_1", "job_0"]
        assert await store.claimable_jobs(10) == ["job_0", "job_1", "job_2"]
    finally:
        await store.close()
    indexes = {row[1] for row in sqlite3.connect(path).execute("PRAGMA index_list(jobs)")}
    assert "jobs_state" not in indexes and "jobs_dispatch" in indexes


DAY = 86_400.0


async def end_job(
    store: JobStore, job_id: str, state: int = job_pb2.JOB_STATE_SUCCEEDED, charge: int = 0
) -> None:
    def update(stored: gateway_pb2.RenderJob) -> None:
        stored.state = state
        if charge:
            stored.attempts.add(
                attempt=1, reservation_key=f"{job_id}:1", charge=event_pb2.AttemptCharge(outcome=charge)
            )

    await store.append_event(job_id, "ended", update)


async def test_jobs_ended_past_their_retention_go_with_their_logs_and_the_tenants_figures_stay(open_store):
    clock = Clock()
    store = await open_store(clock)
    names = ("done", "cancelled", "unsettled", "held", "recent", "running", "newest")
    for name in names:
        revision = gateway_pb2.PlanRevision(plan_version=1) if name == "done" else None
        await store.create_job(job(f"job_{name}", name), "f", revision=revision)
    await end_job(store, "job_done")
    await end_job(store, "job_cancelled", job_pb2.JOB_STATE_CANCELLED)
    # Money the ledger must still hear of, or a backend may still account for, keeps its job.
    await end_job(store, "job_unsettled", charge=event_pb2.CHARGE_OUTCOME_COMMIT)
    await end_job(store, "job_held", charge=event_pb2.CHARGE_OUTCOME_HOLD)
    await store.append_event("job_running", "running", set_state(job_pb2.JOB_STATE_RUNNING))
    await end_job(store, "job_newest")
    ended_at = clock.now
    clock.now += 2 * DAY
    await end_job(store, "job_recent")
    # An event on a job already ended does not move its end.
    await store.append_event("job_done", "noted", lambda stored: None)
    counts, usage = await store.count_by_state("acme"), await store.usage_figures("acme")

    assert await store.purge_ended(ended_at, 100) == 0  # ended at the cutoff, not before it
    assert await store.purge_ended(ended_at + 1, 100) == 2
    for name in ("done", "cancelled"):
        assert await store.get_job(f"job_{name}") is None
        assert await store.events_after(f"job_{name}", 0) == []
    assert await store.revisions("job_done") == []
    # The newest job stays whatever its end (SQLite would give its position to the next job).
    kept = {j.job_id for j in (await store.list_jobs("acme", [], 100, None)).jobs}
    assert kept == {f"job_{name}" for name in ("unsettled", "held", "recent", "running", "newest")}
    for job_id in kept:
        assert (await store.events_after(job_id, 0))[0].sequence == 1
    # The tenant's figures count the jobs it ever had; the request id is free again.
    assert (await store.count_by_state("acme"), await store.usage_figures("acme")) == (counts, usage)
    assert (await store.create_job(job("job_again", "done"), "other"))[1]
    assert await store.purge_ended(clock.now + 1, 100) == 2  # recent and newest, job_again newer
    await store.mark_settled("job_unsettled", ["job_unsettled:1"])
    assert await store.purge_ended(clock.now + 1, 100) == 1
    assert await store.get_job("job_unsettled") is None
    # A job that is no more takes no event.
    with pytest.raises(KeyError):
        await store.append_event("job_done", "late", lambda stored: None)
    assert await store.events_after("job_done", 0) == []


async def test_a_purge_deletes_a_batch_at_a_time_and_replicas_purging_at_once_share_the_work(open_store):
    clock = Clock()
    first, second = await open_store(clock), await open_store(clock)
    for n in range(7):
        await first.create_job(job(f"job_{n}", f"r{n}"), "f")
        await end_job(first, f"job_{n}")
    await first.create_job(job("job_last", "last"), "f")
    cutoff = clock.now + 1
    assert [await first.purge_ended(cutoff, 2) for _ in range(3)] == [2, 2, 2]
    await first.create_job(job("job_more", "more"), "f")
    for n in range(7, 12):
        await first.create_job(job(f"job_{n}", f"r{n}"), "f")
        await end_job(first, f"job_{n}")
    await first.create_job(job("job_after", "after"), "f")
    done = await asyncio.gather(*(store.purge_ended(cutoff, 3) for store in (first, second, first, second)))
    assert sum(done) == 6  # job_6 and 7 to 11
    left = {j.job_id for j in (await second.list_jobs("acme", [], 100, None)).jobs}
    assert left == {"job_last", "job_more", "job_after"}


async def test_jobs_that_ended_before_their_ends_were_kept_count_their_retention_from_the_upgrade(
    open_store, open_database
):
    clock = Clock()
    store = await open_store(clock)
    for name in ("old", "running", "newest"):
        await store.create_job(job(f"job_{name}", name), "f")
    await end_job(store, "job_old")
    database = await open_database("jobs", private=True)
    async with database.transaction() as transaction:  # as the version before left it
        on_jobs = " ON jobs" if database.dialect == "postgresql" else ""
        await transaction.execute(f"DROP TRIGGER jobs_ended{on_jobs}")
        await transaction.execute("DROP INDEX jobs_purgeable")
        await transaction.execute("ALTER TABLE jobs DROP COLUMN ended")
    clock.now += 10 * DAY
    upgraded = clock.now
    store = await open_store(clock)
    assert await store.purge_ended(upgraded, 100) == 0
    assert await store.purge_ended(upgraded + 1, 100) == 1
    assert await store.get_job("job_old") is None and await store.get_job("job_running") is not None


async def test_a_job_an_older_replica_ends_gets_its_end_from_the_database(open_store, open_database):
    store = await open_store()
    for name in ("old", "newest"):
        await store.create_job(job(f"job_{name}", name), "f")
    database = await open_database("jobs", private=True)
    ended = job("job_old", "old", job_pb2.JOB_STATE_SUCCEEDED)
    before = time.time()
    async with database.transaction() as transaction:  # as a replica of the version before ends a job
        await transaction.execute(
            "UPDATE jobs SET state = ?, job = ? WHERE job_id = ?",
            (ended.state, ended.SerializeToString(), "job_old"),
        )
    after = time.time()
    assert await store.purge_ended(before - 1, 100) == 0  # its retention counts from when it ended
    assert await store.purge_ended(after + 1, 100) == 1
    assert await store.get_job("job_old") is None


def output(uri: str) -> render_pb2.RenderOutput:
    return render_pb2.RenderOutput(video=render_pb2.VideoArtifact(uri=uri))


async def test_a_purged_jobs_local_videos_no_kept_job_names_are_listed_to_delete(open_store, open_database):
    """Every local video a purged job named (its result, its shots', its attempts', a rejected one too)
    is listed to delete, but for one a kept job names, from the append that first named it; a store from
    before the table learns them from its jobs when it opens."""
    clock = Clock()
    store = await open_store(clock)
    for name in ("film", "other", "newest"):
        await store.create_job(job(f"job_{name}", name), "f")

    def shot_rendered(stored: gateway_pb2.RenderJob) -> None:
        stored.shots.add(index=0, output=output("file:///v/shot.mp4"))
        rejected = event_pb2.AttemptCharge(output=output("file:///v/rejected.mp4"))
        stored.attempts.extend([gateway_pb2.RenderAttempt(attempt=1, charge=rejected)])
        stored.attempts.add(attempt=2, charge=event_pb2.AttemptCharge(output=output("gs://bucket/v.mp4")))

    def film_made(stored: gateway_pb2.RenderJob) -> None:
        stored.result.CopyFrom(output("file:///v/film.mp4"))
        stored.state = job_pb2.JOB_STATE_SUCCEEDED

    await store.append_event("job_film", "shot", shot_rendered)
    await store.append_event("job_film", "film", film_made)
    await store.append_event(
        "job_other", "its", lambda stored: stored.result.CopyFrom(output("file:///v/shot.mp4"))
    )

    database = await open_database("jobs", private=True)
    async with database.transaction() as transaction:  # as the version before left it
        for table in ("job_videos", "unnamed_videos"):
            await transaction.execute(f"DROP TABLE {table}")
    store = await open_store(clock)
    assert await store.unnamed_videos(10) == []
    assert await store.purge_ended(clock.now + 1, 100) == 1
    # shot.mp4 is job_other's too; a video in a bucket is the bucket's lifecycle rule's.
    assert sorted(await store.unnamed_videos(10)) == ["file:///v/film.mp4", "file:///v/rejected.mp4"]
    assert len(await store.unnamed_videos(1)) == 1
    await store.forget_videos(["file:///v/film.mp4", "file:///v/rejected.mp4"])
    assert await store.unnamed_videos(10) == []


async def test_a_purge_deletes_the_jobs_that_ended_first_first(open_store):
    clock = Clock()
    store = await open_store(clock)
    for name in ("a", "b", "c", "newest"):
        await store.create_job(job(f"job_{name}", name), "f")
    for name in ("c", "a", "b"):  # ended in another order than created
        await end_job(store, f"job_{name}")
        clock.now += 1
    left = []
    for _ in range(3):
        assert await store.purge_ended(clock.now, 1) == 1
        left.append(sorted(j.job_id for j in (await store.list_jobs("acme", [], 10, None)).jobs))
    assert left == [
        ["job_a", "job_b", "job_newest"],
        ["job_b", "job_newest"],
        ["job_newest"],
    ]
