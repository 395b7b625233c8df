"""Structured logs: one JSON object per line on stderr (or readable lines for a terminal)."""

import logging
import sys

import structlog
from opentelemetry import trace
from structlog.typing import EventDict, WrappedLogger

from aiprod_kit.redaction import redact_fields


def _add_trace(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """The current span's trace and span ids on each line: a log line leads to its job's trace."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event["trace_id"] = format(context.trace_id, "032x")
        event["span_id"] = format(context.span_id, "016x")
    return event


def _redact(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Every value of the line, its formatted exception included, without secrets: a provider error
    quoting the token it was sent, a URL with its signature (aiprod_kit.redaction)."""
    return redact_fields(event)


def configure_logging(service: str, level: str, fmt: str) -> structlog.stdlib.BoundLogger:
    renderer = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    numeric_level = logging.getLevelName(level.upper())
    stamped = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_trace,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*stamped, structlog.processors.format_exc_info, _redact, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    # The libraries' own records (psycopg's, gRPC's, asyncio's "Task exception was never retrieved"):
    # the same lines, redacted the same way, rather than the standard library's bare text on stderr;
    # their warnings and worse only (their info lines are their own bookkeeping).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*stamped, structlog.stdlib.add_logger_name, _serving(service)],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _redact,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.WARNING, numeric_level))
    return structlog.get_logger()


def _serving(service: str) -> structlog.typing.Processor:
    """The service's name on a library's line logged outside its context (a thread of the library's)."""

    def add(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        event.setdefault("service", service)
        return event

    return add
