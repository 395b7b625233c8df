"""What the router has seen of each backend: latency, success, QC and cost, over recent renders."""

import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

# Recent renders kept per backend; older ones no longer describe it.
WINDOW = 100
# Weight of the newest QC score in the moving average.
QC_SMOOTHING = 0.2
# A clip's latency is judged from renders of its own length once there are this many in the window
# (a 10 s clip takes longer than a 4 s one), else from all of them.
SAME_LENGTH_RENDERS = 5
# Figures kept by clip length between two outcomes, for at most this many lengths: requests of ever
# new durations (any float in a backend's range) do not grow them while a backend has no outcome.
LENGTHS_KEPT = 64


@dataclass(frozen=True)
class Outcome:
    """One finished attempt at a backend."""

    succeeded: bool
    # From submission to the final event.
    seconds: float
    qc_score: float | None = None
    cost_micros: int = 0
    video_seconds: float = 0.0


class BackendStats:
    def __init__(self) -> None:
        self._outcomes: deque[Outcome] = deque(maxlen=WINDOW)
        self.qc_average: float | None = None
        # Figures read at every routing decision, computed once per outcome recorded rather than per
        # decision (a percentile over the window dominated the policy's time).
        self._percentiles: dict[tuple[int, float | None], float | None] = {}
        self._success_rate: tuple[float | None] | None = None
        self._latency: dict[float | None, tuple[float | None, float | None]] = {}
        # The routing policy's view of the backend by clip length (aiprod_router.policy.views_of), kept
        # until the next outcome, for the lengths whose latency is kept: its other sources (health,
        # capabilities, breaker) it checks itself.
        self.views: dict[float | None, Any] = {}

    def record(self, outcome: Outcome) -> None:
        self._outcomes.append(outcome)
        self._percentiles.clear()
        self._latency.clear()
        self.views.clear()
        self._success_rate = None
        if outcome.qc_score is not None:
            if self.qc_average is None:
                self.qc_average = outcome.qc_score
            else:
                self.qc_average += QC_SMOOTHING * (outcome.qc_score - self.qc_average)

    @property
    def renders(self) -> int:
        return len(self._outcomes)

    def _durations(self, video_seconds: float | None) -> list[float]:
        succeeded = [outcome for outcome in self._outcomes if outcome.succeeded]
        if video_seconds is not None:
            same = [o.seconds for o in succeeded if abs(o.video_seconds - video_seconds) < 0.5]
            if len(same) >= SAME_LENGTH_RENDERS:
                return same
        return [outcome.seconds for outcome in succeeded]

    def percentile_seconds(self, percent: int, video_seconds: float | None = None) -> float | None:
        """The percentile of recent successful renders' latency: of clips of video_seconds when enough
        of them were rendered lately, else of all."""
        key = (percent, video_seconds)
        if key not in self._percentiles:
            durations = self._durations(video_seconds)
            if not durations:
                self._percentiles[key] = None
            elif len(durations) == 1:
                self._percentiles[key] = durations[0]
            else:
                self._percentiles[key] = statistics.quantiles(durations, n=100, method="inclusive")[
                    percent - 1
                ]
        return self._percentiles[key]

    def p95_p50_seconds(self, video_seconds: float | None = None) -> tuple[float | None, float | None]:
        """The two percentiles routing reads, for clips of video_seconds, in one look-up."""
        latency = self._latency.get(video_seconds)
        if latency is None:
            if len(self._latency) >= LENGTHS_KEPT:
                # The views too: each is built with its length's latency, so they stay within the bound.
                self._latency.clear()
                self._percentiles.clear()
                self.views.clear()
            latency = self._latency[video_seconds] = (
                self.percentile_seconds(95, video_seconds),
                self.percentile_seconds(50, video_seconds),
            )
        return latency

    @property
    def success_rate(self) -> float | None:
        if self._success_rate is None:
            rate = sum(o.succeeded for o in self._outcomes) / len(self._outcomes) if self._outcomes else None
            self._success_rate = (rate,)
        return self._success_rate[0]

    @property
    def cost_per_second_micros(self) -> float | None:
        paid = [o for o in self._outcomes if o.succeeded and o.video_seconds > 0]
        if not paid:
            return None
        return sum(o.cost_micros for o in paid) / sum(o.video_seconds for o in paid)
