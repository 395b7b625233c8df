"""Errors a handler raises, and the wrapper of every method that turns them into proper gRPC statuses.

Handlers raise; they never build statuses themselves. An unexpected exception becomes INTERNAL
with a generic message, so that nothing private (a prompt, a secret) leaks to the caller.

Every status carries a `google.rpc.ErrorInfo` (AIP-193): a `reason` from `ErrorReason`, the domain
`aiprod.dev`, and metadata where it helps a program (the amount left on a budget refusal, the job id on
NOT_FOUND). Callers branch on `error_reason(error)`, never on the status text.
"""

import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from aiprod_kit.handlers import AnsweredByStream, AnsweredOnce, Behavior, Responses, rewrap
from aiprod_kit.redaction import redact

log = structlog.get_logger()

DOMAIN = "aiprod.dev"

# gRPC sends a status in the call's trailers (its message percent-encoded in grpc-message, the whole
# google.rpc.Status in base64 in grpc-status-details-bin), and a peer refuses trailers over its metadata
# limit (8 KiB by default): the caller would read RESOURCE_EXHAUSTED instead of the error, and an error
# quoting a caller's 100,000 characters would hide itself. Handlers quote callers by short prefixes
# (`aiprod_kit.checks.echo`); these bounds are the net for a text that does not. In UTF-8 bytes, which
# is what travels: at most 3 KiB percent-encoded for the message, 4 KiB in base64 for the status.
MAX_STATUS_MESSAGE_BYTES = 1024
MAX_DETAIL_TEXT_BYTES = 256  # each ErrorInfo metadata value, BadRequest field and description
MAX_STATUS_BYTES = 3 * 1024  # past it, the details after the ErrorInfo are left out


class ErrorReason:
    """The `ErrorInfo.reason` values (UPPER_SNAKE, stable: callers branch on them)."""

    # A class's default, when nothing more precise is known: the status code's name.
    INTERNAL = "INTERNAL"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    # A tenant's service level (RESOURCE_EXHAUSTED with a RetryInfo; metadata: limit, tier).
    RATE_LIMITED = "RATE_LIMITED"  # the tenant's requests per minute are spent
    CONCURRENCY_LIMIT = "CONCURRENCY_LIMIT"  # the tenant has as many jobs queued or running as it may
    # Money.
    BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"  # the ledger refused a reservation, or the gateway a new job
    RESERVATION_NOT_FOUND = "RESERVATION_NOT_FOUND"
    RESERVATION_KEY_CONFLICT = "RESERVATION_KEY_CONFLICT"  # a key reused for other terms
    RESERVATION_SETTLED = "RESERVATION_SETTLED"  # committed, released or expired already
    LEDGER_UNAVAILABLE = "LEDGER_UNAVAILABLE"
    # Jobs.
    JOB_NOT_FOUND = "JOB_NOT_FOUND"
    JOB_ALREADY_EXISTS = "JOB_ALREADY_EXISTS"  # a request id reused for another request
    JOB_WRONG_STATE = (
        "JOB_WRONG_STATE"  # the job's state does not allow the call (ended, not awaiting approval)
    )
    NO_BACKEND = "NO_BACKEND"  # nothing configured can take the render now
    # Backends that could take the render are down, cooling down after failures or not reached yet
    # (UNAVAILABLE with a RetryInfo): the same call may succeed once one is back.
    BACKENDS_UNAVAILABLE = "BACKENDS_UNAVAILABLE"
    # A renderer runs as many tasks as it may (AIPROD_<PROVIDER>_MAX_CONCURRENT_TASKS) and no slot freed
    # while the call waited: nothing was started under its key; the same call may be made again.
    AT_CAPACITY = "AT_CAPACITY"
    # Quotes (metadata: quote_id; the prices in micro-USD).
    PRICE_LIMIT = "PRICE_LIMIT"  # the cheapest qualifying route costs more than the job's limit
    QUOTE_NOT_FOUND = "QUOTE_NOT_FOUND"  # no such quote of the caller's tenant
    QUOTE_MISMATCH = "QUOTE_MISMATCH"  # the quote was made for another spec
    QUOTE_EXPIRED = "QUOTE_EXPIRED"  # metadata: expire_time
    QUOTE_NOT_HOLDING = "QUOTE_NOT_HOLDING"  # its backend no longer qualifies (metadata: backend, why)
    QUOTE_USED = "QUOTE_USED"  # another request already created its job
    # The plan version a review call names is not the job's current one (metadata: current_version).
    PLAN_VERSION_STALE = "PLAN_VERSION_STALE"
    # Renders.
    RENDER_NOT_FOUND = "RENDER_NOT_FOUND"
    RENDER_ENDED = "RENDER_ENDED"
    RENDERER_NOT_SERVING = "RENDERER_NOT_SERVING"
    RENDERER_BUSY = "RENDERER_BUSY"  # no task slot free
    ROUTER_UNAVAILABLE = "ROUTER_UNAVAILABLE"
    RENDERER_UNAVAILABLE = "RENDERER_UNAVAILABLE"
    # Callers.
    UNAUTHENTICATED = "UNAUTHENTICATED"  # no API key, or one that is unknown, revoked or expired
    PERMISSION_DENIED = "PERMISSION_DENIED"
    TENANT_DISABLED = "TENANT_DISABLED"
    TENANT_NOT_FOUND = "TENANT_NOT_FOUND"
    TENANT_ALREADY_EXISTS = "TENANT_ALREADY_EXISTS"
    API_KEY_NOT_FOUND = "API_KEY_NOT_FOUND"
    # Infrastructure.
    DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
    HOST_UNRESOLVABLE = "HOST_UNRESOLVABLE"  # a URI's host cannot be resolved now


