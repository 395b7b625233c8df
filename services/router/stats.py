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

    def record(self, outcome: Outcome) -> None:
        self._outcomes.append(outcome)
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
        durations = self._durations()
        if not durations:
            return None
        if len(durations) == 1:
            return durations[0]
        return statistics.quantiles(durations, n=100, method="inclusive")[percent - 1]

    @property
    def success_rate(self) -> float | None:
        if not self._outcomes:
            return None
        return sum(outcome.succeeded for outcome in self._outcomes) / len(self._outcomes)

    @property
    def cost_per_second_micros(self) -> float | None:
        paid = [o for o in self._outcomes if o.succeeded and o.video_seconds > 0]
        if not paid:
            return None
        return sum(o.cost_micros for o in paid) / sum(o.video_seconds for o in paid)
