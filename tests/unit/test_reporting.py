"""The gateway's job events to the metrics service: a batch the service refuses for one bad event is
sent again one event at a time, so that only that event is dropped and the rest are recorded."""

import grpc
from grpc.aio import AioRpcError, Metadata

from aiprod.gateway.v1 import gateway_pb2
from aiprod.metrics.v1 import metrics_pb2
from aiprod_gateway.reporting import MetricsReporter


class RefusingMetrics:
    """Records events; refuses, as INVALID_ARGUMENT, any call carrying one of job "bad"."""

    def __init__(self) -> None:
        self.recorded: list[str] = []

    async def RecordJobEvent(self, request: metrics_pb2.RecordJobEventRequest, timeout: float):
        if any(event.job_id == "bad" for event in request.events):
            raise AioRpcError(
                grpc.StatusCode.INVALID_ARGUMENT, Metadata(), Metadata(), "events[0].time: out of range"
            )
        self.recorded += [event.job_id for event in request.events]
        return metrics_pb2.RecordJobEventResponse()


async def test_one_bad_event_is_dropped_and_the_rest_of_its_batch_recorded():
    metrics = RefusingMetrics()
    reporter = MetricsReporter(metrics)
    for job_id in ("a", "bad", "b"):
        reporter.job_changed(gateway_pb2.RenderJob(job_id=job_id))
    await reporter.close()
    assert metrics.recorded == ["a", "b"]
