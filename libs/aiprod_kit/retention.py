"""Retention: what a store keeps past its retention, deleted a batch at a time in the background.

Each store that grows with the jobs a deployment runs (the gateway's jobs, the renderers' keys, the
ledger's reservations) offers a purge of one batch, `purge(before, limit) -> deleted`, one short
transaction; `Retention` calls it in the service's process every interval until a batch comes back
short, so that no purge holds a long write lock, and a store is never left to grow for years.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger()

# Deletes at most `limit` of what was kept for good reasons until `before` (Unix seconds): how many.
Purge = Callable[[float, int], Awaitable[int]]

PURGE_INTERVAL_SECONDS = 600.0
PURGE_BATCH = 500
# A round stops after this many batches (a store many years old meets its retention over a few rounds,
# not in one that holds the process's database connection for minutes).
_BATCHES_A_ROUND = 100


def duration(seconds: float) -> str:
    """A retention as a person says it, for the errors that answer for what was deleted: whole days when
    it is some, else seconds."""
    days = seconds / 86_400
    if days >= 1 and days.is_integer():
        return f"{int(days)} day{'s' if days > 1 else ''}"
    return f"{seconds:g} s"


class Retention:
    """Purges `what` older than retention_seconds every interval_seconds (the first round soon after
    start); retention 0 keeps everything. Replicas sharing a store may purge at once: a purge deletes
    only what is past its retention, so the second finds less to delete, never an error."""

    def __init__(
        self,
        what: str,
        purge: Purge,
        retention_seconds: float,
        interval_seconds: float = PURGE_INTERVAL_SECONDS,
        batch: int = PURGE_BATCH,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._what = what
        self._purge = purge
        self._retention = retention_seconds
        self._interval = interval_seconds
        self._batch = batch
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def purge_once(self) -> int:
        """One round: batches until one comes back short (or the round's cap); how many were deleted."""
        if self._retention <= 0:
            return 0
        before = self._clock() - self._retention
        deleted = 0
        for _ in range(_BATCHES_A_ROUND):
            purged = await self._purge(before, self._batch)
            deleted += purged
            if purged < self._batch:
                break
        if deleted:
            log.info(
                "purged past retention", what=self._what, deleted=deleted, retention_seconds=self._retention
            )
        return deleted

    async def start(self) -> None:
        if self._retention > 0:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        # The first round after a short pause: a service starting serves before it tidies.
        await asyncio.sleep(min(self._interval, 10.0))
        while True:
            try:
                await self.purge_once()
            except Exception as error:
                # The database away: what is kept stays kept until the next round.
                log.warning("purge past retention failed; trying again", what=self._what, error=str(error))
            await asyncio.sleep(self._interval)
