"""ProviderLimits: requests to a provider beyond max_concurrent_requests wait their turn here, before their
timeout starts, so that none waits in the HTTP client's pool (where a cancelled wait can leak a
connection for good: encode/httpcore#1093) and none times out for having queued."""

import asyncio

from aiprod_kit.rendering.limits import ProviderLimits


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

    calls = [asyncio.create_task(limits.call(request, idempotent=True, what="get")) for _ in range(5)]
    await two_running.wait()
    release.set()
    assert await asyncio.gather(*calls) == ["answered"] * 5
    assert most == 2
