"""The circuit breaker's half-open state lets one trial through at a time, with an injected clock."""

from aiprod_kit.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def opened(clock: Clock) -> CircuitBreaker:
    breaker = CircuitBreaker(2, 10.0, lambda state: None, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == BreakerState.OPEN
    return breaker


def test_while_open_nothing_goes_and_after_the_cooldown_one_trial_does():
    clock = Clock()
    breaker = opened(clock)
    assert not breaker.trial_available() and not breaker.allow_request()
    clock.now = 10.0
    assert breaker.trial_available()
    assert breaker.allow_request()
    # The trial is out: every other caller waits for its outcome.
    assert not breaker.trial_available() and not breaker.allow_request()
    breaker.record_success()
    assert breaker.state == BreakerState.CLOSED
    assert breaker.allow_request() and breaker.allow_request()


def test_a_failed_trial_opens_the_breaker_again():
    clock = Clock()
    breaker = opened(clock)
    clock.now = 10.0
    assert breaker.allow_request()
    breaker.record_failure()
    assert breaker.state == BreakerState.OPEN
    assert not breaker.allow_request()


def test_a_trial_whose_outcome_never_comes_gives_way_after_a_cooldown():
    clock = Clock()
    breaker = opened(clock)
    clock.now = 10.0
    assert breaker.allow_request()
    clock.now = 15.0
    assert not breaker.allow_request()
    clock.now = 20.0
    assert breaker.allow_request()
