"""aio_interceptors: every kind of call a grpc.aio client makes carries the API key (a grpc.aio channel
files an interceptor under one kind only, so a single one for both would leave streams without it)."""

import grpc
import pytest

from aiprod_kit.apikeys import aio_interceptors


def _key_of(context: grpc.aio.ServicerContext) -> bytes:
    return dict(context.invocation_metadata()).get("authorization", "").encode()


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return _key_of(context)


async def _stream(request: bytes, context: grpc.aio.ServicerContext):
    yield _key_of(context)


@pytest.fixture
async def address():
    server = grpc.aio.server()
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def test_unary_and_streaming_calls_both_carry_the_key(address):
    async with grpc.aio.insecure_channel(
        address, interceptors=aio_interceptors("aiprod_k_secret")
    ) as channel:
        unary = await channel.unary_unary("/test.Echo/Unary")(b"")
        streamed = [message async for message in channel.unary_stream("/test.Echo/Stream")(b"")]
    assert unary == b"Bearer aiprod_k_secret"
    assert streamed == [b"Bearer aiprod_k_secret"]
