"""The gateway's settlement of attempt charges in the spend ledger: durable, and retried until the ledger
has each one.

The router says what each attempt costs when it ends (a `charged` event); the dispatcher records it on
the job, in the same transaction as the event, and the job store counts the job as unsettled. This
outbox then tells the ledger: commit what the provider billed, or release a reservation known not to
bill. A ledger that is away is tried again, with a growing pause, until it answers, also after a
gateway restart and by any replica (commit and release are idempotent in the ledger, so two replicas
settling one attempt change nothing). A held charge (an uncertain attempt) is left to the ledger: its
reservation stays until reconciled, and counts at its worst case once it expires.
"""

import asyncio
import contextlib

import grpc
import structlog

from aiprod.common.v1 import event_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod_gateway.store import JobStore, to_settle

log = structlog.get_logger()

_TIMEOUT = 5.0
# Between passes when nothing wakes the outbox (a charge recorded by another replica), and the longest
# pause while the ledger is away.
_IDLE_SECONDS = 5.0
_BACKOFF = (0.2, 10.0)
_BATCH = 100


class Settlement:
    def __init__(self, store: JobStore, metrics: metrics_pb2_grpc.MetricsServiceStub) -> None:
        self._store = store
        self._metrics = metrics
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

    def charged(self) -> None:
        """A charge was recorded here: settle it now rather than at the next pass."""
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
                # The ledger or the store away: the charges stay recorded and are tried again.
                log.warning("attempt charges not settled yet", error=str(error))
                done = False
            pause = _BACKOFF[0] if done else min(pause * 2, _BACKOFF[1])
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _IDLE_SECONDS if done else pause)

    async def settle_pending(self) -> bool:
        """One pass over the jobs with unsettled charges; True when every one was settled."""
        job_ids = await self._store.unsettled_jobs(_BATCH)
        for job_id in job_ids:
            job = await self._store.get_job(job_id)
            if job is None:
                continue
            settled = [
                attempt.reservation_key for attempt in to_settle(job) if await self._settle(job, attempt)
            ]
            if settled:
                await self._store.mark_settled(job_id, settled)
        return len(job_ids) < _BATCH and not await self._store.unsettled_jobs(1)

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
            if error.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                raise
            # Nothing to retry: no such reservation, or settled otherwise already (the ledger says how).
            log.error(
                "attempt charge refused by the ledger",
                job_id=job.job_id,
                reservation_key=key,
                code=error.code().name,
                details=error.details(),
            )
            return True
        if charge.billed.amount_micros < attempt.reserved.amount_micros:
            self._freed.set()
            self._freed = asyncio.Event()
        return True
