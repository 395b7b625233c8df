"""Failure reasons: one catalogue, the proto enum `aiprod.common.v1.FailureReason`.

Code branches on the enum (`Reason.PROVIDER_UNCERTAIN`); people, logs and metric labels see its short
name (`reason_name(code) == "PROVIDER_UNCERTAIN"`), the enum name without its `FAILURE_REASON_` prefix.

    from aiprod_kit.failures import Reason, failure, reason_name

    failure(Reason.PROVIDER_FAILED, "the task failed", retryable=True)
"""

from aiprod.common.v1 import render_pb2
from aiprod_kit.redaction import redact

_PREFIX = "FAILURE_REASON_"


class Reason:
    """The catalogue's values under short names: `Reason.RENDER_LOST == render_pb2.FAILURE_REASON_RENDER_LOST`."""

    UNSPECIFIED = render_pb2.FAILURE_REASON_UNSPECIFIED
    CANCELLED = render_pb2.FAILURE_REASON_CANCELLED
    INTERNAL = render_pb2.FAILURE_REASON_INTERNAL
    BUDGET_EXHAUSTED = render_pb2.FAILURE_REASON_BUDGET_EXHAUSTED
    NO_BACKEND = render_pb2.FAILURE_REASON_NO_BACKEND
    DEADLINE_PASSED = render_pb2.FAILURE_REASON_DEADLINE_PASSED
    DEADLINE_UNMEETABLE = render_pb2.FAILURE_REASON_DEADLINE_UNMEETABLE
    ROUTER_REFUSED = render_pb2.FAILURE_REASON_ROUTER_REFUSED
    UNKNOWN_BACKEND = render_pb2.FAILURE_REASON_UNKNOWN_BACKEND
    RENDER_REFUSED = render_pb2.FAILURE_REASON_RENDER_REFUSED
    RENDERER_UNAVAILABLE = render_pb2.FAILURE_REASON_RENDERER_UNAVAILABLE
    RENDERER_INTERNAL = render_pb2.FAILURE_REASON_RENDERER_INTERNAL
    RENDER_LOST = render_pb2.FAILURE_REASON_RENDER_LOST
    RENDER_UNCERTAIN = render_pb2.FAILURE_REASON_RENDER_UNCERTAIN
    PROVIDER_FAILED = render_pb2.FAILURE_REASON_PROVIDER_FAILED
    PROVIDER_REFUSED = render_pb2.FAILURE_REASON_PROVIDER_REFUSED
    PROVIDER_AUTH = render_pb2.FAILURE_REASON_PROVIDER_AUTH
    PROVIDER_RATE_LIMITED = render_pb2.FAILURE_REASON_PROVIDER_RATE_LIMITED
    PROVIDER_UNAVAILABLE = render_pb2.FAILURE_REASON_PROVIDER_UNAVAILABLE
    PROVIDER_UNCERTAIN = render_pb2.FAILURE_REASON_PROVIDER_UNCERTAIN
    PROVIDER_SAFETY_INPUT = render_pb2.FAILURE_REASON_PROVIDER_SAFETY_INPUT
    PROVIDER_SAFETY_OUTPUT = render_pb2.FAILURE_REASON_PROVIDER_SAFETY_OUTPUT
    PROVIDER_BAD_INPUT = render_pb2.FAILURE_REASON_PROVIDER_BAD_INPUT
    PROVIDER_NO_OUTPUT = render_pb2.FAILURE_REASON_PROVIDER_NO_OUTPUT
    OUTPUT_LOST = render_pb2.FAILURE_REASON_OUTPUT_LOST
    OUTPUT_UNDECODABLE = render_pb2.FAILURE_REASON_OUTPUT_UNDECODABLE
    OUTPUT_STORE_FAILED = render_pb2.FAILURE_REASON_OUTPUT_STORE_FAILED
    OUTPUT_CHECK_FAILED = render_pb2.FAILURE_REASON_OUTPUT_CHECK_FAILED
    QC_UNDER_FLOOR = render_pb2.FAILURE_REASON_QC_UNDER_FLOOR


# The provider's safety filters, on the input or on the output.
SAFETY_REASONS = frozenset({Reason.PROVIDER_SAFETY_INPUT, Reason.PROVIDER_SAFETY_OUTPUT})


def reason_name(code: int) -> str:
    """The short name for logs, metric labels and people: "PROVIDER_FAILED"; "UNSPECIFIED" for 0.

    A value this build does not know (a newer peer's) reads as its number, never an exception.
    """
    try:
        name = render_pb2.FailureReason.Name(code)
    except ValueError:
        return str(code)
    return name.removeprefix(_PREFIX)


def reason_value(name: str) -> int:
    """The code for a short ("PROVIDER_FAILED") or full ("FAILURE_REASON_PROVIDER_FAILED") name.

    Raises ValueError for a name not in the catalogue.
    """
    full = name if name.startswith(_PREFIX) else _PREFIX + name
    return render_pb2.FailureReason.Value(full)


def failure(reason: int, message: str, retryable: bool, provider_code: str = "") -> render_pb2.RenderFailure:
    """A `RenderFailure` with a reason from the catalogue. Its message is redacted (aiprod_kit.redaction):
    callers read it, and a provider's message may quote the credential it was sent."""
    return render_pb2.RenderFailure(
        reason=reason, message=redact(message), retryable=retryable, provider_code=provider_code
    )
