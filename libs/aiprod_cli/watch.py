"""Follows a job's WatchRenderJob stream until the job ends, resuming when the stream breaks."""

import time
from collections.abc import Callable, Iterator

import grpc

from aiprod.common.v1 import job_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_cli.gateway import Gateway
from aiprod_cli.interrupt import Interrupt

TERMINAL_STATES = frozenset(
    {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
)

# How long to keep trying to reach the gateway again (a restart, say) before giving up on the watch.
RECONNECT_TIMEOUT_SECONDS = 120.0
# A pause between attempts, so that a gateway refusing streams while it drains is not hammered.
_RECONNECT_PAUSE_SECONDS = 0.5


class GatewayLost(Exception):
    """The stream broke and the gateway could not be reached again in time; the job goes on."""


def _state(response: gateway_pb2.WatchRenderJobResponse) -> int:
    """The job's state as of a stream message: the snapshot's, or the state after the event."""
    return response.job.state if response.WhichOneof("kind") == "job" else response.event.state


def follow_job(
    gateway: Gateway,
    job_id: str,
    on_reconnect: Callable[[str], None],
    after_sequence: int = 0,
    reconnect_timeout: float = RECONNECT_TIMEOUT_SECONDS,
    interrupt: Interrupt | None = None,
) -> Iterator[gateway_pb2.WatchRenderJobResponse]:
    """Yields the job's stream messages, from the events after after_sequence, until the job ends.

    The message showing that the job ended is the last one. After a break (UNAVAILABLE, or the
    stream closing before the job ended) it waits for the gateway and resumes after the last event
    seen, so that no event is lost or repeated; every new stream starts with a fresh snapshot of the
    job. on_reconnect gets the reason of each break.

    With an installed interrupt (`interruptible`), Ctrl-C cancels the stream or the wait for the gateway
    and raises KeyboardInterrupt here.
    """
    interrupt = interrupt or Interrupt()
    broken_since: float | None = None
    while True:
        call = gateway.stub.WatchRenderJob(
            gateway_pb2.WatchRenderJobRequest(job_id=job_id, after_sequence=after_sequence)
        )
        interrupt.waiting_on(call)
        try:
            for response in call:
                broken_since = None
                if response.WhichOneof("kind") == "event":
                    after_sequence = response.event.sequence
                yield response
                if _state(response) in TERMINAL_STATES:
                    return
                interrupt.check()
            reason = "the gateway closed the stream before the job ended"
        except grpc.RpcError as error:
            # A stream cancelled by Ctrl-C ends CANCELLED.
            interrupt.check()
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            reason = error.details() or "the gateway is unavailable"
        finally:
            # Ends the stream on every way out: the job ended, the caller stopped early, or Ctrl-C.
            call.cancel()

        broken_since = broken_since or time.monotonic()
        deadline = broken_since + reconnect_timeout
        lost = GatewayLost(f"lost the gateway at {gateway.address}: {reason}")
        if time.monotonic() >= deadline:
            raise lost
        on_reconnect(reason)
        time.sleep(min(_RECONNECT_PAUSE_SECONDS, max(deadline - time.monotonic(), 0.0)))
        interrupt.check()
        ready = grpc.channel_ready_future(gateway.channel)
        interrupt.waiting_on(ready)
        try:
            ready.result(timeout=max(deadline - time.monotonic(), 0.0))
        except grpc.FutureCancelledError:
            interrupt.check()
            raise
        except grpc.FutureTimeoutError:
            ready.cancel()
            raise lost from None