class ServiceError(Exception):
    """An error meant for the caller: its code and message reach them as they are, with an ErrorInfo
    naming `reason` (the class's default unless given) and `metadata` (string values). Message and
    metadata are redacted (aiprod_kit.redaction): a provider's error quoting the key it was sent, or a
    caller's signed URL, never travels on in them."""

    code = grpc.StatusCode.INTERNAL
    reason = ErrorReason.INTERNAL

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: Mapping[str, object] | None = None
    ) -> None:
        message = redact(message)
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = {key: redact(str(value)) for key, value in (metadata or {}).items()}

    def error_info(self) -> error_details_pb2.ErrorInfo:
        metadata = {key: cut(value, MAX_DETAIL_TEXT_BYTES) for key, value in self.metadata.items()}
        return error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=metadata)

    def details(self) -> list[any_pb2.Any]:
        """The status details: the ErrorInfo first, then any a subclass adds."""
        return [_packed(self.error_info()), *(_packed(detail) for detail in self.extra_details())]

    def extra_details(self) -> list[Any]:
        return []


class InvalidArgument(ServiceError):
    """Bad input: names every offending field (google.rpc.BadRequest)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = ErrorReason.INVALID_ARGUMENT

    def __init__(
        self,
        violations: list[tuple[str, str]],
        *,
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        violations = [(redact(field), redact(why)) for field, why in violations]
        super().__init__(
            "; ".join(f"{field}: {why}" for field, why in violations), reason=reason, metadata=metadata
        )
        self.violations = violations

    def extra_details(self) -> list[Any]:
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=cut(field, MAX_DETAIL_TEXT_BYTES), description=cut(why, MAX_DETAIL_TEXT_BYTES)
                    )
                    for field, why in self.violations
                ]
            )
        ]


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = ErrorReason.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = ErrorReason.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = ErrorReason.FAILED_PRECONDITION


class Aborted(ServiceError):
    """A concurrency conflict: the call was made against a version that is no longer current; read again,
    then retry."""

    code = grpc.StatusCode.ABORTED
    reason = ErrorReason.ABORTED


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = ErrorReason.UNIMPLEMENTED


class _RetryLater(ServiceError):
    """A refusal the same call may get past later. retry_after: seconds after which it may succeed, sent
    as a google.rpc.RetryInfo."""

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after = retry_after

    def extra_details(self) -> list[Any]:
        if self.retry_after is None:
            return []
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(round(self.retry_after * 1e9), 0))
        return [error_details_pb2.RetryInfo(retry_delay=delay)]


class ResourceExhausted(_RetryLater):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = ErrorReason.RESOURCE_EXHAUSTED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = ErrorReason.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = ErrorReason.PERMISSION_DENIED


class Unavailable(_RetryLater):
    code = grpc.StatusCode.UNAVAILABLE
    reason = ErrorReason.UNAVAILABLE


def cut(text: str, max_bytes: int) -> str:
    """text, or its longest prefix that fits in max_bytes of UTF-8 with "..." after it."""
    encoded = text.encode(errors="replace")
    if len(encoded) <= max_bytes:
        return text
    return encoded[: max_bytes - 3].decode(errors="ignore") + "..."


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


# The caller's side ------------------------------------------------------------------------------


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo an error status carries, or None (a status from gRPC itself, or from a peer
    that sends none)."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def error_reason(error: grpc.RpcError) -> str:
    """The ErrorInfo reason of an error status from an AIPROD service ("" when it has none)."""
    info = error_info(error)
    return info.reason if info is not None and info.domain == DOMAIN else ""


def retry_delay(error: grpc.RpcError) -> float | None:
    """The seconds a status's google.rpc.RetryInfo asks the caller to wait before trying again, or None."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        return None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


