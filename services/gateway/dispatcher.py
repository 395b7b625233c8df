"""The dispatcher: schedules the jobs this gateway replica drives.

Every gateway replica runs one on the shared job store, and each job is driven by one replica at a
time: the one holding its claim (`aiprod_gateway.claims`). Whenever it has room (at start, on
every heartbeat, when a job ends while work was left for want of room) it takes over unfinished jobs
nobody holds: new ones, and those of a replica that died, once their leases run out; no restart is
needed. A job created here while it has room is created with its claim (`new_job_claim`), so that
taking it costs no transaction of its own. Its heartbeat renews its claims
every third of the lease and stops at once what it does for a job it lost (another replica took it
over, or it was cancelled elsewhere). Its queue is in priority order (the preset's: higher first),
then oldest first, as the store offers jobs nobody holds.

A job driven here is a task (`aiprod_gateway.driving`), not a worker: one waiting on its provider
holds a coroutine and its render stream, no thread and no slot of anything that uses CPU, so up to
`max_in_flight` jobs (AIPROD_DISPATCH_MAX_IN_FLIGHT) are driven at once; the renders at once are
bounded where they run (each renderer's concurrent tasks, where a render waits for a slot) and by each
tenant's tier (its jobs unfinished at once); the steps that use CPU here (a film's stitching, a
shot's last frame) take turns (AIPROD_DISPATCH_CONCURRENCY, `aiprod_gateway.films`). A job waiting for
budget is not driven (it keeps its claim) and is queued again when its wait ends or a settlement here
frees money. A driver that crashes (the store unreachable, anything unexpected) lets go of its job,
which is tried again after a backoff that grows while it keeps failing, here or by another replica.
"""

import asyncio
import itertools
from collections.abc import Awaitable, Callable

import structlog

from aiprod.gateway.v1 import gateway_pb2
from aiprod.router.v1 import router_pb2_grpc
from aiprod_gateway.claims import Claims
from aiprod_gateway.driving import BudgetPolicy, Drive, JobDriver
from aiprod_gateway.reporting import MetricsReporter
from aiprod_gateway.settlement import Settlement
from aiprod_gateway.store import Claimed, ClaimLost, JobStore

log = structlog.get_logger()

# A crashed driver's job is tried again after this long, doubled for each crash in a row, up to the most.
_CRASH_BACKOFF = (1.0, 60.0)


