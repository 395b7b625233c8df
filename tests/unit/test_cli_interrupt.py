"""Ctrl-C while the CLI follows a job: the first cancels the stream and is raised where the CLI checks,
the second at once; the stream itself, served by a real gRPC server, is cancelled."""

import os
import signal
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from aiprod.common.v1 import job_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod_cli.gateway import Gateway
from aiprod_cli.interrupt import interruptible
from aiprod_cli.watch import follow_job


class Waited:
    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self) -> bool:
        self.cancelled += 1
        return True


def ctrl_c() -> None:
    # The handler runs in the main thread before the next bytecode after kill returns.
    os.kill(os.getpid(), signal.SIGINT)


def test_the_first_ctrl_c_cancels_what_is_waited_on_and_is_raised_at_the_check() -> None:
    before = signal.getsignal(signal.SIGINT)
    waited = Waited()
    with pytest.raises(KeyboardInterrupt), interruptible() as interrupt:
        interrupt.waiting_on(waited)
        ctrl_c()
        assert (interrupt.requested, waited.cancelled) == (True, 1)
        interrupt.check()
        pytest.fail("check did not raise")
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_ctrl_c_raises_at_once() -> None:
    # The outer raises: the first Ctrl-C, raised on leaving the block.
    with pytest.raises(KeyboardInterrupt), interruptible():
        ctrl_c()
        with pytest.raises(KeyboardInterrupt):
            ctrl_c()
            pytest.fail("the second Ctrl-C did not raise")


def test_a_ctrl_c_nothing_checked_is_raised_on_leaving_the_block() -> None:
    with pytest.raises(KeyboardInterrupt), interruptible() as interrupt:
        ctrl_c()
        late = Waited()
        interrupt.waiting_on(late)
        assert late.cancelled == 1


def test_without_ctrl_c_the_block_runs_and_the_handler_is_put_back() -> None:
    before = signal.getsignal(signal.SIGINT)
    with interruptible() as interrupt:
        interrupt.check()
    assert signal.getsignal(signal.SIGINT) is before


class EndlessWatch(gateway_pb2_grpc.GatewayServiceServicer):
    """A job that never ends: a snapshot, then nothing until the client cancels."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def WatchRenderJob(self, request, context) -> Iterator[gateway_pb2.WatchRenderJobResponse]:
        context.add_callback(self.cancelled.set)
        job = gateway_pb2.RenderJob(job_id=request.job_id, state=job_pb2.JOB_STATE_RUNNING)
        yield gateway_pb2.WatchRenderJobResponse(job=job)
        self.cancelled.wait(30)


@pytest.fixture
def endless_gateway() -> Iterator[tuple[Gateway, EndlessWatch]]:
    servicer = EndlessWatch()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as channel:
        yield Gateway(address, channel, gateway_pb2_grpc.GatewayServiceStub(channel)), servicer
    server.stop(grace=None)


def test_ctrl_c_while_following_cancels_the_stream_and_stops_the_follow(
    endless_gateway: tuple[Gateway, EndlessWatch],
) -> None:
    gateway, servicer = endless_gateway
    seen = []
    with pytest.raises(KeyboardInterrupt) as raised, interruptible() as interrupt:
        for response in follow_job(gateway, "job_1", seen.append, interrupt=interrupt):
            seen.append(response.job.state)
            # Ctrl-C while the follow waits for the next message, from another thread as a terminal's.
            threading.Timer(0.2, ctrl_c).start()
    assert seen == [job_pb2.JOB_STATE_RUNNING]
    # Raised by the follow's check, not inside grpc's iteration (where Python's own handler would).
    assert raised.traceback[-1].name == "check"
    assert any(entry.name == "follow_job" for entry in raised.traceback)
    assert servicer.cancelled.wait(10), "the server never saw the stream cancelled"
