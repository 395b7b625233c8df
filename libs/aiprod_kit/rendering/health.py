"""A provider renderer's health: its credentials and its circuit breaker, published as gRPC health.

Invariants: without credentials the renderer never serves. It serves while the breaker lets requests
through; rejected credentials open the breaker at once, rate limits, unavailability and ambiguous
answers count towards opening it. While open, the supervisor waits out the cooldown, then sends the
one half-open probe whose answer closes or reopens it. Health is NOT_SERVING until the first probe
has passed.
"""

import asyncio
import contextlib

import structlog

from aiprod_kit.breaker import BreakerState, CircuitBreaker
from aiprod_kit.rendering.calls import ProviderCalls
from aiprod_kit.rendering.provider import ErrorKind, Provider, ProviderError
from aiprod_kit.server import HealthSignal

log = structlog.get_logger()


class ProviderHealth:
    def __init__(
        self,
        provider: Provider,
        calls: ProviderCalls,
        signal: HealthSignal,
        breaker_failures: int,
        breaker_cooldown_seconds: float,
    ) -> None:
        self._provider = provider
        self._calls = calls
        self._signal = signal
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown_seconds, self._breaker_changed)
        self._missing = provider.missing_configuration()
        self._wake = asyncio.Event()
        self._log = log.bind(backend=provider.name)

    @property
    def serving(self) -> bool:
        return not self._missing and self.breaker.allows_requests

    def not_serving_reason(self) -> str:
        if self._missing:
            return f"the {self._provider.name} renderer has no credentials: set {', '.join(self._missing)}"
        return (
            f"the {self._provider.name} renderer is not serving: "
            f"its circuit breaker is {self.breaker.state.value}"
        )

    def record_outcome(self, error: ProviderError | None) -> None:
        """What a provider request's answer says of the provider, for the breaker (nothing, for a request
        this process was too overloaded to hear out)."""
        if error is not None and error.overloaded:
            return
        if error is None:
            self.breaker.record_success()
        elif error.kind == ErrorKind.AUTH:
            self.breaker.trip()
        elif error.kind in (ErrorKind.RATE_LIMITED, ErrorKind.UNAVAILABLE, ErrorKind.AMBIGUOUS):
            self.breaker.record_failure()

    async def publish(self) -> None:
        if self._signal.serving != self.serving:
            self._log.info(
                "health", serving=self.serving, missing=self._missing, breaker=self.breaker.state.value
            )
            await self._signal.set(self.serving)

    def _breaker_changed(self, state: BreakerState) -> None:
        self._log.warning("circuit breaker", state=state.value)
        self._wake.set()

    async def run(self) -> None:
        """Keeps health in step with credentials and the breaker; probes when the breaker is due."""
        if self._missing:
            self._log.error("credentials missing: not serving", missing=self._missing)
            await self.publish()
            return
        await self._probe()
        while True:
            await self.publish()
            self._wake.clear()
            if self.breaker.state == BreakerState.CLOSED:
                await self._wake.wait()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(self.breaker.seconds_until_probe(), 0.05)):
                    await self._wake.wait()
            # Half-open: the probe is the one trial request.
            if self.breaker.allow_request():
                await self._probe()

    async def _probe(self) -> None:
        try:
            await self._calls.call(None, self._provider.probe, idempotent=True, what="probe")
        except ProviderError as error:
            self._log.warning("probe failed", error=str(error))
            if error.overloaded and self.breaker.state == BreakerState.CLOSED:
                return  # this process was too busy to hear the answer: it says nothing of the provider
            if error.kind == ErrorKind.AUTH:
                self.breaker.trip()
            else:
                self.breaker.record_failure()
            return
        self.breaker.record_success()
