"""The renders the router follows at one renderer, all over one WatchRenders stream.

A gRPC stream costs each side tens of kilobytes; one per render in flight was most of what a job cost
the router and the renderer. Each follower names its task id on the shared stream and reads its own
queue, which the stream's one reader fills with that render's news. When the stream breaks, every
follower hears it, as each of their own streams would have told them, and the next follower to name a
render opens a new stream.
"""

import asyncio
import contextvars
from collections.abc import AsyncIterator, Mapping

import grpc
import structlog

from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc

log = structlog.get_logger()

FINAL_RENDER_STATES = frozenset(
    {
        renderer_pb2.RENDER_STATE_SUCCEEDED,
        renderer_pb2.RENDER_STATE_FAILED,
        renderer_pb2.RENDER_STATE_CANCELLED,
    }
)


class WatchBroken(Exception):
    """A render's watch ended before its final state: the stream broke (its code), or the renderer
    said why it cannot follow this render (NOT_FOUND: it has no such render)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


_News = renderer_pb2.Render | WatchBroken
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


class _Followed:
    """One render named on the stream: its followers' queues (several calls may follow the same
    render, an ExecuteRender asked again say), and its last status, for a follower who joins late."""

    def __init__(self) -> None:
        self.followers: list[asyncio.Queue[_News]] = []
        self.last: renderer_pb2.Render | None = None

    def tell(self, news: _News) -> None:
        for follower in self.followers:
            follower.put_nowait(news)


class RenderWatches:
    """Every render followed at one renderer, multiplexed over one WatchRenders stream."""

    def __init__(self, stub: renderer_pb2_grpc.RendererServiceStub) -> None:
        self._stub = stub
        self._renders: dict[str, _Followed] = {}
        # The open stream's reader and the requests it has yet to send; None before the first.
        self._reader: asyncio.Task[None] | None = None
        self._requests: asyncio.Queue[renderer_pb2.WatchRendersRequest] = asyncio.Queue()

    @property
    def followed(self) -> int:
        """Renders followed now."""
        return len(self._renders)

    async def follow(
        self, task_id: str, trace_context: Mapping[str, str]
    ) -> AsyncIterator[renderer_pb2.Render]:
        """The render's status, then each change, up to its final state. Raises WatchBroken when the
        watch ends before that."""
        news: asyncio.Queue[_News] = asyncio.Queue()
        self._open()
        render = self._renders.get(task_id)
        if render is None:
            render = self._renders[task_id] = _Followed()
            watch = renderer_pb2.RenderToWatch(task_id=task_id, trace_context=trace_context)
            self._requests.put_nowait(renderer_pb2.WatchRendersRequest(watch=[watch]))
        elif render.last is not None:
            news.put_nowait(render.last)
        render.followers.append(news)
        try:
            while True:
                item = await news.get()
                if isinstance(item, WatchBroken):
                    raise item
                yield item
                if item.state in FINAL_RENDER_STATES:
                    return
        finally:
            if news in render.followers:
                render.followers.remove(news)
            if not render.followers and self._renders.get(task_id) is render:
                # Nobody follows it any more before it ended (the job was cancelled, the router
                # stops): the renderer need not send its news.
                del self._renders[task_id]
                self._requests.put_nowait(renderer_pb2.WatchRendersRequest(stop_task_ids=[task_id]))

    def _open(self) -> None:
        """Opens the stream unless it is open. Its task starts from an empty context: the stream is
        nobody's call, and must not keep the first follower's trace alive."""
        if self._reader is None or self._reader.done():
            self._requests = asyncio.Queue()
            self._reader = asyncio.create_task(
                self._read(self._requests), name="watch-renders", context=contextvars.Context()
            )

    async def _read(self, requests: asyncio.Queue[renderer_pb2.WatchRendersRequest]) -> None:
        code, message = grpc.StatusCode.UNAVAILABLE, "the renderer ended the stream"
        try:
            async for response in self._stub.WatchRenders(_sent(requests)):
                render = self._renders.get(response.task_id)
                if render is None:
                    continue  # its followers have left
                if response.HasField("error"):
                    del self._renders[response.task_id]
                    render.tell(WatchBroken(_status_code(response.error.code), response.error.message))
                    continue
                render.last = response.render
                render.tell(response.render)
                if response.render.state in FINAL_RENDER_STATES:
                    del self._renders[response.task_id]
        except grpc.aio.AioRpcError as error:
            code, message = error.code(), error.details() or ""
        finally:
            # Every render named on this stream hears it ended; a follower naming one from now on
            # opens a new stream.
            renders, self._renders = self._renders, {}
            for render in renders.values():
                render.tell(WatchBroken(code, message))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


async def _sent(
    requests: asyncio.Queue[renderer_pb2.WatchRendersRequest],
) -> AsyncIterator[renderer_pb2.WatchRendersRequest]:
    """The stream's requests; those queued meanwhile travel as one message."""
    while True:
        request = await requests.get()
        while not requests.empty():
            request.MergeFrom(requests.get_nowait())
        yield request


def _status_code(value: int) -> grpc.StatusCode:
    return _STATUS_CODES.get(value, grpc.StatusCode.UNKNOWN)
