"""ProviderLimits: requests to a provider beyond max_concurrent_requests wait their turn here, before their
timeout starts, so that none waits in the HTTP client's pool (where a cancelled wait can leak a
connection for good: encode/httpcore#1093) and none times out for having queued; and a request that
timed out while the renderer's own loop was stalled does not count against the provider."""

import asyncio
import time

import pytest

from aiprod_kit.breaker import BreakerState
from aiprod_kit.rendering.health import ProviderHealth
from aiprod_kit.rendering.limits import ProviderLimits
from aiprod_kit.rendering.provider import ErrorKind, ProviderError
from aiprod_kit.settings import RunwaySettings
from aiprod_renderers.runway.provider import RunwayProvider


async def test_requests_over_the_limit_wait_their_turn_and_their_timeout_starts_after_it():
    limits = ProviderLimits(
        requests_per_minute=100_000,
        max_concurrent_tasks=1,
        request_timeout_seconds=0.5,
        max_concurrent_requests=2,
    )
    running = most = 0
    release, two_running = asyncio.Event(), asyncio.Event()

    async def request() -> str:
        nonlocal running, most
        running += 1
        most = max(most, running)
        if running == 2:
            two_running.set()
        try:
            await release.wait()
            await asyncio.sleep(0.2)  # each answer takes a while: 5 in turn take longer than one timeout
            return "answered"
        finally:
            running -= 1

    calls = [asyncio.create_task(limits.call(request, idempotent=True, what="download")) for _ in range(5)]
    await two_running.wait()
    release.set()
    assert await asyncio.gather(*calls) == ["answered"] * 5
    assert most == 2


async def test_polls_leave_a_quarter_of_the_slots_and_a_create_waiting_past_its_deadline_was_not_sent():
    limits = ProviderLimits(
        requests_per_minute=100_000,
        max_concurrent_tasks=1,
        request_timeout_seconds=5,
        max_concurrent_requests=4,
    )
    polling, release = 0, asyncio.Event()
    three_polling = asyncio.Event()

    async def poll() -> str:
        nonlocal polling
        polling += 1
        if polling == 3:
            three_polling.set()
        await release.wait()
        return "polled"

    async def create() -> str:
        return "created"

    polls = [asyncio.create_task(limits.call(poll, idempotent=True, what="get")) for _ in range(10)]
    await three_polling.wait()
    # Ten polls waiting, three of four slots theirs: a create goes through at once.
    assert await limits.call(create, idempotent=False, what="create", within=1.0) == "created"
    assert polling == 3
    # Every slot held: a create still waiting at its deadline was never sent, and says so.
    hold, holding = asyncio.Event(), asyncio.Event()

    async def held() -> None:
        holding.set()
        await hold.wait()

    holder = asyncio.create_task(limits.call(held, idempotent=False, what="cancel"))
    await holding.wait()  # the fourth slot taken
    with pytest.raises(ProviderError) as waited:
        await limits.call(create, idempotent=False, what="create", within=0.2)
    assert waited.value.kind == ErrorKind.UNAVAILABLE and waited.value.overloaded
    assert "not sent" in waited.value.message
    release.set()
    hold.set()
    await asyncio.gather(*polls, holder)


async def test_a_request_timed_out_while_the_loop_was_stalled_is_not_the_providers_failure():
    limits = ProviderLimits(
        requests_per_minute=100_000, max_concurrent_tasks=1, request_timeout_seconds=0.3, attempts=1
    )
    monitor = asyncio.create_task(limits.lag.run())
    await asyncio.sleep(0)  # the monitor takes its first turn

    async def stalled() -> None:
        time.sleep(1.5)  # noqa: ASYNC251 - the whole process held up (a starved CPU) past the timeout
        await asyncio.sleep(10)

    async def slow() -> None:
        await asyncio.sleep(10)  # the provider does not answer

    try:
        with pytest.raises(ProviderError) as raised:
            await limits.call(stalled, idempotent=True, what="get")
        assert raised.value.overloaded and "overloaded" in raised.value.message
        # Once the loop keeps time again, a provider that does not answer is the provider's failure.
        with pytest.raises(ProviderError) as raised:
            await limits.call(slow, idempotent=True, what="get")
        assert raised.value.kind == ErrorKind.AMBIGUOUS and not raised.value.overloaded
    finally:
        monitor.cancel()


def test_the_breaker_counts_what_the_provider_did_not_what_an_overloaded_renderer_missed():
    provider = RunwayProvider(RunwaySettings(RUNWAYML_API_SECRET="key"))  # type: ignore[call-arg]
    health = ProviderHealth(provider, None, None, breaker_failures=1, breaker_cooldown_seconds=30)  # type: ignore[arg-type]
    health.record_outcome(ProviderError(ErrorKind.AMBIGUOUS, "get got no answer", overloaded=True))
    assert health.breaker.state == BreakerState.CLOSED
    health.record_outcome(ProviderError(ErrorKind.AMBIGUOUS, "get got no answer"))
    assert health.breaker.state == BreakerState.OPEN