def rpc_error(status: status_pb2.Status) -> grpc.aio.AioRpcError:
    """The error a call ending with this status raises, for a call carried over a shared stream
    (aiprod_kit.multiplexing): its code, message and details as its own trailers would carry them."""
    code = status_code(status.code)
    trailers = grpc.aio.Metadata()
    if status.details:
        trailers.add("grpc-status-details-bin", status.SerializeToString())
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, status.message)


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The gRPC status code of a google.rpc.Code value (UNKNOWN for one gRPC does not know)."""
    return _STATUS_CODES.get(value, grpc.StatusCode.UNKNOWN)


# The server's side ------------------------------------------------------------------------------


def status_proto(error: Exception) -> status_pb2.Status:
    """The google.rpc.Status a call failing with this error ends with (INTERNAL for anything but a
    ServiceError), within the bounds gRPC's trailers can carry (see MAX_STATUS_BYTES)."""
    if not isinstance(error, ServiceError):
        error = _INTERNAL
    proto = status_pb2.Status(
        code=getattr(code_pb2, error.code.name),
        message=cut(error.message, MAX_STATUS_MESSAGE_BYTES),
        details=error.details(),
    )
    # Many violations, say: the ErrorInfo, which callers branch on, stays; the message names the fields.
    while proto.ByteSize() > MAX_STATUS_BYTES and len(proto.details) > 1:
        proto.details.pop()
    return proto


_INTERNAL = ServiceError("internal error; the service log has the details")


async def _abort(context: grpc.aio.ServicerContext, error: Exception, method: str) -> None:
    if not isinstance(error, ServiceError):
        log.exception("unexpected error", method=method)
    status = rpc_status.to_status(status_proto(error))
    await context.abort(status.code, status.details, status.trailing_metadata)


class _Undecodable:
    """A request body that is no protobuf message of the method's type, as its deserializer hands it on:
    grpc.aio would answer the parse error itself, as UNKNOWN, before any handler or interceptor ran."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.error = MalformedRequest(f"the request is not a valid {type_name} message ({error})")


def _checked(request: Any) -> Any:
    """The request, or the stream of requests, as the handler may read it: a body that could not be
    parsed raises its INVALID_ARGUMENT where it is read."""
    if isinstance(request, _Undecodable):
        raise request.error
    if hasattr(request, "__aiter__"):
        return _checked_stream(request)
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(request)


class MalformedRequest(ServiceError):
    """A request body that cannot be parsed as the method's request message: a caller's mistake."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = ErrorReason.INVALID_ARGUMENT


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The deserializer, handing on an _Undecodable for a body it cannot parse instead of raising."""
    if deserializer is None:
        return None
    request_type = getattr(deserializer, "__self__", None)
    descriptor = getattr(request_type, "DESCRIPTOR", None)
    type_name = descriptor.full_name if descriptor is not None else "request"

    def deserialize(body: bytes) -> Any:
        try:
            return deserializer(body)
        except message.DecodeError as error:
            return _Undecodable(type_name, error)

    return deserialize


class ErrorStatuses:
    """Maps ServiceError to its status and anything unexpected to INTERNAL; a request body that is no
    message of the method's type is INVALID_ARGUMENT (gRPC's own answer would be UNKNOWN). A
    `MethodWrapper` (aiprod_kit.handlers)."""

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        def answered_once(inner: AnsweredOnce) -> AnsweredOnce:
            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner(_checked(request), context)
                except (grpc.aio.AbortError, grpc.aio.UsageError):
                    raise
                except Exception as error:
                    await _abort(context, error, method)

            return unary

        def answered_by_stream(inner: Behavior) -> AnsweredByStream:
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Responses:
                try:
                    request = _checked(request)
                    if inspect.isasyncgenfunction(inner):
                        async for response in inner(request, context):
                            yield response
                    else:  # a coroutine that writes its responses with context.write (the health Watch)
                        await inner(request, context)
                except (grpc.aio.AbortError, grpc.aio.UsageError):
                    raise
                except Exception as error:
                    await _abort(context, error, method)

            return stream

        return rewrap(handler, answered_once, answered_by_stream, _tolerant(handler.request_deserializer))
