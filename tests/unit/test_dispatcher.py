"""The dispatcher's driving policy, against a real job store (SQLite) and a scripted router: a crashed
driver lets go of its job and tries it again; a claim lost stops the driver at once; a job cancelled
elsewhere stops its driver, which cancels a render it saw start but could not record."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
from fake_streams import execute_renders
from structlog.testing import capture_logs

from aiprod.common.v1 import backend_pb2, event_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.metrics.v1 import metrics_pb2
from aiprod.router.v1 import router_pb2
from aiprod_gateway import dispatcher as dispatcher_module
from aiprod_gateway.dispatcher import Dispatcher
from aiprod_gateway.driving import BudgetPolicy
from aiprod_gateway.reporting import MetricsReporter
from aiprod_gateway.settlement import Settlement
from aiprod_gateway.store import Claimed, Entry, JobStore, SqlJobStore
from aiprod_kit.database import DatabaseUnavailable, SqliteDatabase

OWNER = "this-replica"
# Short, so that renewals (every third of it) come within the test's patience.
LEASE = 0.6
HANDLE = backend_pb2.RenderHandle(backend=backend_pb2.BACKEND_RUNWAY, task_id="task-1", idempotency_key="k:1")


def routed() -> event_pb2.RenderEvent:
    return event_pb2.RenderEvent(
        attempt=1, routed=event_pb2.RouteDecision(backend=backend_pb2.BACKEND_RUNWAY)
    )


def submitted(handle: backend_pb2.RenderHandle = HANDLE) -> event_pb2.RenderEvent:
    return event_pb2.RenderEvent(attempt=1, submitted=handle)


def succeeded() -> event_pb2.RenderEvent:
    return event_pb2.RenderEvent(attempt=1, succeeded=render_pb2.RenderOutput())


class Stream:
    """A server stream as grpc.aio gives it: iterated, and cancelled by the caller."""

    def __init__(self, events: AsyncIterator[event_pb2.RenderEvent]) -> None:
        self._events = events
        self.cancelled = False

    async def __aiter__(self) -> AsyncIterator[router_pb2.ExecuteRenderResponse]:
        async for event in self._events:
            yield router_pb2.ExecuteRenderResponse(event=event)

    def cancel(self) -> bool:
        self.cancelled = True
        return True


Script = Callable[[], AsyncIterator[event_pb2.RenderEvent]]


class Router:
    """The router, scripted: each ExecuteRender or ResumeRender plays the next script."""

    def __init__(self, *scripts: Script) -> None:
        self._scripts = list(scripts)
        self.streams: list[Stream] = []
        self.cancelled: list[str] = []

    async def PlanRoute(self, request: object, timeout: float | None = None) -> router_pb2.PlanRouteResponse:
        return router_pb2.PlanRouteResponse()  # no candidate prices it: a free render, nothing reserved

    def _play(self, request: object) -> Stream:
        stream = Stream(self._scripts.pop(0)())
        self.streams.append(stream)
        return stream

    ExecuteRender = ResumeRender = _play

    def ExecuteRenders(self, requests):
        return execute_renders(self, requests)

    async def CancelRender(
        self, request: router_pb2.CancelRenderRequest, timeout: float | None = None
    ) -> router_pb2.CancelRenderResponse:
        self.cancelled.append(request.handle.task_id)
        return router_pb2.CancelRenderResponse(
            charge=event_pb2.AttemptCharge(
                backend=request.handle.backend,
                task_id=request.handle.task_id,
                outcome=event_pb2.CHARGE_OUTCOME_RELEASE,
            )
        )


class Metrics:
    """The metrics service, answering every call."""

    def __getattr__(self, name: str) -> Callable[..., Awaitable[object]]:
        responses = {
            "GetBudget": metrics_pb2.GetBudgetResponse,
            "CommitSpend": metrics_pb2.CommitSpendResponse,
            "ReleaseBudget": metrics_pb2.ReleaseBudgetResponse,
            "RecordJobEvent": metrics_pb2.RecordJobEventResponse,
        }

        async def call(request: object, timeout: float | None = None) -> object:
            return responses[name]()

        return call


def forever() -> asyncio.Event:
    return asyncio.Event()  # never set: a render that goes on


async def eventually(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0) -> None:
    """Polls predicate (a plain or an async one) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        held = predicate()
        if held if isinstance(held, bool) else await held:
            return
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.02)


@pytest.fixture
async def store(tmp_path) -> AsyncIterator[SqlJobStore]:
    opened = await SqlJobStore.open(SqliteDatabase(tmp_path / "jobs.sqlite3", "jobs"))
    yield opened
    await opened.close()


