"""The renderer's side of WatchRenders for a unit test's fake renderer: each render named on the
request stream is answered by the fake's own statuses for it, tagged with its task id."""

from collections.abc import AsyncIterator, Callable

from aiprod.renderer.v1 import renderer_pb2

Statuses = Callable[[str], AsyncIterator[renderer_pb2.Render]]


async def watch_renders(
    requests: AsyncIterator[renderer_pb2.WatchRendersRequest], statuses: Statuses
) -> AsyncIterator[renderer_pb2.WatchRendersResponse]:
    async for request in requests:
        for watch in request.watch:
            async for render in statuses(watch.task_id):
                yield renderer_pb2.WatchRendersResponse(task_id=watch.task_id, render=render)
