"""WatchRenders: many renders followed over one stream, each as WatchRender would follow it alone.

Shared by every renderer (the provider kit's and the local one): they differ only in how a task id is
found. A render that cannot be found ends with its error, as a WatchRender call for it would.
"""

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import structlog
from google.rpc import code_pb2

from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.errors import ServiceError
from aiprod_kit.multiplexing import Multiplexed, Order, Start, Stop
from aiprod_kit.rendering.record import RenderRecord

log = structlog.get_logger()

FindRender = Callable[[str], Awaitable[RenderRecord]]


def watch_renders(
    requests: AsyncIterator[renderer_pb2.WatchRendersRequest], find: FindRender
) -> AsyncIterator[renderer_pb2.WatchRendersResponse]:
    """The answers to a WatchRenders call: every named render's status, then each change until it
    ends. When the caller closes its side, the stream ends once the renders it named have ended."""

    async def statuses(task_id: str) -> AsyncIterator[renderer_pb2.Render]:
        render = await find(task_id)
        async for status in render.watch():
            yield status

    def orders(request: renderer_pb2.WatchRendersRequest) -> list[Order]:
        stops: list[Order] = [Stop(task_id) for task_id in request.stop_task_ids]
        return stops + [
            Start(watch.task_id, lambda task_id=watch.task_id: statuses(task_id), watch.trace_context)
            for watch in request.watch
        ]

    return Multiplexed(orders, _status, _ending).serve(requests)


def _status(task_id: str, render: renderer_pb2.Render) -> renderer_pb2.WatchRendersResponse:
    return renderer_pb2.WatchRendersResponse(task_id=task_id, render=render)


def _ending(task_id: str, error: Exception | None) -> renderer_pb2.WatchRendersResponse | None:
    """A watch that ended with its render's final status says nothing more; one that failed says why."""
    if error is None:
        return None
    if isinstance(error, ServiceError):
        code, message = error.code, error.message
    else:
        log.error("render watch failed", task_id=task_id, exc_info=error)
        code, message = grpc.StatusCode.INTERNAL, "internal error; see the renderer log"
    return renderer_pb2.WatchRendersResponse(
        task_id=task_id, error=renderer_pb2.WatchError(code=getattr(code_pb2, code.name), message=message)
    )
