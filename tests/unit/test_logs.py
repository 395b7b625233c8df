"""Log lines name the trace they were written in, so that a line leads to its job's trace."""

import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider

from aiprod_kit.logs import configure_logging


@pytest.fixture(autouse=True)
def default_logging() -> Iterator[None]:
    """configure_logging is process-wide: later tests must not write to this test's captured stderr."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:], root.level = handlers, level


def test_a_line_written_inside_a_span_carries_its_trace_and_span_ids(capsys):
    log = configure_logging("test", "info", "json")
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        log.info("inside")
    log.info("outside")
    inside, outside = (json.loads(line) for line in capsys.readouterr().err.splitlines()[-2:])
    context = span.get_span_context()
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert "trace_id" not in outside


def test_a_line_never_carries_a_secret_nor_a_credential_shaped_value(capsys):
    from aiprod_kit.redaction import REDACTED, forget_secrets, register_secret

    register_secret("key_registered_0123456789")
    try:
        log = configure_logging("test", "info", "json")
        log.warning(
            "probe failed",
            error="auth (HTTP 401): invalid credentials: 'Bearer tok_unregistered_42'",
            detail={"echo": ["key_registered_0123456789"]},
        )
        try:
            raise RuntimeError("connect to postgresql://u:pg-pass-word@db/x with key_registered_0123456789")
        except RuntimeError:
            log.exception("failed")
    finally:
        forget_secrets()
    text = capsys.readouterr().err
    for secret in ("key_registered_0123456789", "tok_unregistered_42", "pg-pass-word"):
        assert secret not in text
    first, second = (json.loads(line) for line in text.splitlines()[-2:])
    assert first["error"] == f"auth (HTTP 401): invalid credentials: 'Bearer {REDACTED}'"
    assert first["detail"] == {"echo": [REDACTED]}
    assert "RuntimeError" in second["exception"] and REDACTED in second["exception"]


def test_a_librarys_own_warning_is_a_line_like_the_others_and_as_redacted(capsys):
    """psycopg's pool, gRPC or asyncio log through the standard library: their lines are JSON too, name
    their logger and service, and keep no secret."""
    log = configure_logging("test", "info", "json")
    library = logging.getLogger("psycopg.pool")
    library.info("connection given by %r", "pool")  # its bookkeeping: not logged
    try:
        raise ConnectionError("refused: postgresql://u:pg-pass-word@db/x")
    except ConnectionError:
        library.warning("rolling back returned connection: %s", "Bearer tok_unregistered_42", exc_info=True)
    log.info("ours")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["event"].split(":")[0] for line in lines] == ["rolling back returned connection", "ours"]
    theirs = lines[0]
    assert (theirs["level"], theirs["logger"], theirs["service"]) == ("warning", "psycopg.pool", "test")
    assert "ConnectionError" in theirs["exception"]
    text = json.dumps(theirs)
    assert "tok_unregistered_42" not in text and "pg-pass-word" not in text
