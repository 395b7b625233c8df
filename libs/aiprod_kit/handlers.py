"""Wrapping a gRPC method handler's behaviour, whatever its kind: how the concerns of every call
(telemetry, errors, guards) reach each method, once per method (`WrappingInterceptor`).

A handler holds its behaviour under one of four attributes, one per kind of call; a concern that
wrapped only some kinds would let the others past it (an unguarded bidirectional stream, say). Each
concern says how it wraps a call answered once and a call answered by a stream; `rewrap` applies the
right one and rebuilds the handler of the same kind.
"""

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc

Behavior = Callable[..., Any]
Wrap = Callable[[Behavior], Behavior]
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


class MethodWrapper(Protocol):
    """One concern of every call (its telemetry, its errors' statuses, a service's guard)."""

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The method's handler with this concern's behaviour around it (or the handler itself)."""
        ...


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """A server's one interceptor: each method's handler wrapped by every concern, the first one
    outermost, the first time the method is called, and kept. An interceptor per concern built its
    wrapping again at every call (an interceptor's coroutine, closures and a new handler each), health
    checks included: wrapped once, the gateway's health checks went 15% faster (docs/performance.md,
    session 17)."""

    def __init__(self, wrappers: Sequence[MethodWrapper]) -> None:
        self._wrappers = list(reversed(wrappers))
        # By method: the handler as found, and as wrapped.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = handler
        for wrapper in self._wrappers:
            wrapped = wrapper.wrap(method, wrapped)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
