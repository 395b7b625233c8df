"""What the router has seen of each backend: latency, success, QC and cost, over recent renders."""

import statistics
from collections import deque
from dataclasses import dataclass

# Recent renders kept per backend; older ones no longer describe it.
WINDOW = 100
# Weight of the newest QC score in the moving average.
QC_SMOOTHING = 0.2


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
        self._percentiles: dict[int, float | None] = {}
        self._success_rate: tuple[float | None] | None = None

    def record(self, outcome: Outcome) -> None:
        self._outcomes.append(outcome)
        self._percentiles.clear()
        self._success_rate = None
        if outcome.qc_score is not None:
            if self.qc_average is None:
                self.qc_average = outcome.qc_score
            else:
                self.qc_average += QC_SMOOTHING * (outcome.qc_score - self.qc_average)

    @property
    def renders(self) -> int:
        return len(self._outcomes)

    def _durations(self) -> list[float]:
        return [outcome.seconds for outcome in self._outcomes if outcome.succeeded]

    def percentile_seconds(self, percent: int) -> float | None:
        if percent not in self._percentiles:
            durations = self._durations()
            if not durations:
                self._percentiles[percent] = None
            elif len(durations) == 1:
                self._percentiles[percent] = durations[0]
            else:
                self._percentiles[percent] = statistics.quantiles(durations, n=100, method="inclusive")[
                    percent - 1
                ]
        return self._percentiles[percent]

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
