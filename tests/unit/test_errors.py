"""Reasons are codes: the failure-reason catalogue's helper, and the ErrorInfo every error status carries,
read back through a real in-process gRPC server with the error statuses, as a caller reads it."""

from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aiprod.common.v1 import render_pb2
from aiprod_kit import errors
from aiprod_kit.errors import (
    DOMAIN,
    MAX_DETAIL_TEXT_BYTES,
    MAX_STATUS_MESSAGE_BYTES,
    AlreadyExists,
    ErrorReason,
    ErrorStatuses,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    Unimplemented,
    cut,
    error_info,
    error_reason,
    retry_delay,
)
from aiprod_kit.failures import Reason, failure, reason_name, reason_value
from aiprod_kit.handlers import WrappingInterceptor

# The failure catalogue -------------------------------------------------------------------------------


def test_every_failure_reason_has_a_short_constant_and_name():
    for full, value in render_pb2.FailureReason.items():
        short = full.removeprefix("FAILURE_REASON_")
        assert getattr(Reason, short) == value
        assert reason_name(value) == short
        assert reason_value(short) == reason_value(full) == value
    constants = {name for name in vars(Reason) if name.isupper()}
    assert len(constants) == len(render_pb2.FailureReason.keys())


def test_the_merged_near_duplicate_and_an_unknown_value():
    assert not hasattr(Reason, "RENDERER_LOST")
    assert reason_name(Reason.RENDER_LOST) == "RENDER_LOST"
    assert reason_name(9999) == "9999"  # a newer peer's value: shown, never an exception
    with pytest.raises(ValueError):
        reason_value("RENDERER_LOST")


def test_failure_builds_a_render_failure():
    built = failure(Reason.PROVIDER_FAILED, "the task failed", True, provider_code="E42")
    assert built == render_pb2.RenderFailure(
        reason=render_pb2.FAILURE_REASON_PROVIDER_FAILED,
        message="the task failed",
        retryable=True,
        provider_code="E42",
    )


# ErrorInfo on every status -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ServiceError("x"), "INTERNAL"),
        (InvalidArgument([("f", "bad")]), "INVALID_ARGUMENT"),
        (NotFound("x"), "NOT_FOUND"),
        (AlreadyExists("x"), "ALREADY_EXISTS"),
        (FailedPrecondition("x"), "FAILED_PRECONDITION"),
        (Unimplemented("x"), "UNIMPLEMENTED"),
        (ResourceExhausted("x"), "RESOURCE_EXHAUSTED"),
        (Unavailable("x"), "UNAVAILABLE"),
    ],
)
def test_each_error_class_has_a_default_reason(error: ServiceError, reason: str):
    info = error.error_info()
    assert (info.reason, info.domain, dict(info.metadata)) == (reason, DOMAIN, {})
    # The default is the status code's name.
    assert reason == error.code.name


def test_a_given_reason_and_metadata_override_the_default_and_metadata_is_text():
    error = ResourceExhausted(
        "spent", reason=ErrorReason.BUDGET_EXHAUSTED, metadata={"remaining_micros": 0, "scope": "global"}
    )
    assert error.message == "spent"
    assert error.error_info().reason == "BUDGET_EXHAUSTED"
    assert dict(error.error_info().metadata) == {"remaining_micros": "0", "scope": "global"}
    assert ResourceExhausted("other").reason == "RESOURCE_EXHAUSTED"  # the class default is untouched


def test_every_error_reason_is_upper_snake():
    for name, value in vars(ErrorReason).items():
        if name.isupper():
            assert value == name and value.replace("_", "").isalnum() and value.isupper()


# Through a server ----------------------------------------------------------------------------------------

_RAISED: dict[str, Exception] = {
    "not_found": NotFound("job x does not exist", reason=ErrorReason.JOB_NOT_FOUND, metadata={"job_id": "x"}),
    "invalid": InvalidArgument([("spec.prompt", "must not be empty")]),
    "unexpected": RuntimeError("a secret in the text"),
    "limited": ResourceExhausted(
        "10 requests a minute", reason=ErrorReason.RATE_LIMITED, metadata={"limit": 10}, retry_after=12.5
    ),
    # Errors that quote a caller's 100,000 characters, in a message, metadata or a violation: two bytes
    # a character, six once percent-encoded in the trailers.
    "long_message": NotFound("no render " + "é" * 100_000, metadata={"task_id": "t" * 100_000}),
    "long_violation": InvalidArgument([("task_id", "is not " + "k" * 100_000)]),
    "many_violations": InvalidArgument(
        [(f"events[{i}].time", "must be a time in 1..9999") for i in range(5000)]
    ),
}


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise _RAISED[request.decode()]

    async def parse(request: render_pb2.Shot, context: grpc.aio.ServicerContext) -> bytes:
        return request.prompt.encode()

    async def parse_stream(
        request: render_pb2.Shot, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        yield request.prompt.encode()

    handler = grpc.method_handlers_generic_handler(
        "test.Errors",
        {
            "Raise": grpc.unary_unary_rpc_method_handler(unary),
            "Parse": grpc.unary_unary_rpc_method_handler(parse, render_pb2.Shot.FromString),
            "ParseStream": grpc.unary_stream_rpc_method_handler(parse_stream, render_pb2.Shot.FromString),
        },
    )
    server = grpc.aio.server(interceptors=[WrappingInterceptor([ErrorStatuses()])])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as opened:
        yield opened
    await server.stop(None)


async def _raised(channel: grpc.aio.Channel, which: str) -> grpc.aio.AioRpcError:
    call = channel.unary_unary("/test.Errors/Raise")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(which.encode(), timeout=10)
    return raised.value


async def test_a_caller_reads_the_reason_and_metadata(channel):
    error = await _raised(channel, "not_found")
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(error) == "JOB_NOT_FOUND"
    info = error_info(error)
    assert info is not None and dict(info.metadata) == {"job_id": "x"}


async def test_bad_input_carries_error_info_beside_bad_request(channel):
    error = await _raised(channel, "invalid")
    status = rpc_status.from_call(error)
    assert status is not None
    kinds = [detail.TypeName() for detail in status.details]
    assert kinds == ["google.rpc.ErrorInfo", "google.rpc.BadRequest"]
    bad_request = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad_request)
    assert [v.field for v in bad_request.field_violations] == ["spec.prompt"]
    assert error_reason(error) == "INVALID_ARGUMENT"


