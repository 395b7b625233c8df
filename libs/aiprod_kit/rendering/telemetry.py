"""A provider renderer's calls to its provider, measured and traced (docs/TELEMETRY.md).

Each call (create, get, cancel, download) is a span in the trace of the render it serves: the poll
loop is shared by every render, so a poll joins its render's trace through the context the render kept
from its StartRender. The provider client's HTTP requests (retries included) are children of it.
"""

import contextlib
import time
from collections.abc import Iterator

from opentelemetry import context, metrics, trace

from aiprod_kit.rendering.provider import ProviderError

_tracer = trace.get_tracer("aiprod.renderer")


class ProviderCallMetrics:
    def __init__(self, backend: str, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter("aiprod.renderer")
        self._backend = backend
        self._requests = meter.create_counter(
            "aiprod.renderer.provider_requests",
            unit="{request}",
            description="Calls to the provider's API, by operation and outcome",
        )
        self._duration = meter.create_histogram(
            "aiprod.renderer.provider_request_duration",
            unit="s",
            description="Latency of calls to the provider's API, retries included",
        )

    @contextlib.contextmanager
    def call(self, operation: str, parent: context.Context | None) -> Iterator[None]:
        """Measures one call; outcome is "ok" or the ProviderError's kind."""
        started = time.perf_counter()
        outcome = "ok"
        with _tracer.start_as_current_span(
            f"{self._backend} {operation}",
            context=parent,
            attributes={"aiprod.backend": self._backend, "aiprod.operation": operation},
        ) as span:
            try:
                yield
            except ProviderError as error:
                outcome = error.kind.value
                span.set_attribute("aiprod.provider_error", outcome)
                raise
            except Exception:
                outcome = "error"
                raise
            finally:
                labels = {"backend": self._backend, "operation": operation}
                self._requests.add(1, {**labels, "outcome": outcome})
                self._duration.record(time.perf_counter() - started, labels)
