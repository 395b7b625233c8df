"""Job state changes reported: to the metrics service in the background, batched (a slow or absent
metrics service never slows or fails a job, and a burst of jobs costs one call, not one per change),
and as OpenTelemetry metrics."""

import asyncio
import contextlib

import grpc
import structlog

from aiprod.common.v1 import event_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod_gateway.store import TERMINAL_STATES
from aiprod_gateway.telemetry import GatewayMetrics

_TIMEOUT = 5.0
_RETRY_DELAY = 1.0
# Records kept while the metrics service is away; beyond this the oldest are dropped (and logged).
_MAX_PENDING = 10_000
# Once a change wakes the sender it waits this long for more: under load one call then carries tens of
# changes rather than the one or two that arrived during the previous call (at 600 creates a second,
# a call every two jobs, each costing the gateway about what a create does).
_LINGER_SECONDS = 0.05
log = structlog.get_logger()


class MetricsReporter:
    def __init__(
        self, metrics: metrics_pb2_grpc.MetricsServiceStub, telemetry: GatewayMetrics | None = None
    ) -> None:
        self._metrics = metrics
        self._telemetry = telemetry or GatewayMetrics()
        self._pending: list[metrics_pb2.JobEventRecord] = []
        self._wake = asyncio.Event()
        self._sender = asyncio.create_task(self._send_forever())

    def job_changed(self, job: gateway_pb2.RenderJob) -> None:
        self._telemetry.job_changed(job)
        record = metrics_pb2.JobEventRecord(
            job_id=job.job_id,
            state=job.state,
            backend=job.backend,
            preset=job.spec.preset,
            time=job.update_time,
            failure_reason=job.error.reason,
        )
        if job.state in TERMINAL_STATES:
            record.job_duration.FromNanoseconds(
                job.update_time.ToNanoseconds() - job.create_time.ToNanoseconds()
            )
            record.cost.CopyFrom(job.result.cost)
            record.qc_score = job.result.qc.score
        self._append(record)

    def backend_failed(self, job: gateway_pb2.RenderJob, fallback: event_pb2.Fallback) -> None:
        """An attempt given up for another backend: an error of that backend, though the job goes on."""
        self._append(
            metrics_pb2.JobEventRecord(
                job_id=job.job_id,
                state=job.state,
                backend=fallback.from_backend,
                preset=job.spec.preset,
                time=job.update_time,
                failure_reason=fallback.cause.reason,
            )
        )

    def _append(self, record: metrics_pb2.JobEventRecord) -> None:
        self._pending.append(record)
        if len(self._pending) > _MAX_PENDING:
            del self._pending[0]
            log.warning("metrics service behind: oldest job event dropped")
        self._wake.set()

    async def _send_forever(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(_LINGER_SECONDS)
            self._wake.clear()
            # Whatever piled up meanwhile, and while the previous call was in flight, goes in one call.
            if not await self._send_pending():
                await asyncio.sleep(_RETRY_DELAY)

    async def _send_pending(self) -> bool:
        batch, self._pending = self._pending, []
        if not batch:
            return True
        try:
            await self._metrics.RecordJobEvent(
                metrics_pb2.RecordJobEventRequest(events=batch), timeout=_TIMEOUT
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                # A batch is refused whole for one bad event, which would never be taken: sent one by
                # one, the others are recorded and only that one is dropped.
                return await self._send_one_by_one(batch)
            log.warning("job events not recorded by metrics yet", count=len(batch), code=error.code().name)
            self._pending[:0] = batch
            self._wake.set()
            return False
        return True

    async def _send_one_by_one(self, batch: list[metrics_pb2.JobEventRecord]) -> bool:
        for index, record in enumerate(batch):
            try:
                await self._metrics.RecordJobEvent(
                    metrics_pb2.RecordJobEventRequest(events=[record]), timeout=_TIMEOUT
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    log.error(
                        "job event refused by metrics; dropped", job_id=record.job_id, why=error.details()
                    )
                    continue
                self._pending[:0] = batch[index:]
                self._wake.set()
                return False
        return True

    async def close(self) -> None:
        """Sends what is pending (once), then stops."""
        self._sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sender
        await self._send_pending()
