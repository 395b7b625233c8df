"""The server's side of the mesh's multiplexed streams for unit tests' fakes, built on their own
per-call fakes: WatchRenders answered by a fake renderer's statuses for each render, ExecuteRenders by
a scripted router's own ExecuteRender and ResumeRender calls. Each runs as the real services run it
(aiprod_kit.multiplexing), every render on its own task."""

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from aiprod.renderer.v1 import renderer_pb2
from aiprod.router.v1 import router_pb2
from aiprod_kit.multiplexing import Multiplexed, Order, Start, Stop

Statuses = Callable[[str], AsyncIterator[renderer_pb2.Render]]


def watch_renders(
    requests: AsyncIterator[renderer_pb2.WatchRendersRequest], statuses: Statuses
) -> AsyncIterator[renderer_pb2.WatchRendersResponse]:
    def orders(request: renderer_pb2.WatchRendersRequest) -> list[Order]:
        return [
            Start(watch.task_id, lambda task_id=watch.task_id: statuses(task_id)) for watch in request.watch
        ]

    def status(task_id: str, render: renderer_pb2.Render) -> renderer_pb2.WatchRendersResponse:
        return renderer_pb2.WatchRendersResponse(task_id=task_id, render=render)

    return Multiplexed(orders, status, lambda task_id, error: None).serve(requests)


def execute_renders(
    router: Any, requests: AsyncIterator[router_pb2.ExecuteRendersRequest]
) -> AsyncIterator[router_pb2.ExecuteRendersResponse]:
    """`router` has ExecuteRender and ResumeRender returning a stream with `cancel()`."""

    def orders(request: router_pb2.ExecuteRendersRequest) -> list[Order]:
        if request.stop:
            return [Stop(request.render_id)]
        if request.HasField("execute"):
            call = router.ExecuteRender(request.execute)
        else:
            call = router.ResumeRender(request.resume)

        async def events() -> AsyncIterator[Any]:
            try:
                async for response in call:
                    yield response.event
            except asyncio.CancelledError:
                call.cancel()
                raise

        return [Start(request.render_id, events)]

    def event(render_id: str, item: Any) -> router_pb2.ExecuteRendersResponse:
        return router_pb2.ExecuteRendersResponse(render_id=render_id, event=item)

    def end(render_id: str, error: Exception | None) -> router_pb2.ExecuteRendersResponse:
        if error is None:
            return router_pb2.ExecuteRendersResponse(render_id=render_id, end=router_pb2.CallEnd())
        assert isinstance(error, grpc.aio.AioRpcError), error
        details = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin", b"")
        status = router_pb2.CallEnd(
            code=error.code().value[0], message=error.details() or "", status_details=details
        )
        return router_pb2.ExecuteRendersResponse(render_id=render_id, end=status)

    return Multiplexed(orders, event, end).serve(requests)


async def until_broken(responses: AsyncIterator[Any], broken: asyncio.Event) -> AsyncIterator[Any]:
    """The responses, until `broken` is set: then the stream fails UNAVAILABLE, as a lost connection
    fails it."""
    breaking = asyncio.ensure_future(broken.wait())
    try:
        while True:
            response = asyncio.ensure_future(anext(responses))
            await asyncio.wait([response, breaking], return_when=asyncio.FIRST_COMPLETED)
            if not response.done():
                response.cancel()
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "connection lost"
                )
            try:
                yield response.result()
            except StopAsyncIteration:
                return
    finally:
        breaking.cancel()
        await responses.aclose()  # type: ignore[attr-defined]


async def until(condition: Callable[[], object]) -> None:
    """Lets the loop run until the condition holds (no clock: every other task gets its turns)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")