async def test_a_refusal_to_retry_later_carries_retry_info_beside_error_info(channel):
    error = await _raised(channel, "limited")
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(error) == "RATE_LIMITED"
    assert retry_delay(error) == 12.5
    status = rpc_status.from_call(error)
    assert status is not None
    assert [detail.TypeName() for detail in status.details] == [
        "google.rpc.ErrorInfo",
        "google.rpc.RetryInfo",
    ]
    # Without a delay, no RetryInfo.
    assert ResourceExhausted("spent").extra_details() == []
    assert retry_delay(await _raised(channel, "not_found")) is None


async def test_an_unexpected_error_is_internal_with_error_info_and_nothing_private(channel):
    error = await _raised(channel, "unexpected")
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (error.details() or "")
    assert error_reason(error) == "INTERNAL"


async def test_a_body_that_is_no_message_of_the_request_type_is_invalid_argument(channel):
    # A field of wire type 7, which does not exist: grpc.aio itself would answer UNKNOWN.
    for call in (channel.unary_unary("/test.Errors/Parse"), channel.unary_stream("/test.Errors/ParseStream")):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            answer = call(b"\x0f", timeout=10)
            if hasattr(answer, "__aiter__"):
                [item async for item in answer]
            else:
                await answer
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid aiprod.common.v1.Shot message" in (raised.value.details() or "")
        assert error_reason(raised.value) == "INVALID_ARGUMENT"
    # A body that parses reaches the handler as the message.
    body = render_pb2.Shot(prompt="boat").SerializeToString()
    assert await channel.unary_unary("/test.Errors/Parse")(body, timeout=10) == b"boat"
    assert [item async for item in channel.unary_stream("/test.Errors/ParseStream")(body, timeout=10)] == [
        b"boat"
    ]


def test_a_status_without_error_info_reads_as_no_reason():
    class Bare(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "gone"

        def trailing_metadata(self) -> tuple:
            return ()

    assert error_info(Bare()) is None
    assert error_reason(Bare()) == ""
    assert errors.DOMAIN == "aiprod.dev"


# Bounds on a status --------------------------------------------------------------------------------------


def test_cut_keeps_a_text_that_fits_and_cuts_one_that_does_not_at_a_character():
    assert cut("short", 10) == "short"
    assert cut("k" * 100, 10) == "kkkkkkk..."
    # Never half a character: "é" is two bytes.
    assert cut("é" * 100, 10) == "ééé..."
    assert len(cut("é" * 100, 11).encode()) <= 11


async def test_an_error_quoting_a_long_text_keeps_its_code_within_bounds(channel):
    error = await _raised(channel, "long_message")
    # Not the transport's RESOURCE_EXHAUSTED for trailers over its metadata limit.
    assert error.code() == grpc.StatusCode.NOT_FOUND
    details = error.details() or ""
    assert details.startswith("no render éé") and details.endswith("...")
    assert len(details.encode()) <= MAX_STATUS_MESSAGE_BYTES
    info = error_info(error)
    assert info is not None and info.reason == "NOT_FOUND"
    assert len(info.metadata["task_id"].encode()) <= MAX_DETAIL_TEXT_BYTES


async def test_a_long_violation_is_cut_and_still_names_its_field(channel):
    error = await _raised(channel, "long_violation")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad_request)
    [violation] = bad_request.field_violations
    assert violation.field == "task_id"
    assert (
        violation.description.startswith("is not kkk") and len(violation.description) <= MAX_DETAIL_TEXT_BYTES
    )


async def test_too_many_violations_leave_the_error_info_and_the_message(channel):
    error = await _raised(channel, "many_violations")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "INVALID_ARGUMENT"
    assert (error.details() or "").startswith("events[0].time: must be a time in 1..9999; events[1].time")
    status = rpc_status.from_call(error)
    assert status is not None
    assert [detail.TypeName() for detail in status.details] == ["google.rpc.ErrorInfo"]


def test_an_error_never_carries_a_secret_to_its_caller():
    """A provider's refusal quoting the key it was sent, a caller's signed URL in a violation: the
    message, the ErrorInfo metadata and the BadRequest descriptions are redacted; so is a failure."""
    from aiprod_kit.redaction import REDACTED, forget_secrets, register_secret

    register_secret("rk_registered_0123456789")
    try:
        error = Unavailable(
            "runway refused: 'Bearer rk_registered_0123456789'",
            metadata={"why": "echo rk_registered_0123456789"},
        )
        invalid = InvalidArgument(
            [("spec.first_frame.uri", "'https://h/x.png?X-Goog-Signature=abc123' refused")]
        )
        render_failure = failure(Reason.PROVIDER_AUTH, "401: invalid token rk_registered_0123456789", False)
    finally:
        forget_secrets()
    assert error.message == f"runway refused: 'Bearer {REDACTED}'"
    assert error.error_info().metadata["why"] == f"echo {REDACTED}"
    assert "abc123" not in invalid.message
    (bad_request,) = invalid.extra_details()
    assert "abc123" not in bad_request.field_violations[0].description
    assert render_failure.message == f"401: invalid token {REDACTED}"
