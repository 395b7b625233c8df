"""WatchRenders, both ends, without processes: the renderer's multiplexer (aiprod_kit.rendering.watching)
answers each named render as WatchRender would, and the router's RenderWatches hands each render's
news to its own followers, over one stream, through a stub that runs the renderer's side in-process.
"""

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from fake_streams import until, until_broken
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider

from aiprod.common.v1 import backend_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.errors import NotFound
from aiprod_kit.rendering.record import RenderRecord
from aiprod_kit.rendering.watching import watch_renders
from aiprod_router.watches import RenderWatches, WatchBroken

RUNNING = renderer_pb2.RENDER_STATE_RUNNING
SUCCEEDED = renderer_pb2.RENDER_STATE_SUCCEEDED


def record(task_id: str) -> RenderRecord:
    return RenderRecord(f"key-{task_id}", None, "model", backend_pb2.BACKEND_LOCAL, task_id)  # type: ignore[arg-type]


class Renders:
    """The renders a renderer knows, found as its servicer finds them."""

    def __init__(self, *task_ids: str) -> None:
        self.renders = {task_id: record(task_id) for task_id in task_ids}
        self.contexts: dict[str, trace.SpanContext] = {}

    async def find(self, task_id: str) -> RenderRecord:
        self.contexts[task_id] = trace.get_current_span().get_span_context()
        if task_id not in self.renders:
            raise NotFound(f"no render {task_id} at this renderer")
        return self.renders[task_id]


def request(*task_ids: str, stop: tuple[str, ...] = ()) -> renderer_pb2.WatchRendersRequest:
    return renderer_pb2.WatchRendersRequest(
        watch=[renderer_pb2.RenderToWatch(task_id=task_id) for task_id in task_ids], stop_task_ids=stop
    )


async def requests_of(queue: asyncio.Queue) -> AsyncIterator[renderer_pb2.WatchRendersRequest]:
    while (item := await queue.get()) is not None:
        yield item


async def next_news(responses: AsyncIterator[renderer_pb2.WatchRendersResponse]) -> tuple[str, object]:
    response = await asyncio.wait_for(anext(responses), 5)
    news = response.render.state if response.HasField("render") else grpc.StatusCode.NOT_FOUND
    if response.HasField("error"):
        assert response.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    return response.task_id, news


async def test_each_named_render_is_answered_with_its_status_then_its_changes_until_it_ends():
    renders = Renders("a", "b")
    sent: asyncio.Queue = asyncio.Queue()
    responses = watch_renders(requests_of(sent), renders.find)
    sent.put_nowait(request("a", "b"))
    assert {await next_news(responses), await next_news(responses)} == {
        ("a", renderer_pb2.RENDER_STATE_PENDING),
        ("b", renderer_pb2.RENDER_STATE_PENDING),
    }
    renders.renders["b"].update(RUNNING, 0.5)
    assert await next_news(responses) == ("b", RUNNING)
    renders.renders["a"].restore(renderer_pb2.Render(state=SUCCEEDED))
    assert await next_news(responses) == ("a", SUCCEEDED)
    # A render not here is said so on the stream, which goes on for the others.
    sent.put_nowait(request("missing"))
    assert await next_news(responses) == ("missing", grpc.StatusCode.NOT_FOUND)
    renders.renders["b"].update(RUNNING, 0.9)
    assert await next_news(responses) == ("b", RUNNING)
    # The caller closes its side: the stream ends after the last render it named has ended.
    sent.put_nowait(None)
    renders.renders["b"].restore(renderer_pb2.Render(state=SUCCEEDED))
    assert await next_news(responses) == ("b", SUCCEEDED)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(responses), 5)


async def test_a_render_no_longer_followed_sends_nothing_more():
    renders = Renders("a", "b")
    sent: asyncio.Queue = asyncio.Queue()
    responses = watch_renders(requests_of(sent), renders.find)
    sent.put_nowait(request("a", "b"))
    await next_news(responses), await next_news(responses)
    sent.put_nowait(request(stop=("a",)))
    # Stops are read in order with the requests: once "c" is answered, "a" is no longer followed.
    renders.renders["c"] = record("c")
    sent.put_nowait(request("c"))
    assert await next_news(responses) == ("c", renderer_pb2.RENDER_STATE_PENDING)
    renders.renders["a"].update(RUNNING, 0.5)
    renders.renders["b"].update(RUNNING, 0.5)
    assert await next_news(responses) == ("b", RUNNING)
    await responses.aclose()


async def test_a_render_re_attached_for_a_watch_joins_the_callers_trace():
    provider = TracerProvider()
    with provider.get_tracer("test").start_as_current_span("attempt") as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    renders = Renders("a")
    sent: asyncio.Queue = asyncio.Queue()
    responses = watch_renders(requests_of(sent), renders.find)
    sent.put_nowait(
        renderer_pb2.WatchRendersRequest(
            watch=[renderer_pb2.RenderToWatch(task_id="a", trace_context=carrier)]
        )
    )
    await next_news(responses)
    assert renders.contexts["a"].trace_id == span.get_span_context().trace_id
    await responses.aclose()


