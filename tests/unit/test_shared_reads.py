"""SharedReads: callers waiting at once share one read; nothing is kept after it."""

import asyncio

import pytest

from aiprod_kit.sharing import SharedReads


class Ledger:
    """A read that answers when told to, counting the calls per key."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.answer = asyncio.Event()
        self.fail = False

    async def read(self, key: str) -> str:
        self.calls[key] = self.calls.get(key, 0) + 1
        await self.answer.wait()
        if self.fail:
            raise ConnectionError("ledger away")
        return f"{key}:{self.calls[key]}"


async def test_callers_waiting_at_once_share_one_read_per_key() -> None:
    ledger = Ledger()
    shared = SharedReads(ledger.read)
    waiting = [asyncio.create_task(shared(key)) for key in ("a", "a", "a", "b")]
    await asyncio.sleep(0)
    ledger.answer.set()
    assert await asyncio.gather(*waiting) == ["a:1", "a:1", "a:1", "b:1"]
    assert ledger.calls == {"a": 1, "b": 1}
    # The answer is not kept: a caller after it asks again.
    assert await shared("a") == "a:2"


async def test_a_caller_that_goes_away_leaves_the_read_to_the_others() -> None:
    ledger = Ledger()
    shared = SharedReads(ledger.read)
    leaving, staying = asyncio.create_task(shared("a")), asyncio.create_task(shared("a"))
    await asyncio.sleep(0)
    leaving.cancel()
    ledger.answer.set()
    assert await staying == "a:1"
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert ledger.calls == {"a": 1}


async def test_a_failed_read_fails_every_caller_waiting_and_the_next_one_asks_again() -> None:
    ledger = Ledger()
    ledger.fail = True
    shared = SharedReads(ledger.read)
    waiting = [asyncio.create_task(shared("a")) for _ in range(3)]
    await asyncio.sleep(0)
    ledger.answer.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(result, ConnectionError) for result in results)
    ledger.fail = False
    assert await shared("a") == "a:2"
