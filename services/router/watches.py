"""The renders the router follows at one renderer, all over one WatchRenders stream.

A gRPC stream costs each side tens of kilobytes; one per render in flight was most of what a job cost
the router and the renderer. Each follower names its task id on the shared stream and reads its own
queue, which the stream's one reader fills with that render's news. When the stream breaks, every
follower hears it, as each of their own streams would have told them, and the next follower to name a
render opens a new stream.
"""

import asyncio
from collections.abc import AsyncIterator, Mapping

import grpc
import structlog

from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.errors import status_code
from aiprod_kit.multiplexing import SharedStream

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
        self._renders: dict[str, _Followed] = {}
        self._stream = SharedStream(stub.WatchRenders, self._on_response, self._on_broken, merge=True)

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
        render = self._renders.get(task_id)
        if render is None:
            render = self._renders[task_id] = _Followed()
            watch = renderer_pb2.RenderToWatch(task_id=task_id, trace_context=trace_context)
            self._stream.send(renderer_pb2.WatchRendersRequest(watch=[watch]))
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
                self._stream.send(renderer_pb2.WatchRendersRequest(stop_task_ids=[task_id]))
                self._if_idle()

    def _on_response(self, response: renderer_pb2.WatchRendersResponse) -> None:
        render = self._renders.get(response.task_id)
        if render is None:
            return  # its followers have left
        if response.HasField("error"):
            del self._renders[response.task_id]
            render.tell(WatchBroken(status_code(response.error.code), response.error.message))
        else:
            render.last = response.render
            render.tell(response.render)
            if response.render.state not in FINAL_RENDER_STATES:
                return
            del self._renders[response.task_id]
        self._if_idle()

    def _if_idle(self) -> None:
        if not self._renders:
            self._stream.idle()

    def _on_broken(self, code: grpc.StatusCode, message: str) -> None:
        """Every render named on the broken stream hears it; the next one named opens a new stream."""
        renders, self._renders = self._renders, {}
        for render in renders.values():
            render.tell(WatchBroken(code, message))

    async def close(self) -> None:
        await self._stream.close()
