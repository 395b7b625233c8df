"""A circuit breaker per provider: repeated failures open it (the renderer turns NOT_SERVING); after
a cooldown one probe decides whether it closes again (half-open)."""

import enum
import time
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
        on_change: Callable[[BreakerState], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_seconds = cooldown_seconds
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._on_change = on_change
        self._clock = clock

    def _move(self, state: BreakerState) -> None:
        if state != self.state:
            self.state = state
            self._on_change(state)

    def record_success(self) -> None:
        self._failures = 0
        self._move(BreakerState.CLOSED)

    def record_failure(self) -> None:
        self._failures += 1
        if self.state == BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
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

    def seconds_until_probe(self) -> float:
        return max(0.0, self._opened_at + self.cooldown_seconds - self._clock())

    @property
    def allows_requests(self) -> bool:
        return self.state == BreakerState.CLOSED
