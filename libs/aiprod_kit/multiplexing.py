"""Many streamed answers over one bidirectional gRPC stream: the server's side (`Multiplexed`) and the
caller's (`SharedStream`).

A gRPC stream costs each side tens of kilobytes; a caller with thousands of streams open at once
(the router following renders, the gateway running them) pays it thousands of times. Instead it opens
one stream and names, in its requests, each answer it wants by an id of its own; each answer runs as
its own task here and puts its items, and its end, on the one outgoing stream, tagged with that id.

The service says what a request asks (`orders`) and how an item and an end travel; this module runs
them. Each answer runs in the caller's trace context for it (W3C carrier), as its own call would.
"""

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate

Request = TypeVar("Request")
Response = TypeVar("Response")


@dataclass(frozen=True)
class Start:
    """Starts the answer `id`, the items `answer()` yields; ignored while one under that id runs."""

    id: str
    answer: Callable[[], AsyncIterator[Any]]
    trace_context: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Stop:
    """Stops the answer `id`: nothing more is sent for it."""

    id: str


Order = Start | Stop


@dataclass(frozen=True)
class Multiplexed(Generic[Request, Response]):
    """How one service's multiplexed method reads and writes: the orders each request carries, an
    item as a response, and an answer's end as a response (error None: it ended normally; None: say
    nothing)."""

    orders: Callable[[Request], Iterable[Order]]
    item: Callable[[str, Any], Response]
    end: Callable[[str, Exception | None], Response | None]

    async def serve(self, requests: AsyncIterator[Request]) -> AsyncIterator[Response]:
        """The responses to a stream of requests. When the caller closes its side, the stream ends once
        the answers it started have ended."""
        outbox: asyncio.Queue[Response | None] = asyncio.Queue()
        running: dict[str, asyncio.Task[None]] = {}

        async def run(start: Start) -> None:
            if start.trace_context:
                # This task's own context: the answer joins its caller's trace.
                otel_context.attach(propagate.extract(dict(start.trace_context)))
            error: Exception | None = None
            try:
                async for item in start.answer():
                    outbox.put_nowait(self.item(start.id, item))
            except asyncio.CancelledError:
                raise  # stopped: nothing more is said
            except Exception as failed:
                error = failed
            finally:
                if running.get(start.id) is asyncio.current_task():
                    del running[start.id]
            if (last := self.end(start.id, error)) is not None:
                outbox.put_nowait(last)

        async def read() -> None:
            async for request in requests:
                for order in self.orders(request):
                    if isinstance(order, Stop):
                        if (task := running.pop(order.id, None)) is not None:
                            task.cancel()
                    elif order.id not in running:
                        running[order.id] = asyncio.create_task(run(order), name=order.id)
            # The caller has started every answer it will: the stream ends after their last news.
            while running:
                await asyncio.wait(list(running.values()))

        reader = asyncio.create_task(read())
        reader.add_done_callback(lambda _: outbox.put_nowait(None))
        try:
            while (response := await outbox.get()) is not None:
                yield response
            await reader  # its error, if the request stream broke
        finally:
            for task in (reader, *running.values()):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reader, *running.values(), return_exceptions=True)


class SharedStream(Generic[Request, Response]):
    """The caller's side: one bidirectional stream that many answers share, opened when a request is
    first sent and again after it broke. Each response goes to `on_response`; when the stream breaks,
    `on_broken` hears how, and every answer it carried must be told (their requests died with it).

    Its caller says when nothing is in flight (`idle`): its side of the stream is closed then, the
    stream ends once the server has said its last, and the next request opens a new one. A stream
    left open would hold the server's graceful stop for its whole grace period.

    Its task starts from an empty context: the stream is nobody's call, and must not keep the trace of
    whoever happened to open it alive."""

    def __init__(
        self,
        open_stream: Callable[[AsyncIterator[Request]], AsyncIterator[Response]],
        on_response: Callable[[Response], None],
        on_broken: Callable[[grpc.StatusCode, str], None],
        merge: bool = False,
    ) -> None:
        self._open_stream = open_stream
        self._on_response = on_response
        self._on_broken = on_broken
        # Requests queued while the stream was busy travel as one message (repeated fields only).
        self._merge = merge
        # The open stream's requests yet to send (None: no stream takes requests now); its readers,
        # the open one and any closed by `idle` that the server has not ended yet.
        self._requests: asyncio.Queue[Request | None] | None = None
        self._readers: set[asyncio.Task[None]] = set()

    def send(self, request: Request) -> None:
        if self._requests is None:
            self._requests = asyncio.Queue()
            reader = asyncio.create_task(
                self._read(self._requests), name="shared-stream", context=contextvars.Context()
            )
            self._readers.add(reader)
            reader.add_done_callback(self._readers.discard)
        self._requests.put_nowait(request)

    def idle(self) -> None:
        """Nothing is in flight: closes the caller's side of the open stream."""
        if self._requests is not None:
            self._requests.put_nowait(None)
            self._requests = None

    async def _read(self, requests: asyncio.Queue[Request | None]) -> None:
        code, message = grpc.StatusCode.UNAVAILABLE, "the server ended the stream"
        try:
            async for response in self._open_stream(self._sent(requests)):
                self._on_response(response)
        except grpc.aio.AioRpcError as error:
            code, message = error.code(), error.details() or ""
        finally:
            # Still the open stream: what it carried dies with it. One closed as idle carried nothing.
            if self._requests is requests:
                self._requests = None
                self._on_broken(code, message)

    async def _sent(self, requests: asyncio.Queue[Request | None]) -> AsyncIterator[Request]:
        while (request := await requests.get()) is not None:
            while self._merge and not requests.empty():
                if (more := requests.get_nowait()) is None:
                    yield request
                    return
                request.MergeFrom(more)  # type: ignore[attr-defined]
            yield request

    async def close(self) -> None:
        readers = list(self._readers)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
