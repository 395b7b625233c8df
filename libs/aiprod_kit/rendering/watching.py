"""WatchRenders: many renders followed over one stream, each as WatchRender would follow it alone.

Shared by every renderer (the provider kit's and the local one): they differ only in how a task id is
found. Each named render is followed by its own small task, which puts the render's changes, tagged
with its task id, on the one stream; a render that cannot be found ends with its error, as a
WatchRender call for it would.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import structlog
from google.rpc import code_pb2
from opentelemetry import context as otel_context
from opentelemetry import propagate

from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.errors import ServiceError
from aiprod_kit.rendering.record import RenderRecord

log = structlog.get_logger()

FindRender = Callable[[str], Awaitable[RenderRecord]]


async def watch_renders(
    requests: AsyncIterator[renderer_pb2.WatchRendersRequest], find: FindRender
) -> AsyncIterator[renderer_pb2.WatchRendersResponse]:
    """The answers to a WatchRenders call: every named render's status, then each change until it
    ends. When the caller closes its side, the stream ends once the renders it named have ended."""
    outbox: asyncio.Queue[renderer_pb2.WatchRendersResponse | None] = asyncio.Queue()
    followers: dict[str, asyncio.Task[None]] = {}

    async def follow(watch: renderer_pb2.RenderToWatch) -> None:
        task_id = watch.task_id
        if watch.trace_context:
            # This task's own context: a render re-attached for this watch joins the caller's trace.
            otel_context.attach(propagate.extract(dict(watch.trace_context)))
        try:
            render = await find(task_id)
            async for status in render.watch():
                outbox.put_nowait(renderer_pb2.WatchRendersResponse(task_id=task_id, render=status))
        except ServiceError as error:
            outbox.put_nowait(_error(task_id, error.code, error.message))
        except Exception:
            log.exception("render watch failed", task_id=task_id)
            outbox.put_nowait(
                _error(task_id, grpc.StatusCode.INTERNAL, "internal error; see the renderer log")
            )
        finally:
            if followers.get(task_id) is asyncio.current_task():
                del followers[task_id]

    async def read() -> None:
        async for request in requests:
            for task_id in request.stop_task_ids:
                if (follower := followers.pop(task_id, None)) is not None:
                    follower.cancel()
            for watch in request.watch:
                if watch.task_id not in followers:
                    followers[watch.task_id] = asyncio.create_task(follow(watch), name=watch.task_id)
        # The caller has named every render it will: the stream ends after their last news.
        while followers:
            await asyncio.wait(list(followers.values()))

    reader = asyncio.create_task(read())
    reader.add_done_callback(lambda _: outbox.put_nowait(None))
    try:
        while (response := await outbox.get()) is not None:
            yield response
        await reader  # its error, if the request stream broke
    finally:
        for task in (reader, *followers.values()):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(reader, *followers.values(), return_exceptions=True)


def _error(task_id: str, code: grpc.StatusCode, message: str) -> renderer_pb2.WatchRendersResponse:
    return renderer_pb2.WatchRendersResponse(
        task_id=task_id,
        error=renderer_pb2.WatchError(code=getattr(code_pb2, code.name), message=message),
    )
