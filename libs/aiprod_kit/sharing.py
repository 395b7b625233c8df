"""Reads that callers waiting at once share: one call under way per key, its answer for every caller
that asked while it was under way (under load, thousands of renders routed at once would each ask the
ledger the same question). A caller arriving after the answer came asks again: nothing is kept, so an
answer is never older than the caller's own question would have been by the time it was answered."""

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SharedReads(Generic[K, V]):
    def __init__(self, read: Callable[[K], Awaitable[V]]) -> None:
        self._read = read
        self._under_way: dict[K, asyncio.Future[V]] = {}

    async def __call__(self, key: K) -> V:
        reading = self._under_way.get(key)
        if reading is None:
            reading = asyncio.ensure_future(self._read(key))
            self._under_way[key] = reading
            reading.add_done_callback(lambda _: self._under_way.pop(key, None))
        # Shielded: a caller that goes away leaves the read to the others.
        return await asyncio.shield(reading)
