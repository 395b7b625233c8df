"""Job state changes reported to the metrics service, in the background: a slow or absent metrics
service never slows or fails a job."""

import asyncio

import grpc
import structlog
from google.protobuf import timestamp_pb2

from aiprod.gateway.v1 import gateway_pb2
from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc

_TIMEOUT = 5.0
log = structlog.get_logger()


class MetricsReporter:
    def __init__(self, metrics: metrics_pb2_grpc.MetricsServiceStub) -> None:
        self._metrics = metrics
        self._pending: set[asyncio.Task[None]] = set()

    def job_changed(self, job: gateway_pb2.RenderJob) -> None:
        time = timestamp_pb2.Timestamp()
        time.GetCurrentTime()
        request = metrics_pb2.RecordJobEventRequest(
            job_id=job.job_id, state=job.state, backend=job.backend, preset=job.spec.preset, time=time
        )
        task = asyncio.create_task(self._send(request))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, request: metrics_pb2.RecordJobEventRequest) -> None:
        try:
            await self._metrics.RecordJobEvent(request, timeout=_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            log.warning("job event not recorded by metrics", job_id=request.job_id, code=error.code().name)

    async def drain(self) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=_TIMEOUT)
