"""Wrapping a gRPC method handler's behaviour, whatever its kind, for the server interceptors.

A handler holds its behaviour under one of four attributes, one per kind of call; an interceptor that
wrapped only some kinds would let the others past it (an unguarded bidirectional stream, say). Each
interceptor says how it wraps a call answered once and a call answered by a stream; `rewrap` applies
the right one and rebuilds the handler of the same kind.
"""

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

Behavior = Callable[..., Any]
Wrap = Callable[[Behavior], Behavior]
# Named once here: the interceptors define their wrappers at every call, and a nested function's
# annotations are evaluated each time it is defined (Callable[...] built anew, about 1% of a create).
AnsweredOnce = Callable[..., Awaitable[Any]]
Responses = AsyncIterator[Any]
AnsweredByStream = Callable[..., Responses]


def rewrap(
    handler: grpc.RpcMethodHandler,
    answered_once: Wrap,
    answered_by_stream: Wrap,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """The handler with its behaviour wrapped: `answered_once` for unary responses, `answered_by_stream`
    for streamed ones (both take (request or request iterator, context)). `request_deserializer`, when
    given, replaces the handler's."""
    deserializer = request_deserializer or handler.request_deserializer
    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            answered_once(handler.unary_unary), deserializer, serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            answered_by_stream(handler.unary_stream), deserializer, serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            answered_once(handler.stream_unary), deserializer, serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        answered_by_stream(handler.stream_stream), deserializer, serializer
    )
