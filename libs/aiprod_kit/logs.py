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
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _add_trace,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    return structlog.get_logger()
