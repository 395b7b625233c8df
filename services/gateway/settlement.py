"""The gateway's settlement of attempt charges in the spend ledger: durable, and retried until the ledger
has each one.

The router says what each attempt costs when it ends (a `charged` event); the dispatcher records it on
the job, in the same transaction as the event, and the job store counts the job as unsettled. This
outbox then tells the ledger: commit what the provider billed, or release a reservation known not to
bill. A ledger that is away is tried again, with a growing pause, until it answers, also after a
gateway restart and by any replica (commit and release are idempotent in the ledger, so two replicas
settling one attempt change nothing).

A held charge (an attempt whose end nobody saw) keeps its reservation, and the outbox asks its backend,
through the router, what became of it, less and less often, until the backend knows: the render ended
(then its charge is recorded on the job like any other and settled), or no create was ever made under
its key (released). One whose create outcome even its backend lost stays held; its reservation then
counts at its worst case once it expires. A backend's renderers forget the keys of renders begun longer
ago than the jobs' retention (AIPROD_JOB_RETENTION_SECONDS): "no create under its key" from one of them
is then no proof, and an attempt of a job that old stays held rather than be released.
"""

import asyncio
import contextlib
import time
from collections.abc import Callable

import grpc
import structlog

from aiprod.common.v1 import backend_pb2, event_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_gateway import attempts
from aiprod_gateway.store import JobStore, to_reconcile, to_settle
from aiprod_kit.errors import ErrorReason, error_reason

log = structlog.get_logger()

_TIMEOUT = 5.0
# Between passes when nothing wakes the outbox (a charge recorded by another replica), and the longest
# pause while the ledger is away.
_IDLE_SECONDS = 5.0
_BACKOFF = (0.2, 10.0)
_BATCH = 100
# How soon a held attempt's backend is asked again, doubling up to the most.
_RECONCILE_BACKOFF = (2.0, 60.0)


async def record_charge(
    store: JobStore,
    job_id: str,
    shot: int,
    attempt: int,
    charge: event_pb2.AttemptCharge,
    handle: backend_pb2.RenderHandle | None = None,
) -> gateway_pb2.RenderJob:
    """Records what an attempt of a shot costs on its job, which may have ended (a cancelled render, a
    held one reconciled); the outbox then tells the ledger. The job as the charge's event wrote it."""
    render_event = event_pb2.RenderEvent(shot=shot, attempt=attempt, charged=charge)
    render_event.time.GetCurrentTime()

    def update(job: gateway_pb2.RenderJob) -> None:
        if handle is not None:
            attempts.submitted(job, shot, attempt, handle)
        attempts.charged(job, shot, attempt, charge)

    return await store.append_event(job_id, attempts.charge_message(charge), update, render_event)