class InProcessStub:
    """A renderer stub whose WatchRenders runs the renderer's multiplexer in this loop; `opened`
    counts the streams, `broken` ends the open one as a lost connection would."""

    def __init__(self, renders: Renders) -> None:
        self.renders = renders
        self.opened = 0
        self.ended = 0
        self.requests: list[renderer_pb2.WatchRendersRequest] = []
        self._break = asyncio.Event()

    def WatchRenders(self, requests: AsyncIterator[renderer_pb2.WatchRendersRequest]):
        self.opened += 1
        self._break = asyncio.Event()
        return self._responses(requests, self._break)

    async def _responses(self, requests, broken: asyncio.Event):
        async def recorded():
            async for request in requests:
                self.requests.append(request)
                yield request

        async for answer in until_broken(watch_renders(recorded(), self.renders.find), broken):
            yield answer
        self.ended += 1

    def break_stream(self) -> None:
        self._break.set()


async def collect(watches: RenderWatches, task_id: str, into: list) -> None:
    try:
        async for render in watches.follow(task_id, {}):
            into.append(render.state if render.state != RUNNING else render.progress)
    except WatchBroken as error:
        into.append(error.code)


async def test_the_router_follows_every_render_at_a_renderer_over_one_stream():
    renders = Renders("a", "b", "c")
    stub = InProcessStub(renders)
    watches = RenderWatches(stub)  # type: ignore[arg-type]
    a, b, a_again, missing = [], [], [], []
    tasks = [
        asyncio.create_task(collect(watches, "a", a)),
        asyncio.create_task(collect(watches, "b", b)),
        asyncio.create_task(collect(watches, "nope", missing)),
    ]
    await until(lambda: a and b and missing)
    renders.renders["a"].update(RUNNING, 0.25)
    await until(lambda: len(a) == 2)
    # A second follower of a followed render starts from its last status, and the render is named once.
    tasks.append(asyncio.create_task(collect(watches, "a", a_again)))
    await until(lambda: a_again)
    renders.renders["a"].restore(renderer_pb2.Render(state=SUCCEEDED))
    renders.renders["b"].restore(renderer_pb2.Render(state=SUCCEEDED))
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert a == [renderer_pb2.RENDER_STATE_PENDING, 0.25, SUCCEEDED]
    assert a_again == [0.25, SUCCEEDED]
    assert b == [renderer_pb2.RENDER_STATE_PENDING, SUCCEEDED]
    assert missing == [grpc.StatusCode.NOT_FOUND]
    assert stub.opened == 1
    named = [watch.task_id for request in stub.requests for watch in request.watch]
    assert sorted(named) == ["a", "b", "nope"]
    assert watches.followed == 0
    # Nothing followed any more: the router's side is closed and the renderer ends the stream.
    await until(lambda: stub.ended == 1)
    await watches.close()


async def test_a_broken_stream_reaches_every_follower_and_the_next_watch_opens_a_new_one():
    renders = Renders("a", "b")
    stub = InProcessStub(renders)
    watches = RenderWatches(stub)  # type: ignore[arg-type]
    a, b = [], []
    tasks = [asyncio.create_task(collect(watches, "a", a)), asyncio.create_task(collect(watches, "b", b))]
    await until(lambda: a and b)
    stub.break_stream()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert a == [renderer_pb2.RENDER_STATE_PENDING, grpc.StatusCode.UNAVAILABLE]
    assert b == [renderer_pb2.RENDER_STATE_PENDING, grpc.StatusCode.UNAVAILABLE]
    # Followed again (as the router does once the renderer is reachable): a new stream, the status now.
    again = []
    task = asyncio.create_task(collect(watches, "a", again))
    await until(lambda: again)
    renders.renders["a"].restore(renderer_pb2.Render(state=SUCCEEDED))
    await asyncio.wait_for(task, 5)
    assert again == [renderer_pb2.RENDER_STATE_PENDING, SUCCEEDED]
    assert stub.opened == 2
    await watches.close()


async def test_a_follower_who_leaves_stops_the_renderers_news_of_that_render():
    renders = Renders("a", "b")
    stub = InProcessStub(renders)
    watches = RenderWatches(stub)  # type: ignore[arg-type]
    a, b = [], []
    leaving = asyncio.create_task(collect(watches, "a", a))
    staying = asyncio.create_task(collect(watches, "b", b))
    await until(lambda: a and b)
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    await until(lambda: any(request.stop_task_ids for request in stub.requests))
    assert [list(request.stop_task_ids) for request in stub.requests if request.stop_task_ids] == [["a"]]
    assert watches.followed == 1
    renders.renders["b"].restore(renderer_pb2.Render(state=SUCCEEDED))
    await asyncio.wait_for(staying, 5)
    assert b == [renderer_pb2.RENDER_STATE_PENDING, SUCCEEDED]
    await watches.close()
