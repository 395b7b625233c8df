"""A provider's limits, respected from this side: requests per minute, concurrent tasks, a pause on
429 for as long as Retry-After asks, and retries with backoff for what is safe to send again.

A request that timed out while this process's own event loop was stalled (a starved CPU, a blocking
call) says nothing of the provider: its error is marked `overloaded`, and the breaker does not count it
(`LoopLag`)."""

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from aiolimiter import AsyncLimiter
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
)

from aiprod_kit.rendering.provider import ErrorKind, ProviderError

T = TypeVar("T")
log = structlog.get_logger()

# Longest pause a Retry-After may impose before the call is given up to the caller.
_MAX_RETRY_AFTER_SECONDS = 120.0
_backoff = wait_exponential(multiplier=0.5, min=0.5, max=30)
# A loop late by this much while a request waited made its timeout ours, not the provider's.
OVERLOAD_LAG_SECONDS = 1.0


class LoopLag:
    """How late this process's event loop has been: a task that wakes every `interval` seconds records
    by how much each wake came late, for the last `keep` seconds."""

    def __init__(self, interval: float = 0.25, keep: float = 300.0) -> None:
        self._interval = interval
        self._samples: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=max(1, round(keep / interval))
        )
        self._due: float | None = None

    async def run(self) -> None:
        while True:
            self._due = time.monotonic() + self._interval
            await asyncio.sleep(self._interval)
            now = time.monotonic()
            self._samples.append((now, now - self._due))

    def worst_since(self, start: float) -> float:
        """The most the loop has been late since `start` (monotonic seconds), the wake overdue now
        included."""
        overdue = time.monotonic() - self._due if self._due is not None else 0.0
        recorded = (lag for at, lag in reversed(self._samples) if at >= start)
        return max(overdue, *recorded, 0.0)


class ProviderLimits:
    def __init__(
        self,
        requests_per_minute: int,
        max_concurrent_tasks: int,
        request_timeout_seconds: float,
        attempts: int = 4,
        max_concurrent_requests: int = 32,
        lag: LoopLag | None = None,
    ) -> None:
        self.lag = lag or LoopLag()
        self._requests = AsyncLimiter(requests_per_minute, 60)
        # Requests in flight: each waits here, not in the HTTP client's pool (see ProviderSettings).
        self._in_flight = asyncio.Semaphore(max_concurrent_requests)
        # Polls take at most three quarters of those: a create, a cancel or a copy always finds a slot
        # soon, however many tasks are being polled.
        self._polls = asyncio.Semaphore(max(1, max_concurrent_requests * 3 // 4))
        self.task_slots = asyncio.Semaphore(max_concurrent_tasks)
        self._timeout = request_timeout_seconds
        self._attempts = attempts
        # After a 429 every request waits until then, not just the one that was refused.
        self._paused_until = 0.0

    def _wait(self, retry_state: RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(error, ProviderError) and error.retry_after is not None:
            return min(error.retry_after, _MAX_RETRY_AFTER_SECONDS)
        return _backoff(retry_state)

    async def call(
        self,
        operation: Callable[[], Awaitable[T]],
        *,
        idempotent: bool,
        what: str,
        timeout: float | None = None,
        within: float | None = None,
    ) -> T:
        """Runs one provider request under the limits, retrying what may be sent again: refusals that
        the provider did not act on (429, 502-504, no connection) always; ambiguous failures (timeout,
        dropped connection) only for idempotent requests, never for a create.

        timeout: of each attempt (default: the request timeout). within: a deadline for every attempt
        together, instead of a count of attempts for what is idempotent (copying an output: as long as
        its URL lives), besides it for what is not (a create);
        each attempt then gets what is left of it, its wait for a request slot included: one still
        waiting at the deadline was never sent (UNAVAILABLE, `overloaded`)."""

        def retryable(error: BaseException) -> bool:
            if not isinstance(error, ProviderError):
                return False
            return error.safe_to_resend or (idempotent and error.kind == ErrorKind.AMBIGUOUS)

        deadline = None if within is None else time.monotonic() + within
        # Stop before a wait that would end past the deadline: it could only fail there. A request that
        # is not idempotent (a create) keeps its count of attempts within the deadline too.
        stop = stop_after_attempt(self._attempts)
        if within is not None:
            stop = stop_before_delay(within) if idempotent else stop | stop_before_delay(within)
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(retryable), wait=self._wait, stop=stop, reraise=True
        ):
            with attempt:
                limit = timeout or self._timeout
                if deadline is not None:
                    limit = min(limit, max(deadline - time.monotonic(), 0.001))
                return await self._once(operation, what, limit, deadline)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _once(
        self, operation: Callable[[], Awaitable[T]], what: str, timeout: float, deadline: float | None
    ) -> T:
        """One request: a turn under the rate limit and a request slot (by the deadline, when there is
        one: else however long it takes), then the request within timeout."""
        pause = self._paused_until - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        slots = [self._polls, self._in_flight] if what == "get" else [self._in_flight]
        try:
            async with asyncio.timeout(None if deadline is None else deadline - time.monotonic()):
                await self._requests.acquire()
                async with contextlib.AsyncExitStack() as taking:
                    for slot in slots:
                        await taking.enter_async_context(slot)
                    held = taking.pop_all()
        except TimeoutError as error:
            raise ProviderError(
                ErrorKind.UNAVAILABLE,
                f"{what} not sent: no request slot before its deadline (this renderer is overloaded)",
                overloaded=True,
            ) from error
        started = time.monotonic()
        try:
            async with held, asyncio.timeout(timeout):
                return await operation()
        except TimeoutError as error:
            lag = self.lag.worst_since(started)
            if lag >= OVERLOAD_LAG_SECONDS:
                raise ProviderError(
                    ErrorKind.AMBIGUOUS,
                    f"{what} got no answer in {timeout:g} s while this renderer was overloaded "
                    f"(its event loop {lag:.1f} s late)",
                    overloaded=True,
                ) from error
            raise ProviderError(ErrorKind.AMBIGUOUS, f"{what} got no answer in {timeout:g} s") from error
        except ProviderError as error:
            if error.kind == ErrorKind.RATE_LIMITED:
                pause_for = min(error.retry_after or 1.0, _MAX_RETRY_AFTER_SECONDS)
                self._paused_until = max(self._paused_until, time.monotonic() + pause_for)
                log.warning("provider rate limit", what=what, retry_after=error.retry_after)
            raise
        except Exception as error:
            # A client's surprise must not stall a poll or the health supervisor: treat it as a request
            # whose outcome is unknown (never resent if it was a create).
            log.exception("unexpected provider client error", what=what)
            raise ProviderError(
                ErrorKind.AMBIGUOUS, f"{what} failed unexpectedly: {type(error).__name__}"
            ) from error