class Settlement:
    def __init__(
        self,
        store: JobStore,
        metrics: metrics_pb2_grpc.MetricsServiceStub,
        router: router_pb2_grpc.RouterServiceStub,
        key_retention_seconds: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._key_retention = key_retention_seconds
        self._clock = clock
        self._metrics = metrics
        self._router = router
        # Jobs handed over with the charge just recorded on them, settled from there without a read; the
        # unsettled jobs are read at least every _IDLE_SECONDS (others', and those a pass failed to settle).
        self._handed: dict[str, gateway_pb2.RenderJob] = {}
        self._read_due = 0.0  # time.monotonic() of the next read of the unsettled jobs
        # Held attempts: when to ask again, and the pause after that; and where the last pass stopped.
        self._next_ask: dict[str, tuple[float, float]] = {}
        self._held_after = 0
        self._held_due = 0.0  # time.monotonic() of the next pass over held attempts
        self._wake = asyncio.Event()
        # Set, then replaced, each time a settlement frees money: what jobs waiting for budget wait on.
        self._freed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def charged(self, job: gateway_pb2.RenderJob | None = None) -> None:
        """A charge was recorded here: settle it now rather than at the next pass; given the job as the
        charge's event wrote it, from that job alone (else every unsettled job is read)."""
        if job is None:
            self._read_due = 0.0
        else:
            self._handed[job.job_id] = job
        self._wake.set()

    async def money_freed(self, timeout: float) -> None:
        """Returns when a settlement here has freed money (a release, or a commit under its
        reservation), or after timeout."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._freed.wait(), timeout)

    async def _run(self) -> None:
        pause = _BACKOFF[0]
        while True:
            try:
                done = await self.settle_pending()
            except Exception as error:
                # The ledger or the store away: the charges stay recorded and are tried again, read.
                log.warning("attempt charges not settled yet", error=str(error))
                done, self._read_due = False, 0.0
            pause = _BACKOFF[0] if done else min(pause * 2, _BACKOFF[1])
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _IDLE_SECONDS if done else pause)

    async def settle_pending(self) -> bool:
        """One pass: the charges to tell the ledger, then a batch of held attempts (at their own pace).
        True unless more charges than a batch were waiting."""
        # Jobs handed over settle from the job their charge wrote, a read of every unsettled job spared
        # (about one a job); the read still comes every _IDLE_SECONDS, and after a pass that failed.
        jobs, self._handed = list(self._handed.values()), {}
        if not jobs or time.monotonic() >= self._read_due:
            self._read_due = time.monotonic() + _IDLE_SECONDS
            jobs = await self._store.unsettled_jobs(_BATCH)
        for job in jobs:
            settled = [
                attempt.reservation_key for attempt in to_settle(job) if await self._settle(job, attempt)
            ]
            if settled:
                await self._store.mark_settled(job.job_id, settled)
        if time.monotonic() < self._held_due:
            return len(jobs) < _BATCH
        # Held attempts are read no oftener than any is asked about (a pass at every charge read them for
        # nothing: about one read a job).
        self._held_due = time.monotonic() + _RECONCILE_BACKOFF[0]
        held = await self._store.held_jobs(_BATCH, self._held_after)
        self._held_after = held[-1][0] if len(held) == _BATCH else 0
        for _, job_id in held:
            job = await self._store.get_job(job_id)
            if job is None:
                continue
            for attempt in to_reconcile(job):
                await self._reconcile(job, attempt)
        return len(jobs) < _BATCH

    async def _reconcile(self, job: gateway_pb2.RenderJob, attempt: gateway_pb2.RenderAttempt) -> None:
        """Asks a held attempt's backend what became of it, when due; records its charge once known."""
        key = attempt.reservation_key
        due, pause = self._next_ask.get(key, (0.0, _RECONCILE_BACKOFF[0]))
        if time.monotonic() < due:
            return
        self._next_ask[key] = (time.monotonic() + pause, min(pause * 2, _RECONCILE_BACKOFF[1]))
        request = router_pb2.ReconcileAttemptRequest(
            backend=attempt.backend,
            idempotency_key=key,
            task_id=attempt.charge.task_id or attempt.handle.task_id,
        )
        try:
            response = await self._router.ReconcileAttempt(request, timeout=_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            log.info(
                "held attempt not reconciled yet",
                job_id=job.job_id,
                reservation_key=key,
                code=error.code().name,
            )
            return
        if not response.ended:
            return
        if self._may_be_forgotten(job, request, response.charge):
            log.warning(
                "held attempt left held: its backend may have forgotten its key",
                job_id=job.job_id,
                reservation_key=key,
                key_retention_seconds=self._key_retention,
            )
            return
        charge = event_pb2.AttemptCharge()
        charge.CopyFrom(response.charge)
        charge.reservation_key = key
        log.info("held attempt reconciled", job_id=job.job_id, reservation_key=key, outcome=charge.outcome)
        reconciled = await record_charge(self._store, job.job_id, attempt.shot, attempt.attempt, charge)
        self._next_ask.pop(key, None)
        self.charged(reconciled)

    def _may_be_forgotten(
        self,
        job: gateway_pb2.RenderJob,
        request: router_pb2.ReconcileAttemptRequest,
        charge: event_pb2.AttemptCharge,
    ) -> bool:
        """Whether a release for want of any create under the key may be the renderers' forgetting it:
        the attempt began after its job was created, so a job younger than the keys' retention has its
        key kept, and an older one may not."""
        unknown_key = charge.outcome == event_pb2.CHARGE_OUTCOME_RELEASE and not (
            request.task_id or charge.task_id
        )
        old = self._clock() - job.create_time.ToSeconds() >= self._key_retention
        return bool(self._key_retention) and unknown_key and old

    async def _settle(self, job: gateway_pb2.RenderJob, attempt: gateway_pb2.RenderAttempt) -> bool:
        """Tells the ledger one attempt's charge; True once it has it. Raises grpc errors to retry."""
        key = attempt.reservation_key
        charge = attempt.charge
        try:
            if charge.outcome == event_pb2.CHARGE_OUTCOME_COMMIT:
                await self._metrics.CommitSpend(
                    metrics_pb2.CommitSpendRequest(reservation_key=key, actual=charge.billed),
                    timeout=_TIMEOUT,
                )
            else:
                await self._metrics.ReleaseBudget(
                    metrics_pb2.ReleaseBudgetRequest(reservation_key=key), timeout=_TIMEOUT
                )
        except grpc.aio.AioRpcError as error:
            reason = error_reason(error)
            if reason not in (ErrorReason.RESERVATION_NOT_FOUND, ErrorReason.RESERVATION_SETTLED):
                raise
            # Nothing to retry: no such reservation, or settled otherwise already (the ledger says how).
            log.error(
                "attempt charge refused by the ledger",
                job_id=job.job_id,
                reservation_key=key,
                code=error.code().name,
                reason=reason,
                details=error.details(),
            )
            return True
        if charge.billed.amount_micros < attempt.reserved.amount_micros:
            self._freed.set()
            self._freed = asyncio.Event()
        return True
