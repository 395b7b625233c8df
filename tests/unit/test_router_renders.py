"""The gateway's renders at the router over shared streams (aiprod_gateway.router_renders): to the
driver each looks exactly like its own ExecuteRender call: its events, then its end, an error raised
with the call's code, message and details; leaving early stops the router's news of it; a broken
stream ends every render on it as broken calls. Events that arrive while the driver is busy come to it
together, to be written at once."""

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from fake_streams import execute_renders, until, until_broken

from aiprod.common.v1 import event_pb2, render_pb2
from aiprod.router.v1 import router_pb2
from aiprod_gateway import router_renders
from aiprod_gateway.router_renders import RouterRenders
from aiprod_kit.errors import ResourceExhausted, error_reason, retry_delay, status_proto


def routed() -> event_pb2.RenderEvent:
    return event_pb2.RenderEvent(attempt=1, routed=event_pb2.RouteDecision())


def succeeded() -> event_pb2.RenderEvent:
    return event_pb2.RenderEvent(attempt=1, succeeded=render_pb2.RenderOutput())


class Call:
    """One scripted call's stream: its events, then its error if any; `released` lets it end."""

    def __init__(self, events: list[event_pb2.RenderEvent], error: Exception | None, released: asyncio.Event):
        self.events, self.error, self.released = events, error, released
        self.cancelled = False

    async def __aiter__(self) -> AsyncIterator[router_pb2.ExecuteRenderResponse]:
        for event in self.events:
            yield router_pb2.ExecuteRenderResponse(event=event)
        await self.released.wait()
        if self.error is not None:
            raise self.error

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class Router:
    """Every ExecuteRender answers routed, then (once released) succeeded or the error its job id names;
    `streams` counts ExecuteRenders streams opened, `broken` ends them as a lost connection would."""

    def __init__(self, errors: dict[str, Exception] | None = None) -> None:
        self.errors = errors or {}
        self.released = asyncio.Event()
        self.calls: dict[str, Call] = {}
        self.streams = 0
        self.ended = 0
        self.broken = asyncio.Event()

    def ExecuteRender(self, request: router_pb2.ExecuteRenderRequest) -> Call:
        error = self.errors.get(request.job_id)
        events = [routed()] if error else [routed(), succeeded()]
        self.calls[request.job_id] = Call(events, error, self.released)
        return self.calls[request.job_id]

    ResumeRender = ExecuteRender

    def ExecuteRenders(self, requests):
        self.streams += 1
        return self._counted(until_broken(execute_renders(self, requests), self.broken))

    async def _counted(self, responses):
        async for response in responses:
            yield response
        self.ended += 1  # the caller closed its side and every render on the stream had ended


def request(job_id: str) -> router_pb2.ExecuteRenderRequest:
    return router_pb2.ExecuteRenderRequest(job_id=job_id, idempotency_key=job_id)


async def events_of(renders: RouterRenders, job_id: str) -> list[str]:
    return [event.WhichOneof("kind") async for events in renders.run(request(job_id)) for event in events]


async def test_each_render_gets_its_own_events_and_end_over_a_few_streams_closed_once_idle():
    router = Router()
    renders = RouterRenders(router, streams=2)  # type: ignore[arg-type]
    runs = asyncio.gather(*(events_of(renders, f"job-{n}") for n in range(6)))
    await until(lambda: len(router.calls) == 6)
    router.released.set()
    assert await asyncio.wait_for(runs, 5) == [["routed", "succeeded"]] * 6
    assert router.streams == 2
    assert renders.in_flight == 0
    # Nothing in flight: the gateway's side of each stream is closed, and the router ends it (an open
    # stream would hold the router's graceful stop for its whole grace period).
    await until(lambda: router.ended == 2)
    await renders.close()


async def test_a_refused_render_raises_its_calls_error_with_its_details_and_the_stream_serves_the_others():
    refusal = ResourceExhausted("the tenant's budget is spent", reason="BUDGET_EXHAUSTED", retry_after=30)
    status = status_proto(refusal)
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString())),
        status.message,
    )
    router = Router({"refused": error})
    renders = RouterRenders(router, streams=1)  # type: ignore[arg-type]
    seen = []

    async def refused() -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for events in renders.run(request("refused")):
                seen.extend(event.WhichOneof("kind") for event in events)
        return raised.value

    both = asyncio.gather(refused(), events_of(renders, "fine"))
    await until(lambda: len(router.calls) == 2)
    router.released.set()
    raised, fine = await asyncio.wait_for(both, 5)
    assert seen == ["routed"]
    assert raised.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert raised.details() == "the tenant's budget is spent"
    assert error_reason(raised) == "BUDGET_EXHAUSTED"
    assert retry_delay(raised) == 30
    assert fine == ["routed", "succeeded"]
    assert router.streams == 1
    await renders.close()


