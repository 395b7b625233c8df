"""The gateway's renders at the router, over a few shared ExecuteRenders streams.

A gRPC stream costs each side tens of kilobytes, and a job in flight held one to the router for its
whole render. Now each render is a request on a shared stream, and its events and its end come back
tagged with its id; to the driver it looks exactly like its own ExecuteRender or ResumeRender call:
the events, then the end, an error raised as the call would raise it (code, message, details).

Renders are spread over a few streams, each opened on its own, so that round_robin spreads them over
the router's replicas as it spread their calls.
"""

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable

import grpc
from google.rpc import status_pb2
from opentelemetry import propagate

from aiprod.common.v1 import event_pb2
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_kit.errors import rpc_error
from aiprod_kit.multiplexing import SharedStream

# Streams to the router per gateway process.
STREAMS = 4
# How long an event the caller says is followed at once waits for what follows it, to come with it.
LINGER_SECONDS = 0.02

_News = event_pb2.RenderEvent | grpc.aio.AioRpcError | None  # None: the call ended OK


class RouterRenders:
    """Runs renders at the router as ExecuteRender and ResumeRender calls would, over shared streams."""

    def __init__(self, router: router_pb2_grpc.RouterServiceStub, streams: int = STREAMS) -> None:
        self._lanes = [_Lane(router) for _ in range(streams)]
        self._ids = itertools.count(1)

    @property
    def in_flight(self) -> int:
        return sum(len(lane.renders) for lane in self._lanes)

    async def run(
        self,
        request: router_pb2.ExecuteRenderRequest | router_pb2.ResumeRenderRequest,
        followed: Callable[[event_pb2.RenderEvent], bool] = lambda event: False,
    ) -> AsyncIterator[list[event_pb2.RenderEvent]]:
        """The render's events to its end, as lists of those that came together: that arrived while the
        caller was busy with the ones before, or within LINGER_SECONDS of an event `followed` says is
        followed at once (the caller writes each list in one go). Raises grpc.aio.AioRpcError as its own
        call would, after the events before it, also when the stream it travels on breaks. Leaving
        early stops the router following it for this caller (the render goes on)."""
        number = next(self._ids)
        render_id, lane = str(number), self._lanes[number % len(self._lanes)]
        if isinstance(request, router_pb2.ExecuteRenderRequest):
            order = router_pb2.ExecuteRendersRequest(render_id=render_id, execute=request)
        else:
            order = router_pb2.ExecuteRendersRequest(render_id=render_id, resume=request)
        propagate.inject(order.trace_context)
        news: asyncio.Queue[_News] = asyncio.Queue()
        lane.renders[render_id] = news
        lane.stream.send(order)
        try:
            while True:
                items = await _together(news, followed)
                # The end (None, or an error) is the last news of a render: nothing is put after it.
                end = items[-1]
                if isinstance(end, event_pb2.RenderEvent):
                    yield items
                    continue
                if len(items) > 1:
                    yield items[:-1]
                if end is None:
                    return
                raise end
        finally:
            if lane.renders.pop(render_id, None) is not None:
                lane.stream.send(router_pb2.ExecuteRendersRequest(render_id=render_id, stop=True))
                lane.if_idle()

    async def close(self) -> None:
        await asyncio.gather(*(lane.stream.close() for lane in self._lanes))


async def _together(
    news: "asyncio.Queue[_News]", followed: Callable[[event_pb2.RenderEvent], bool]
) -> list[_News]:
    """A render's next news with what came with it: what had arrived already, and what arrives within
    LINGER_SECONDS of an event `followed` says is followed at once. (A get cut short by the linger takes
    nothing from the queue.)"""
    items = [await news.get()]
    while True:
        while not news.empty():
            items.append(news.get_nowait())
        last = items[-1]
        if not isinstance(last, event_pb2.RenderEvent) or not followed(last):
            return items
        try:
            async with asyncio.timeout(LINGER_SECONDS):
                items.append(await news.get())
        except TimeoutError:
            return items


class _Lane:
    """One shared stream and the renders in flight on it, by id."""

    def __init__(self, router: router_pb2_grpc.RouterServiceStub) -> None:
        self.renders: dict[str, asyncio.Queue[_News]] = {}
        self.stream = SharedStream(router.ExecuteRenders, self._on_response, self._on_broken)

    def _on_response(self, response: router_pb2.ExecuteRendersResponse) -> None:
        if response.HasField("event"):
            if (news := self.renders.get(response.render_id)) is not None:
                news.put_nowait(response.event)
            return
        news = self.renders.pop(response.render_id, None)
        if news is None:
            return  # its caller has left
        end = response.end
        if end.code == 0:
            news.put_nowait(None)
        elif end.status_details:
            news.put_nowait(rpc_error(status_pb2.Status.FromString(end.status_details)))
        else:
            news.put_nowait(rpc_error(status_pb2.Status(code=end.code, message=end.message)))
        self.if_idle()

    def if_idle(self) -> None:
        if not self.renders:
            self.stream.idle()

    def _on_broken(self, code: grpc.StatusCode, message: str) -> None:
        """Every render on the broken stream ends as its own call would have: broken."""
        broken = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), message)
        renders, self.renders = self.renders, {}
        for news in renders.values():
            news.put_nowait(broken)