class Dispatcher:
    def __init__(
        self,
        store: JobStore,
        router: router_pb2_grpc.RouterServiceStub,
        reporter: MetricsReporter,
        settlement: Settlement,
        max_in_flight: int,
        budget_policy: BudgetPolicy,
        owner: str,
        lease_seconds: float = 30.0,
    ) -> None:
        self._store = store
        self._settlement = settlement
        self._max_in_flight = max_in_flight
        # One per job driven here (or claimed on its way to be): taken before a job leaves the queue.
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._claims = Claims(store, owner, lease_seconds)
        self._driver = JobDriver(store, router, reporter, settlement, budget_policy, owner)
        # (-priority, arrival, job id): the highest priority first, then the first queued.
        self._queue: asyncio.PriorityQueue[tuple[int, int, str]] = asyncio.PriorityQueue()
        self._arrivals = itertools.count()
        # The jobs in the queue, once each; one dropped from here (cancelled, lost) is skipped when its
        # turn comes.
        self._queued: set[str] = set()
        # Queued jobs claimed already (created here, or taken over), as their claim found them: driven
        # without a claim's transaction more.
        self._claimed: dict[str, Claimed] = {}
        self._driving: dict[str, Drive] = {}
        # Jobs to queue again later, each with the task that will: waiting for budget (the claim kept)
        # or backing off after a crash (the claim let go).
        self._later: dict[str, asyncio.Task[None]] = {}
        self._crashes: dict[str, int] = {}
        # Set when a job driven here ends: the heartbeat looks for work at once if it left some.
        self._room_made = asyncio.Event()
        self._starter: asyncio.Task[None] | None = None
        # Each job's run: claimed, driven, and what follows its drive.
        self._runs: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._starter = asyncio.create_task(self._start_jobs())
        # Its first beat takes over the unfinished jobs nobody holds, a previous run's among them.
        self._heartbeat = asyncio.create_task(self._beat())
        log.info("dispatcher started", owner=self._claims.owner, lease_seconds=self._claims.lease_seconds)

    async def stop(self) -> None:
        """Stops driving jobs and lets go of their claims: they stay queued or running in the store, and
        another replica, or the next start, takes them over at once rather than after their leases."""
        tasks = [
            *([self._heartbeat] if self._heartbeat else []),
            *self._later.values(),
            *([self._starter] if self._starter else []),
            *self._runs,
            *(driver.task for driver in self._driving.values()),
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._driver.close()
        await self._claims.release_all()

    def enqueue(self, job_id: str, priority: int = gateway_pb2.PRIORITY_UNSPECIFIED) -> None:
        """Queues a job to drive here, before the queued jobs of a lower priority (gateway_pb2.Priority).
        It is claimed when its turn comes: by then another replica may drive it, and this one skips
        it."""
        if job_id in self._queued or job_id in self._driving:
            return
        self._queued.add(job_id)
        self._queue.put_nowait((-priority, next(self._arrivals), job_id))

    def new_job_claim(self) -> tuple[str, float] | None:
        """The claim a job created here may be created with, (owner, lease seconds), while this replica
        has room to drive it; then hand it over with enqueue_claimed once created."""
        if len(self._driving) + len(self._queued) >= self._max_in_flight:
            return None
        return self._claims.owner, self._claims.lease_seconds

    def enqueue_claimed(self, claimed: Claimed) -> None:
        """Queues a job created here with this replica's claim (new_job_claim), as its create wrote it."""
        job = claimed.job
        self._claims.hold(job.job_id)
        self._claimed[job.job_id] = claimed
        self.enqueue(job.job_id, job.priority)

    async def stop_driving(self, job_id: str) -> None:
        """Stops what this replica does for a job, for a cancel: its render stream, its wait for budget,
        its place in the queue; returns once nothing more is recorded for it here. The claim is left to
        the cancel's event, which ends it. A replica that drives the job elsewhere stops when it finds
        the job ended: at its next event or its next renewal."""
        self._claims.drop(job_id)
        self._queued.discard(job_id)
        self._claimed.pop(job_id, None)
        driver = self._driving.get(job_id)
        if driver is not None:
            driver.cancelled = True
            driver.task.cancel()
            await asyncio.wait({driver.task})
        # After the driver: it may just have set the job waiting.
        later = self._later.pop(job_id, None)
        if later is not None:
            later.cancel()

    # Claims ---------------------------------------------------------------------------------------

    async def _beat(self) -> None:
        """Every third of the lease: renews this replica's claims, stopping what it does for the jobs it
        lost, then takes over jobs nobody holds. In between, when a job driven here ends and the last
        take-over left work behind for want of room, takes over again at once. (Not at every ending: with
        thousands of jobs in flight, each ending would renew every claim and scan every unfinished job.)"""
        loop = asyncio.get_running_loop()
        period = self._claims.lease_seconds / 3
        renew_due = loop.time()
        while True:
            work_left = False
            try:
                if loop.time() >= renew_due:
                    renew_due = loop.time() + period
                    await self._renew()
                work_left = await self._take_over()
            except Exception as error:
                # The store unreachable, most likely: the next beat tries again. A driver that cannot
                # write meanwhile crashes and is retried on its own.
                log.warning("job claims not kept this beat", error=str(error), exc_info=True)
            while (wait := renew_due - loop.time()) > 0:
                try:
                    await asyncio.wait_for(self._room_made.wait(), wait)
                except TimeoutError:
                    break
                self._room_made.clear()
                if work_left:
                    break

    async def _renew(self) -> None:
        for job_id in await self._claims.renew():
            driver = self._driving.get(job_id)
            if driver is None or not driver.ended:  # an ended job's claim ended with it
                self._lose(job_id)

    def _lose(self, job_id: str) -> None:
        """Stops at once all this replica does for a job whose claim it no longer holds."""
        self._claims.drop(job_id)
        self._queued.discard(job_id)
        self._claimed.pop(job_id, None)
        later = self._later.pop(job_id, None)
        if later is not None:
            later.cancel()
            log.info("job claimed elsewhere or ended; no longer waiting for it here", job_id=job_id)
        driver = self._driving.get(job_id)
        if driver is not None:
            driver.task.cancel()  # its run then finds out why

    async def _take_over(self) -> bool:
        """Claims jobs nobody holds, as many as this replica has room for, and queues them; True when
        there may be more than it had room for."""
        free = self._max_in_flight - len(self._driving) - len(self._queued)
        if free <= 0:
            return True
        # Leave room for the ones found that are this replica's already (queued, or backing off).
        asked = free + len(self._queued) + len(self._later)
        found = await self._store.claimable_jobs(asked)
        taken: list[str] = []
        for job_id in found:
            if len(taken) >= free:
                break
            if job_id in self._queued or job_id in self._driving or job_id in self._later:
                continue
            claimed = await self._claims.claim(job_id)
            if claimed is not None:
                taken.append(job_id)
                self._claimed[job_id] = claimed
                # There is room for each: the store's order (priority first) is the order they start.
                self.enqueue(job_id, claimed.job.priority)
        if taken:
            log.info("took over jobs nobody drove", count=len(taken), job_ids=taken)
        return len(found) >= asked

    # Runs ---------------------------------------------------------------------------------------

    async def _start_jobs(self) -> None:
        """Starts the queued jobs in the queue's order, each once there is room for it."""
        while True:
            await self._in_flight.acquire()
            try:
                negative_priority, _, job_id = await self._queue.get()
            except BaseException:
                self._in_flight.release()
                raise
            if job_id not in self._queued:
                self._claimed.pop(job_id, None)
                self._in_flight.release()
                continue
            self._queued.discard(job_id)
            run = asyncio.create_task(self._run(job_id, -negative_priority))
            self._runs.add(run)
            run.add_done_callback(self._runs.discard)

    async def _run(self, job_id: str, priority: int) -> None:
        try:
            await self._claim_and_drive(job_id, priority)
        except Exception:
            # The job's claim was let go of or runs out; it is taken over again.
            log.exception("job not driven", job_id=job_id)
        finally:
            self._in_flight.release()
        if not self._queued:
            self._room_made.set()

    async def _claim_and_drive(self, job_id: str, priority: int) -> None:
        try:
            claimed = self._claimed.pop(job_id, None) or await self._claims.claim(job_id)
        except Exception as error:
            self._crashed(job_id, error, priority)
            return
        if claimed is None:
            # Another replica drives it, or it ended meanwhile (cancelled while queued).
            self._crashes.pop(job_id, None)
            return
        driver = Drive()
        driver.task = asyncio.create_task(self._driver.drive(claimed, driver))
        self._driving[job_id] = driver
        try:
            # wait() rather than await: a stopped job ends its task, not this run.
            await asyncio.wait({driver.task})
        except asyncio.CancelledError:
            driver.task.cancel()
            raise
        finally:
            self._driving.pop(job_id, None)
        if driver.cancelled:
            return  # cancelled here: the canceller records the end
        priority = driver.priority or priority  # the job's own, once the driver has read it
        error = None if driver.task.cancelled() else driver.task.exception()
        if driver.task.cancelled() or isinstance(error, ClaimLost):
            self._claims.drop(job_id)
            self._crashes.pop(job_id, None)
            await self._driver.after_lost(job_id, driver)
        elif error is not None:
            self._crashed(job_id, error, priority)
        else:
            self._crashes.pop(job_id, None)
            wait = driver.task.result()
            if wait is not None:
                # Waits for budget, keeping its claim: again after the wait, or once money is freed here.
                self._enqueue_later(job_id, lambda: self._settlement.money_freed(wait), priority)
            elif driver.ended:
                self._claims.drop(job_id)  # an ended job's claim ended with it
            else:
                await self._claims.release(job_id)

    def _crashed(self, job_id: str, error: BaseException, priority: int) -> None:
        """A driver that failed unexpectedly (the store unreachable, a bug): the job is let go of, for any
        replica, and tried again here after a backoff that grows while it keeps failing."""
        crashes = self._crashes[job_id] = self._crashes.get(job_id, 0) + 1
        delay = min(_CRASH_BACKOFF[0] * 2 ** (crashes - 1), _CRASH_BACKOFF[1])
        log.error(
            "job driver crashed; trying again",
            job_id=job_id,
            crashes=crashes,
            retry_in_seconds=delay,
            exc_info=error,
        )
        self._claims.drop(job_id)

        async def back_off() -> None:
            # In the background: with the store away, the release may take as long as the crash did.
            await self._claims.release(job_id)
            await asyncio.sleep(delay)

        self._enqueue_later(job_id, back_off, priority)

    def _enqueue_later(self, job_id: str, wait: Callable[[], Awaitable[None]], priority: int) -> None:
        async def later() -> None:
            await wait()
            self._later.pop(job_id, None)
            self.enqueue(job_id, priority)

        self._later[job_id] = asyncio.create_task(later())