Start = Callable[..., Awaitable[Dispatcher]]


@pytest.fixture
async def start(store: JobStore) -> AsyncIterator[Start]:
    """Starts a dispatcher (on the store, unless told another) with the router given; stops it after."""
    started: list[tuple[Dispatcher, MetricsReporter]] = []
    settlements: list[Settlement] = []

    async def start_one(router: Router, on: JobStore = store, lease: float = LEASE) -> Dispatcher:
        metrics = Metrics()
        reporter = MetricsReporter(metrics)  # type: ignore[arg-type]
        settlement = Settlement(on, metrics, router)  # type: ignore[arg-type]
        dispatcher = Dispatcher(on, router, reporter, settlement, 2, BudgetPolicy(), OWNER, lease)  # type: ignore[arg-type]
        await settlement.start()
        await dispatcher.start()
        started.append((dispatcher, reporter))
        settlements.append(settlement)
        return dispatcher

    yield start_one
    for dispatcher, reporter in started:
        await dispatcher.stop()
        await reporter.close()
    for settlement in settlements:
        await settlement.stop()


async def create(store: JobStore, job_id: str = "job_a") -> None:
    job = gateway_pb2.RenderJob(
        job_id=job_id,
        request_id=job_id,
        state=job_pb2.JOB_STATE_QUEUED,
        plan=render_pb2.RenderPlan(shots=[render_pb2.Shot(prompt="p", duration_seconds=4)]),
    )
    await store.create_job(job, "f")


async def state(store: JobStore, job_id: str = "job_a") -> int:
    job = await store.get_job(job_id)
    assert job is not None
    return job.state


async def messages(store: JobStore, job_id: str = "job_a") -> list[str]:
    return [event.message for event in await store.events_after(job_id, 0)]


async def has_handle(store: JobStore, job_id: str = "job_a") -> bool:
    job = await store.get_job(job_id)
    return job is not None and job.HasField("handle")


async def has_message(store: JobStore, prefix: str, job_id: str = "job_a") -> bool:
    return any(message.startswith(prefix) for message in await messages(store, job_id))


def cancel(job: gateway_pb2.RenderJob) -> None:
    """Another replica's CancelRenderJob, as it changes the job."""
    job.state = job_pb2.JOB_STATE_CANCELLED


class FailingOnce(SqlJobStore):
    """The job store, with one write lost to a database outage: the first event whose message starts
    with failing."""

    failing = ""

    async def append_events(
        self, job_id: str, entries: Sequence[Entry], owner: str | None = None
    ) -> gateway_pb2.RenderJob:
        if self.failing and any(entry.message.startswith(self.failing) for entry in entries):
            self.failing = ""
            raise DatabaseUnavailable("the database is unreachable now (test); try again")
        return await super().append_events(job_id, entries, owner)


async def test_a_job_is_claimed_once_created_with_the_replicas_claim_or_taken_over(store, monkeypatch, start):
    async def render() -> AsyncIterator[event_pb2.RenderEvent]:
        for event in (routed(), submitted(), succeeded()):
            yield event

    await create(store, "job_b")  # created elsewhere: taken over, claimed once
    claims = []
    claim = store.claim

    async def claiming(*arguments):
        claims.append(arguments)
        return await claim(*arguments)

    monkeypatch.setattr(store, "claim", claiming)
    dispatcher = await start(Router(render, render))
    await eventually(lambda: has_message(store, "video ready", "job_b"))
    new = gateway_pb2.RenderJob(
        job_id="job_a",
        request_id="job_a",
        state=job_pb2.JOB_STATE_QUEUED,
        plan=render_pb2.RenderPlan(shots=[render_pb2.Shot(prompt="p", duration_seconds=4)]),
    )
    job_claim = dispatcher.new_job_claim()
    assert job_claim == (OWNER, LEASE)
    created, _ = await store.create_job(new, "f", claim=job_claim)
    dispatcher.enqueue_claimed(Claimed(created, {}))
    await eventually(lambda: has_message(store, "video ready"))
    assert await state(store) == job_pb2.JOB_STATE_SUCCEEDED
    assert [arguments[0] for arguments in claims] == ["job_b"]


class Gated(SqlJobStore):
    """The job store, listing the messages of each write of the driver's events; the first write waits
    for `opened`."""

    async def append_events(
        self, job_id: str, entries: Sequence[Entry], owner: str | None = None
    ) -> gateway_pb2.RenderJob:
        self.writes.append([entry.message for entry in entries])
        if len(self.writes) == 1:
            await self.opened.wait()
        return await super().append_events(job_id, entries, owner)


