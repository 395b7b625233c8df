"""Service level objectives over the last days of jobs kept by the event store.

- job_latency: the share of jobs that ended (with a duration) in under the latency bound.
- job_quality: the share of succeeded jobs that scored at least the quality minimum.

attainment = good / total (1.0 with no jobs); error_budget_remaining = 1 - (1 - attainment) / (1 - goal),
floored at 0.
"""

from dataclasses import dataclass
from datetime import timedelta

from aiprod.common.v1 import job_pb2
from aiprod.metrics.v1 import metrics_pb2
from aiprod_kit.settings import MetricsSettings
from aiprod_metrics.events import EventStore, Share
from aiprod_metrics.ledger import Clock, system_clock


@dataclass(frozen=True)
class SloPolicy:
    window_days: int
    latency_goal: float
    latency_max_seconds: float
    quality_goal: float
    quality_min: float

    @classmethod
    def from_settings(cls, settings: MetricsSettings) -> "SloPolicy":
        return cls(
            window_days=settings.metrics_slo_window_days,
            latency_goal=settings.metrics_slo_latency_goal,
            latency_max_seconds=settings.metrics_slo_latency_max_seconds,
            quality_goal=settings.metrics_slo_quality_goal,
            quality_min=settings.metrics_slo_quality_min,
        )

    @property
    def retention(self) -> timedelta:
        """How long events are kept: the window and a day, 8 days at least."""
        return timedelta(days=max(8, self.window_days + 1))


def slo_status(name: str, goal: float, share: Share, window_days: int) -> metrics_pb2.SloStatus:
    attainment = share.good / share.total if share.total else 1.0
    return metrics_pb2.SloStatus(
        name=name,
        goal=goal,
        attainment=attainment,
        error_budget_remaining=max(0.0, 1 - (1 - attainment) / (1 - goal)),
        window_days=window_days,
    )


async def slo_report(
    events: EventStore, policy: SloPolicy, clock: Clock = system_clock
) -> list[metrics_pb2.SloStatus]:
    since = clock() - timedelta(days=policy.window_days)
    latency = await events.latency_share(since, policy.latency_max_seconds)
    quality = await events.quality_share(since, job_pb2.JOB_STATE_SUCCEEDED, policy.quality_min)
    return [
        slo_status("job_latency", policy.latency_goal, latency, policy.window_days),
        slo_status("job_quality", policy.quality_goal, quality, policy.window_days),
    ]
