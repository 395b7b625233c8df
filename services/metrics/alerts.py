"""Alert policies, evaluated every few seconds and on demand; each keeps its condition and since when.

- daily_spend_warning / daily_spend_critical: today's committed spend of every tenant together, USD,
  over the warning / critical threshold.
- mean_quality_low: the mean QC score of the jobs that succeeded in the quality window under the
  minimum (no jobs: not firing, value 0).
- job_latency_p95_high: the p95 duration (nearest rank) of the jobs that ended in the latency window
  over the maximum, seconds.
- backend_errors_high: per backend, its errors (failed jobs, attempts given up) in the errors window
  over the maximum; one alert per backend with an error kept, or one for no backend in particular
  (value 0) while none has, so that every policy is listed.

A policy that starts firing logs "alert firing"; one that stops, "alert resolved". Each condition and
since when it holds is kept in the event store: a restarted service (or another replica) reports the
same since-time, and logs a change once.
"""

import asyncio
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from google.protobuf import timestamp_pb2

from aiprod.common.v1 import backend_pb2, job_pb2
from aiprod.metrics.v1 import metrics_pb2
from aiprod_kit.settings import MetricsSettings
from aiprod_metrics.events import EventStore
from aiprod_metrics.ledger import Clock, LedgerStore, system_clock

log = structlog.get_logger()
WARNING, CRITICAL = "warning", "critical"


@dataclass(frozen=True)
class AlertThresholds:
    interval_seconds: float
    spend_warning_usd: float
    spend_critical_usd: float
    quality_min: float
    quality_window: timedelta
    latency_p95_max_seconds: float
    latency_window: timedelta
    backend_errors_max: int
    backend_errors_window: timedelta

    @classmethod
    def from_settings(cls, settings: MetricsSettings) -> "AlertThresholds":
        return cls(
            interval_seconds=settings.metrics_alert_interval_seconds,
            spend_warning_usd=settings.metrics_alert_spend_warning_usd,
            spend_critical_usd=settings.metrics_alert_spend_critical_usd,
            quality_min=settings.metrics_alert_quality_min,
            quality_window=timedelta(seconds=settings.metrics_alert_quality_window_seconds),
            latency_p95_max_seconds=settings.metrics_alert_latency_p95_max_seconds,
            latency_window=timedelta(seconds=settings.metrics_alert_latency_window_seconds),
            backend_errors_max=settings.metrics_alert_backend_errors_max,
            backend_errors_window=timedelta(seconds=settings.metrics_alert_backend_errors_window_seconds),
        )


@dataclass(frozen=True)
class _Measure:
    policy: str
    severity: str
    value: float
    threshold: float
    firing: bool
    backend: int = 0


def p95(ascending: list[float]) -> float:
    """The nearest-rank 95th percentile; 0 with no values."""
    return ascending[math.ceil(0.95 * len(ascending)) - 1] if ascending else 0.0


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


class AlertEvaluator:
    def __init__(
        self,
        events: EventStore,
        ledger: LedgerStore,
        tenant: str,
        thresholds: AlertThresholds,
        clock: Clock = system_clock,
    ) -> None:
        self._events = events
        self._ledger = ledger
        self._tenant = tenant
        self._thresholds = thresholds
        self._clock = clock
        self._lock = asyncio.Lock()

    async def _measure(self, now: datetime) -> list[_Measure]:
        limits = self._thresholds
        spent = (await self._ledger.day_totals(self._tenant)).everyone.spent / 1e6
        jobs, quality = await self._events.quality(now - limits.quality_window, job_pb2.JOB_STATE_SUCCEEDED)
        latency = p95(await self._events.durations(now - limits.latency_window))
        errors = await self._events.error_counts(now - limits.backend_errors_window)
        # No backend has an error kept: the policy is still listed, about none of them.
        errors = errors or {backend_pb2.BACKEND_UNSPECIFIED: 0}
        return [
            _Measure(
                "daily_spend_warning",
                WARNING,
                spent,
                limits.spend_warning_usd,
                spent > limits.spend_warning_usd,
            ),
            _Measure(
                "daily_spend_critical",
                CRITICAL,
                spent,
                limits.spend_critical_usd,
                spent > limits.spend_critical_usd,
            ),
            _Measure(
                "mean_quality_low",
                CRITICAL,
                quality,
                limits.quality_min,
                jobs > 0 and quality < limits.quality_min,
            ),
            _Measure(
                "job_latency_p95_high",
                CRITICAL,
                latency,
                limits.latency_p95_max_seconds,
                latency > limits.latency_p95_max_seconds,
            ),
            *(
                _Measure(
                    "backend_errors_high",
                    WARNING,
                    count,
                    limits.backend_errors_max,
                    count > limits.backend_errors_max,
                    backend,
                )
                for backend, count in sorted(errors.items())
            ),
        ]

    async def evaluate(self) -> list[metrics_pb2.Alert]:
        """Measures every policy now, logs the ones whose condition changed, and returns them all."""
        async with self._lock:
            now = self._clock()
            measures = await self._measure(now)
            conditions = await self._events.track_conditions(
                {(measure.policy, measure.backend): measure.firing for measure in measures}, now
            )
            alerts = []
            for measure in measures:
                condition = conditions[measure.policy, measure.backend]
                # A first evaluation that finds nothing wrong is no news.
                if condition.changed and (condition.previous is not None or measure.firing):
                    (log.warning if measure.firing else log.info)(
                        "alert firing" if measure.firing else "alert resolved",
                        policy=measure.policy,
                        severity=measure.severity,
                        value=measure.value,
                        threshold=measure.threshold,
                        backend=backend_pb2.Backend.Name(measure.backend),
                    )
                alerts.append(
                    metrics_pb2.Alert(
                        policy=measure.policy,
                        firing=measure.firing,
                        since_time=_timestamp(condition.since),
                        value=measure.value,
                        threshold=measure.threshold,
                        severity=measure.severity,
                        backend=measure.backend,
                    )
                )
            return alerts


async def evaluate_alerts(
    evaluator: AlertEvaluator, events: EventStore, interval: float, retention: timedelta
) -> None:
    """Forever: evaluates the alert policies, and forgets events older than the retention."""
    while True:
        try:
            await events.prune(system_clock() - retention)
            await evaluator.evaluate()
        except Exception:
            log.exception("evaluating alerts failed; trying again")
        await asyncio.sleep(interval)