async def test_a_renders_events_that_come_while_the_driver_writes_are_written_at_once(start, tmp_path):
    charge = event_pb2.AttemptCharge(outcome=event_pb2.CHARGE_OUTCOME_RELEASE)

    async def render() -> AsyncIterator[event_pb2.RenderEvent]:
        yield routed()
        await eventually(lambda: len(gated.writes) == 1)
        yield submitted()
        yield event_pb2.RenderEvent(attempt=1, charged=charge)
        yield succeeded()

    gated = await Gated.open(SqliteDatabase(tmp_path / "gated.sqlite3", "gated"))
    gated.writes, gated.opened = [], asyncio.Event()
    await create(gated)
    dispatcher = await start(Router(render), on=gated)
    # The rest of the render, and its end, reach the gateway while its first event is being written.
    await eventually(lambda: len(gated.writes) == 1)
    renders = dispatcher._driver._renders
    await eventually(lambda: renders.in_flight == 0)
    gated.opened.set()
    await eventually(lambda: has_message(gated, "video ready"))
    assert [len(write) for write in gated.writes] == [1, 3]
    assert await messages(gated) == ["job created", *(message for write in gated.writes for message in write)]
    assert await state(gated) == job_pb2.JOB_STATE_SUCCEEDED
    await dispatcher.stop()
    await gated.close()


async def test_a_crashed_driver_lets_go_of_the_job_which_is_tried_again_after_a_backoff(
    store, monkeypatch, start, tmp_path
):
    monkeypatch.setattr(dispatcher_module, "_CRASH_BACKOFF", (0.05, 0.05))

    async def render() -> AsyncIterator[event_pb2.RenderEvent]:
        for event in (routed(), submitted(), succeeded()):
            yield event

    router = Router(render, render)
    flaky = await FailingOnce.open(SqliteDatabase(tmp_path / "jobs.sqlite3", "flaky"))
    flaky.failing = "submitted"
    await create(store)
    with capture_logs() as logs:
        dispatcher = await start(router, on=flaky)
        await eventually(lambda: has_message(store, "video ready"))
    await dispatcher.stop()
    await flaky.close()
    crashes = [entry for entry in logs if entry["event"] == "job driver crashed; trying again"]
    assert [(entry["job_id"], entry["log_level"]) for entry in crashes] == [("job_a", "error")]
    assert isinstance(crashes[0]["exc_info"], DatabaseUnavailable)
    # Resumed where the store stopped it: the render it started named again, once.
    assert (await messages(store)).count("submitted to runway as task-1") == 1
    assert len(router.streams) == 2
    assert await store.claimable_jobs(10) == []  # ended, and nobody's


async def test_a_claim_taken_over_by_another_replica_stops_the_driver_at_once(store, start, tmp_path):
    async def long_render() -> AsyncIterator[event_pb2.RenderEvent]:
        yield routed()
        yield submitted()
        await forever().wait()
        yield succeeded()

    router = Router(long_render)
    await create(store)
    with capture_logs() as logs:
        await start(router)
        await eventually(lambda: has_handle(store))
        # Another replica whose clock runs ahead finds the lease out and takes the job.
        other = SqlJobStore(
            SqliteDatabase(tmp_path / "jobs.sqlite3", "other"), clock=lambda: time.time() + 60
        )
        try:
            assert await other.claim("job_a", "other-replica", LEASE)
            await eventually(lambda: router.streams[0].cancelled)
            await eventually(lambda: any(e["event"].startswith("job claimed by another") for e in logs))
            # Its claim stands; nothing was cancelled at the provider, as the other replica follows it now.
            assert await other.renew_claims("other-replica", ["job_a"], 60) == {"job_a"}
        finally:
            await other.close()
    assert router.cancelled == []
    assert await state(store) == job_pb2.JOB_STATE_RUNNING


async def test_a_job_cancelled_elsewhere_stops_its_driver_at_the_next_renewal(store, start):
    async def long_render() -> AsyncIterator[event_pb2.RenderEvent]:
        yield routed()
        yield submitted()
        await forever().wait()
        yield succeeded()

    router = Router(long_render)
    await create(store)
    with capture_logs() as logs:
        await start(router)
        await eventually(lambda: has_handle(store))
        # Another replica's CancelRenderJob: it cancels the recorded render itself.
        await store.append_event("job_a", "cancelled: by a client", cancel)
        await eventually(lambda: router.streams[0].cancelled)
        await eventually(
            lambda: any(e["event"] == "job cancelled elsewhere; stopped driving it" for e in logs)
        )
    assert router.cancelled == []
    assert (await messages(store))[-1] == "cancelled: by a client"


