"""What every served call goes through (aiprod_kit.handlers, aiprod_kit.telemetry), on a real in-process
grpc.aio server: each method wrapped once, the concerns in their order, and the call's server span in
its caller's trace with the status it answered."""

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aiprod_kit.errors import ErrorStatuses, NotFound
from aiprod_kit.handlers import AnsweredOnce, WrappingInterceptor, rewrap
from aiprod_kit.telemetry import CallTelemetry

SAY = "/test.Echo/Say"
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN_ID = 0xB7AD6B7169203331


class Recording:
    """A concern that notes when it wraps a method and when it runs around a call."""

    def __init__(self, name: str, notes: list[str]) -> None:
        self._name, self._notes = name, notes

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        self._notes.append(f"{self._name} wraps {method}")

        def answered_once(inner: AnsweredOnce) -> AnsweredOnce:
            async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                self._notes.append(f"{self._name} runs")
                return await inner(request, context)

            return unary

        return rewrap(handler, answered_once, lambda inner: inner)


async def _say(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"missing":
        raise NotFound("nothing called missing")
    return request


async def _served(interceptor: WrappingInterceptor) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(_say)}
            ),
        )
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def channel(spans: InMemorySpanExporter) -> AsyncIterator[grpc.aio.Channel]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    interceptor = WrappingInterceptor([CallTelemetry(provider.get_tracer("test")), ErrorStatuses()])
    server, port = await _served(interceptor)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as opened:
        yield opened
    await server.stop(None)


async def test_each_method_is_wrapped_once_with_the_first_concern_outermost():
    notes: list[str] = []
    server, port = await _served(WrappingInterceptor([Recording("outer", notes), Recording("inner", notes)]))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            say = channel.unary_unary(SAY)
            assert await say(b"one", timeout=10) == b"one"
            assert await say(b"two", timeout=10) == b"two"
    finally:
        await server.stop(None)
    assert notes == [
        f"inner wraps {SAY}",
        f"outer wraps {SAY}",
        "outer runs",
        "inner runs",
        "outer runs",
        "inner runs",
    ]


async def test_a_call_is_a_server_span_in_its_callers_trace(channel, spans):
    traceparent = f"00-{TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"
    answer = await channel.unary_unary(SAY)(b"hello", metadata=(("traceparent", traceparent),), timeout=10)
    assert answer == b"hello"
    (span,) = spans.get_finished_spans()
    assert (span.name, span.kind) == (SAY, trace.SpanKind.SERVER)
    assert span.context.trace_id == TRACE_ID
    assert span.parent is not None and span.parent.span_id == CALLER_SPAN_ID
    assert dict(span.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": "test.Echo",
        "rpc.method": "Say",
        "rpc.grpc.status_code": 0,
    }
    assert span.status.status_code == trace.StatusCode.UNSET


async def test_a_refused_call_is_a_span_with_its_status_code_and_a_health_check_is_none(channel, spans):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await channel.unary_unary(SAY)(b"missing", timeout=10)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    check = health_pb2_grpc.HealthStub(channel).Check
    assert (
        await check(health_pb2.HealthCheckRequest(), timeout=10)
    ).status == health_pb2.HealthCheckResponse.SERVING
    (span,) = spans.get_finished_spans()
    assert span.name == SAY and span.parent is None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert (span.status.status_code, span.status.description) == (trace.StatusCode.ERROR, "NOT_FOUND")
