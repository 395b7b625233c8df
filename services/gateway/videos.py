"""Local videos deleted with the last kept job that names them (in Google Cloud Storage a bucket's
lifecycle rule deletes videos).

Videos are stored content-addressed: one file may serve several jobs. A job's purge notes the local
videos it named (the job store's `unnamed_videos`); each is deleted here unless a kept job names it
(then forgotten: its own purge notes it again), or it was stored again since the purge's cutoff, for a
render whose job has not named it yet (the same bytes stored again make a new file). What a crash
left of a store or a deletion goes too, once as old.
"""

import asyncio

from aiprod_gateway.store import JobStore
from aiprod_kit.rendering.storage import LocalVideoStore


class VideoRetention:
    def __init__(self, videos: LocalVideoStore, jobs: JobStore) -> None:
        self._videos = videos
        self._jobs = jobs

    async def purge(self, before: float, limit: int) -> int:
        """Deletes up to limit videos that purged jobs named and no kept job names, unless stored again
        at or after `before`, and the leftovers of crashes older than that; how many it looked at."""
        uris = await self._jobs.unnamed_videos(limit)
        leftovers = await asyncio.to_thread(self._delete, uris, before)
        await self._jobs.forget_videos(uris)
        return leftovers + len(uris)

    def _delete(self, uris: list[str], before: float) -> int:
        """The file work of a batch, blocking: the crashes' leftovers (how many), then the videos."""
        leftovers = self._videos.delete_leftovers(before)
        for uri in uris:
            try:
                path = self._videos.path_of(uri)
            except ValueError:
                continue  # not in this store (another machine's, or moved): nothing here to delete
            self._videos.delete_if_stored_before(path, before)
        return leftovers
