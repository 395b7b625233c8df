"""The router's metrics: what it sees of each backend, exported through OpenTelemetry.

Names follow the product's one scheme, `aiprod.<service>.<noun>`; labels are low-cardinality
(backend, outcome, reason), never a job id or a prompt.
"""

from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from aiprod_kit.breaker import BreakerState
from aiprod_kit.capabilities import backend_name
from aiprod_kit.failures import reason_name
from aiprod_router.backends import Renderer

_BREAKER_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class RouterMetrics:
    def __init__(
        self, backends: Callable[[], Iterable[Renderer]], meter: metrics.Meter | None = None
    ) -> None:
        """backends: the pool's renderers, read at each collection; meter: the process's by default."""
        meter = meter or metrics.get_meter("aiprod.router")
        self._backends = backends
        self._attempts = meter.create_counter(
            "aiprod.router.attempts",
            unit="{attempt}",
            description="Render attempts that ended, by backend and outcome",
        )
        self._errors = meter.create_counter(
            "aiprod.router.backend_errors",
            unit="{attempt}",
            description="Attempts that failed or delivered under the quality floor, by reason",
        )
        self._fallbacks = meter.create_counter(
            "aiprod.router.fallbacks",
            unit="{render}",
            description="Renders moved from one backend to another, by reason",
        )
        self._uncertain = meter.create_counter(
            "aiprod.router.uncertain_attempts",
            unit="{attempt}",
            description="Attempts that may have reached the provider without an end seen: held, never resent",
        )
        self._render_seconds = meter.create_histogram(
            "aiprod.router.render_duration", unit="s", description="From submission to a render's end"
        )
        self._qc = meter.create_histogram(
            "aiprod.router.qc_score", description="Technical QC score of outputs"
        )
        meter.create_observable_gauge(
            "aiprod.router.backend_health",
            callbacks=[self._health],
            description="1 while the renderer serves",
        )
        meter.create_observable_gauge(
            "aiprod.router.breaker_state",
            callbacks=[self._breaker],
            description="0 closed, 1 half-open, 2 open",
        )
        meter.create_observable_gauge(
            "aiprod.router.cost_per_second",
            unit="{USD}",
            callbacks=[self._cost],
            description="What a second of video has really cost, over recent renders",
        )

    def attempt_ended(
        self,
        backend: int,
        outcome: str,
        seconds: float | None,
        qc_score: float | None,
        failure_reason: int = 0,
    ) -> None:
        """outcome: succeeded, failed or qc_under_floor; the last two count as errors of the backend,
        labelled with the failure reason's short name (the outcome when there is none)."""
        labels = {"backend": backend_name(backend), "outcome": outcome}
        self._attempts.add(1, labels)
        if outcome != "succeeded":
            self._errors.add(
                1,
                {
                    "backend": backend_name(backend),
                    "reason": reason_name(failure_reason) if failure_reason else outcome,
                },
            )
        if seconds:
            self._render_seconds.record(seconds, labels)
        if qc_score is not None:
            self._qc.record(qc_score, {"backend": backend_name(backend)})

    def fell_back(self, from_backend: int, to_backend: int, reason: int) -> None:
        """reason: the cause's failure reason (labelled with its short name, "PROVIDER_UNAVAILABLE")."""
        self._fallbacks.add(
            1,
            {
                "from_backend": backend_name(from_backend),
                "to_backend": backend_name(to_backend),
                "reason": reason_name(reason),
            },
        )

    def uncertain(self, backend: int) -> None:
        self._uncertain.add(1, {"backend": backend_name(backend)})

    def _health(self, options: CallbackOptions) -> Iterable[Observation]:
        for renderer in self._backends():
            yield Observation(int(renderer.serving), {"backend": backend_name(renderer.backend)})

    def _breaker(self, options: CallbackOptions) -> Iterable[Observation]:
        for renderer in self._backends():
            yield Observation(
                _BREAKER_VALUES[renderer.breaker.state], {"backend": backend_name(renderer.backend)}
            )

    def _cost(self, options: CallbackOptions) -> Iterable[Observation]:
        for renderer in self._backends():
            cost = renderer.stats.cost_per_second_micros
            if cost is not None:
                yield Observation(cost / 1e6, {"backend": backend_name(renderer.backend)})
