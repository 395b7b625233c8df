"""Each distinct sandbox video encoded once: tasks asking for the same video (prompt, seed, length and
size) share one encode, and later ones are served from the cache.

Encoding takes the CPU a benchmark should spend on the mesh; the video itself is the same whoever asks
(the synthetic renderer is deterministic). Each task still gets a file of its own (a hard link to the
cached one), so deleting a task's files or revoking its URLs never touches another task's.
"""

import asyncio
import hashlib
import os
import secrets
import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

# Distinct videos kept; the least recently used one leaves the cache first (tasks keep their links).
DEFAULT_ENTRIES = 256


class VideoCache:
    def __init__(self, directory: Path, concurrency: int, entries: int = DEFAULT_ENTRIES) -> None:
        self._directory = directory
        self._entries = entries
        # Encodes are CPU-bound: more at once than cores only slows every one of them down.
        self._encoders = asyncio.Semaphore(concurrency)
        self._done: OrderedDict[str, Path] = OrderedDict()
        self._encoding: dict[str, asyncio.Future[Path]] = {}
        self.encodes = 0
        self.hits = 0

    @staticmethod
    def key(prompt: str, seed: int, duration_seconds: float, width: int, height: int) -> str:
        identity = repr((prompt, seed, float(duration_seconds), width, height)).encode()
        return hashlib.sha256(identity).hexdigest()[:32]

    async def place(self, key: str, path: Path, encode: Callable[[Path], None]) -> None:
        """Puts the video `key` at path, encoding it (encode(path) in a thread) only if no task has.

        A task cancelled while the video is encoded for it leaves the encode running for the others
        (and the cache)."""
        cached = await asyncio.shield(self._cached(key, encode))
        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(_link, cached, path)

    async def _cached(self, key: str, encode: Callable[[Path], None]) -> Path:
        if (found := self._done.get(key)) is not None and found.exists():
            self._done.move_to_end(key)
            self.hits += 1
            return found
        if (pending := self._encoding.get(key)) is not None:
            self.hits += 1
            # Shielded: a waiter cancelled (a stopping sandbox) must not cancel the encode's future.
            return await asyncio.shield(pending)
        future: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
        self._encoding[key] = future
        try:
            target = self._directory / f"{key}.mp4"
            # A name of this encode's own: one a reset forgot may still be writing in its thread when a
            # task after the reset encodes the same video, and the two must not write one file.
            partial = self._directory / f"{key}.{secrets.token_hex(4)}.partial.mp4"
            self._directory.mkdir(parents=True, exist_ok=True)
            async with self._encoders:
                await asyncio.to_thread(encode, partial)
            partial.replace(target)
            self.encodes += 1
            if self._encoding.get(key) is future:  # not cleared meanwhile
                self._done[key] = target
            while len(self._done) > self._entries:
                _, evicted = self._done.popitem(last=False)
                evicted.unlink(missing_ok=True)
            future.set_result(target)
            return target
        except BaseException as error:
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: a failure with nobody else waiting is not logged as lost
            raise
        finally:
            if self._encoding.get(key) is future:
                del self._encoding[key]

    def clear(self) -> None:
        """Forgets every video (their files go with the directory), and the encodes under way: they end
        for the tasks that asked (a reset stops those), and a task asking from now on encodes afresh
        rather than wait for a file whose directory is gone."""
        self._done.clear()
        self._encoding.clear()


def _link(source: Path, path: Path) -> None:
    path.unlink(missing_ok=True)
    try:
        os.link(source, path)
    except OSError:  # another file system, or links not supported
        shutil.copyfile(source, path)
