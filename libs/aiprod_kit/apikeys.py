"""The client's side of the gateway's API keys: every call on a channel carries the key.

`with_api_key(channel, key)` wraps a (synchronous) channel so that each call sends
`authorization: Bearer <key>`; `aio_interceptors(key)` does the same for grpc.aio channels.
"""

from collections.abc import Callable
from typing import Any

import grpc

# The variable the CLI reads the key from; `aiprod up` prints it.
API_KEY_VARIABLE = "AIPROD_API_KEY"
# The operators' key for AdminService.
ADMIN_KEY_VARIABLE = "AIPROD_ADMIN_KEY"


def bearer_metadata(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, key: str) -> None:
        self._metadata = bearer_metadata(key)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [item for item in details.metadata or () if item[0] != "authorization"]
        return _ClientCallDetails(details, [*metadata, *self._metadata])

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


def with_api_key(channel: grpc.Channel, key: str) -> grpc.Channel:
    """The channel, each of whose calls carries the key."""
    return grpc.intercept_channel(channel, _Bearer(key))


class _AioBearer:
    def __init__(self, key: str) -> None:
        self._metadata = bearer_metadata(key)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*[item for item in details.metadata or () if item[0] != "authorization"])
        for name, value in self._metadata:
            metadata.add(name, value)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _AioUnaryBearer(_AioBearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


class _AioStreamBearer(_AioBearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


def aio_interceptors(key: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for grpc.aio channels (`interceptors=`) adding the key to every call."""
    # One per kind of call: a grpc.aio channel files each interceptor under the first kind it is.
    return [_AioUnaryBearer(key), _AioStreamBearer(key)]
