"""A circuit breaker: repeated failures, or too many failures among recent outcomes, open it; after
a cooldown one trial decides whether it closes again (half-open). Renderers put one in front of their
provider (open: NOT_SERVING); the router keeps one per backend from its own results (outlier
detection)."""

import enum
import time
from collections import deque
from collections.abc import Callable


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int,
        cooldown_seconds: float,
        on_change: Callable[[BreakerState], None] = lambda state: None,
        clock: Callable[[], float] = time.monotonic,
        failure_ratio: float = 1.0,
        window: int = 0,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_seconds = cooldown_seconds
        self.state = BreakerState.CLOSED
        self._failures = 0
        # With a window, the breaker also opens when failure_ratio of the last `window` outcomes failed.
        self._failure_ratio = failure_ratio
        self._recent: deque[bool] = deque(maxlen=max(window, 1))
        self._window = window
        self._opened_at = 0.0
        # Half-open: whether the one trial is out (its outcome not recorded yet), and since when: a trial
        # whose outcome never comes (its caller went away) gives way to another after a cooldown.
        self._trial_out = False
        self._trial_at = 0.0
        self._on_change = on_change
        self._clock = clock

    def _move(self, state: BreakerState) -> None:
        if state != BreakerState.HALF_OPEN:
            self._trial_out = False
        if state != self.state:
            self.state = state
            self._on_change(state)

    def record_success(self) -> None:
        self._failures = 0
        self._recent.append(True)
        if self.state == BreakerState.HALF_OPEN:
            self._recent.clear()  # a fresh start: the failures that opened it are history
        self._move(BreakerState.CLOSED)

    def _ratio_exceeded(self) -> bool:
        if not self._window or len(self._recent) < self._window:
            return False
        return self._recent.count(False) / len(self._recent) >= self._failure_ratio

    def record_failure(self) -> None:
        self._failures += 1
        self._recent.append(False)
        if (
            self.state == BreakerState.HALF_OPEN
            or self._failures >= self.failure_threshold
            or self._ratio_exceeded()
        ):
            self._opened_at = self._clock()
            self._move(BreakerState.OPEN)

    def trip(self) -> None:
        """Opens at once (rejected credentials): no point in trying until a probe succeeds."""
        self._failures = self.failure_threshold
        self._opened_at = self._clock()
        self._move(BreakerState.OPEN)

    def probe_due(self) -> bool:
        """True once the cooldown has passed: the breaker is half-open and one probe may go."""
        if self.state == BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown_seconds:
            self._move(BreakerState.HALF_OPEN)
        return self.state == BreakerState.HALF_OPEN

    def trial_available(self) -> bool:
        """Whether a request could go now (closed, or half-open with no trial out), without taking it."""
        if self.state == BreakerState.CLOSED:
            return True
        trial_pending = self._trial_out and self._clock() - self._trial_at < self.cooldown_seconds
        return self.probe_due() and not trial_pending

    def allow_request(self) -> bool:
        """Whether a request may go now: always while closed; while half-open, to one caller only (the
        trial), until its outcome is recorded; never while open."""
        if self.state == BreakerState.CLOSED:
            return True
        if not self.trial_available():
            return False
        self._trial_out = True
        self._trial_at = self._clock()
        return True

    def seconds_until_probe(self) -> float:
        return max(0.0, self._opened_at + self.cooldown_seconds - self._clock())

    @property
    def allows_requests(self) -> bool:
        return self.state == BreakerState.CLOSED
