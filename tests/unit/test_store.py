"""The job store's contract, run against every implementation (SQLite now; PostgreSQL later)."""

import asyncio

import pytest

from aiprod.common.v1 import job_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_gateway.store import JobStore, RequestIdConflict, SqliteJobStore


@pytest.fixture(params=["sqlite"])
async def store(request, tmp_path):
    opened: JobStore = SqliteJobStore(tmp_path / "jobs.sqlite3")
    yield opened
    await opened.close()


def job(job_id: str, request_id: str) -> gateway_pb2.RenderJob:
    return gateway_pb2.RenderJob(job_id=job_id, request_id=request_id, state=job_pb2.JOB_STATE_QUEUED)


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


async def test_watch_replays_then_follows_until_terminal(store):
    await store.create_job(job("job_a", "r1"), "f")

    async def follow() -> list[int]:
        return [event.sequence async for event in store.watch("job_a", 0)]

    watcher = asyncio.create_task(follow())
    await store.append_event("job_a", "running", set_state(job_pb2.JOB_STATE_RUNNING))
    await store.append_event("job_a", "done", set_state(job_pb2.JOB_STATE_SUCCEEDED))
    assert await asyncio.wait_for(watcher, 5) == [1, 2, 3]


async def test_listing_pages_newest_first_and_unfinished_jobs_oldest_first(store):
    for n in range(5):
        await store.create_job(job(f"job_{n}", f"r{n}"), "f")
    await store.append_event("job_1", "done", set_state(job_pb2.JOB_STATE_SUCCEEDED))
    first = await store.list_jobs([], 2, None)
    second = await store.list_jobs([], 2, first.next_cursor)
    assert [j.job_id for j in first.jobs + second.jobs] == ["job_4", "job_3", "job_2", "job_1"]
    assert [j.job_id for j in (await store.list_jobs([job_pb2.JOB_STATE_SUCCEEDED], 10, None)).jobs] == [
        "job_1"
    ]
    assert [j.job_id for j in await store.unfinished_jobs()] == ["job_0", "job_2", "job_3", "job_4"]
    assert await store.count_by_state() == {job_pb2.JOB_STATE_QUEUED: 4, job_pb2.JOB_STATE_SUCCEEDED: 1}


async def test_a_job_keeps_the_trace_context_it_was_created_in(store):
    context = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    await store.create_job(job("job_a", "r1"), "f", context)
    await store.create_job(job("job_b", "r2"), "f")
    assert await store.trace_context("job_a") == context
    assert await store.trace_context("job_b") == {}
    assert await store.trace_context("job_unknown") == {}