async def test_a_driver_cancels_a_render_it_could_not_record_for_a_job_cancelled_elsewhere(store, start):
    go_on = asyncio.Event()
    started = backend_pb2.RenderHandle(backend=backend_pb2.BACKEND_RUNWAY, task_id="task-unrecorded")

    async def render() -> AsyncIterator[event_pb2.RenderEvent]:
        yield routed()
        await go_on.wait()  # the provider's create, slow
        yield submitted(started)
        await forever().wait()

    router = Router(render)
    await create(store)
    # A long lease: the driver, not a renewal, finds the job ended, at the event it cannot record.
    await start(router, lease=30)
    await eventually(lambda: has_message(store, "routed to runway"))
    await store.append_event("job_a", "cancelled: by a client", cancel)
    go_on.set()
    await eventually(lambda: router.cancelled == ["task-unrecorded"])
    assert router.streams[0].cancelled
    # What the cancelled render costs is recorded on the ended job, for the ledger.
    await eventually(lambda: has_message(store, "runway bills nothing"))
    log = await messages(store)
    assert log[-2:] == ["cancelled: by a client", "runway bills nothing for the attempt"]
    assert not any(message.startswith("submitted") for message in log)
    job = await store.get_job("job_a")
    assert job is not None and job.state == job_pb2.JOB_STATE_CANCELLED
    assert [attempt.charge.task_id for attempt in job.attempts] == ["task-unrecorded"]


async def test_queued_jobs_start_in_priority_order_then_oldest_first(store, start):
    """The preset's priority orders dispatch: with every worker busy, a high-priority job queued last
    starts first, and jobs of one priority start in the order they were queued."""
    releases = [asyncio.Event(), asyncio.Event()]

    def busy(release: asyncio.Event) -> Script:
        async def render() -> AsyncIterator[event_pb2.RenderEvent]:
            yield routed()
            await release.wait()
            yield succeeded()

        return render

    async def quick() -> AsyncIterator[event_pb2.RenderEvent]:
        yield routed()
        yield succeeded()

    started: list[str] = []

    class Recording(Router):
        def _play(self, request: router_pb2.ExecuteRenderRequest) -> Stream:
            started.append(request.job_id)
            return super()._play(request)

        ExecuteRender = ResumeRender = _play

    router = Recording(busy(releases[0]), busy(releases[1]), *[quick] * 4)
    dispatcher = await start(router)
    for job_id in ("job_busy_1", "job_busy_2"):
        await create(store, job_id)
        dispatcher.enqueue(job_id, gateway_pb2.PRIORITY_LOW)
    await eventually(lambda: len(started) == 2)
    for job_id, priority in (
        ("job_low", gateway_pb2.PRIORITY_LOW),
        ("job_medium", gateway_pb2.PRIORITY_MEDIUM),
        ("job_high", gateway_pb2.PRIORITY_HIGH),
        ("job_medium_later", gateway_pb2.PRIORITY_MEDIUM),
    ):
        await create(store, job_id)
        dispatcher.enqueue(job_id, priority)
    releases[0].set()  # one worker frees up; the other stays busy
    await eventually(lambda: len(started) == 6)
    assert started[2:] == ["job_high", "job_medium", "job_medium_later", "job_low"]
    releases[1].set()


class CountingReads(SqlJobStore):
    """The job store, counting whole-job reads (get_job) after the drive's first."""

    reads = 0

    async def get_job(self, job_id: str, tenant_id: str | None = None) -> gateway_pb2.RenderJob | None:
        self.reads += 1
        return await super().get_job(job_id, tenant_id)


async def test_a_drive_that_ended_its_job_goes_on_from_what_it_wrote_without_reading_it_back(
    start, tmp_path, monkeypatch
):
    reported: list[gateway_pb2.RenderJob] = []
    monkeypatch.setattr(MetricsReporter, "job_changed", lambda self, job: reported.append(job))

    async def render() -> AsyncIterator[event_pb2.RenderEvent]:
        for event in (routed(), submitted(), succeeded()):
            yield event

    store = await CountingReads.open(SqliteDatabase(tmp_path / "counted.sqlite3", "jobs"))
    try:
        await create(store)
        await start(Router(render), on=store)
        await eventually(lambda: any(job.state == job_pb2.JOB_STATE_SUCCEEDED for job in reported))
        assert store.reads == 0
        # Reported as the store holds it at the end.
        ended = reported[-1]
        assert ended == await store.get_job("job_a")
        assert ended.last_sequence == len(await messages(store)) and ended.HasField("result")
    finally:
        await store.close()