async def test_leaving_a_render_early_stops_the_routers_news_of_it():
    router = Router()
    renders = RouterRenders(router, streams=1)  # type: ignore[arg-type]
    events = renders.run(request("left"))
    assert [event.WhichOneof("kind") for event in await asyncio.wait_for(anext(events), 5)] == ["routed"]
    await events.aclose()
    # The router's call for it is cancelled, as when a caller cancels its own ExecuteRender.
    await until(lambda: router.calls["left"].cancelled)
    assert renders.in_flight == 0
    await renders.close()


async def test_a_broken_stream_ends_every_render_on_it_as_a_broken_call():
    router = Router()
    renders = RouterRenders(router, streams=1)  # type: ignore[arg-type]
    runs = [asyncio.create_task(events_of(renders, f"job-{n}")) for n in range(3)]
    await until(lambda: len(router.calls) == 3)
    router.broken.set()
    for run in runs:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await asyncio.wait_for(run, 5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    # The next render opens a new stream.
    router.broken.clear()
    router.released.set()
    assert await asyncio.wait_for(events_of(renders, "after"), 5) == ["routed", "succeeded"]
    assert router.streams == 2
    await renders.close()


class LateCall(Call):
    """Routed at once; once released, a charge and the render's end, then the call's end (or error)."""

    async def __aiter__(self) -> AsyncIterator[router_pb2.ExecuteRenderResponse]:
        yield router_pb2.ExecuteRenderResponse(event=routed())
        await self.released.wait()
        yield router_pb2.ExecuteRenderResponse(
            event=event_pb2.RenderEvent(attempt=1, charged=event_pb2.AttemptCharge())
        )
        yield router_pb2.ExecuteRenderResponse(event=succeeded())
        if self.error is not None:
            raise self.error


class LateRouter(Router):
    def ExecuteRender(self, request: router_pb2.ExecuteRenderRequest) -> Call:
        self.calls[request.job_id] = LateCall([], self.errors.get(request.job_id), self.released)
        return self.calls[request.job_id]


def kinds(events: list[event_pb2.RenderEvent]) -> list[str]:
    return [event.WhichOneof("kind") for event in events]


@pytest.mark.parametrize("error", [None, "refused late"])
async def test_events_that_arrive_while_the_caller_is_busy_come_together_then_the_calls_end(error):
    failure = grpc.aio.AioRpcError(
        grpc.StatusCode.FAILED_PRECONDITION, grpc.aio.Metadata(), grpc.aio.Metadata(), error or ""
    )
    router = LateRouter({"late": failure} if error else {})
    renders = RouterRenders(router, streams=1)  # type: ignore[arg-type]
    batches = renders.run(request("late"))
    assert kinds(await asyncio.wait_for(anext(batches), 5)) == ["routed"]
    # The caller is busy with its first batch while the rest of the render, and its end, arrive.
    router.released.set()
    await until(lambda: renders.in_flight == 0)
    assert kinds(await asyncio.wait_for(anext(batches), 5)) == ["charged", "succeeded"]
    if error:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await asyncio.wait_for(anext(batches), 5)
        assert raised.value.details() == "refused late"
    else:
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(batches), 5)
    await renders.close()


class StepCall(Call):
    """Each event once its gate (if any) is set, then the call's end."""

    def __init__(self, steps: list[tuple[asyncio.Event | None, event_pb2.RenderEvent]]) -> None:
        super().__init__([], None, asyncio.Event())
        self.steps = steps
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[router_pb2.ExecuteRenderResponse]:
        for gate, event in self.steps:
            if gate is not None:
                await gate.wait()
            yield router_pb2.ExecuteRenderResponse(event=event)
            self.sent += 1


def charged() -> event_pb2.RenderEvent:
    return event_pb2.RenderEvent(attempt=1, charged=event_pb2.AttemptCharge())


@pytest.mark.parametrize("linger", [30.0, 0.01])
async def test_an_event_followed_at_once_waits_a_moment_for_what_follows_it(monkeypatch, linger):
    """Within the linger, the charge comes with the render's end (one write); past it, alone."""
    monkeypatch.setattr(router_renders, "LINGER_SECONDS", linger)
    charge, end = asyncio.Event(), asyncio.Event()
    call = StepCall([(None, routed()), (charge, charged()), (end, succeeded())])
    router = Router()
    router.ExecuteRender = lambda request: call  # type: ignore[method-assign]
    renders = RouterRenders(router, streams=1)  # type: ignore[arg-type]
    batches = renders.run(request("j"), followed=lambda event: event.HasField("charged"))
    assert kinds(await asyncio.wait_for(anext(batches), 5)) == ["routed"]  # not followed: at once
    charge.set()
    second = asyncio.create_task(anext(batches))
    if linger > 1:
        await until(lambda: call.sent == 2)
        end.set()
        assert kinds(await asyncio.wait_for(second, 5)) == ["charged", "succeeded"]
    else:
        assert kinds(await asyncio.wait_for(second, 5)) == ["charged"]
        end.set()
        assert kinds(await asyncio.wait_for(anext(batches), 5)) == ["succeeded"]
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(batches), 5)
    await renders.close()
