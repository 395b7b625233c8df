"""One SQLite connection on a thread of its own: the metrics service's stores share it."""

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

_T = TypeVar("_T")


class SqliteThread:
    """A WAL database used from one thread of its own, so that waiting for the disk or for another
    process's write lock never stalls the event loop."""

    def __init__(self, path: Path, name: str, schema: str, synchronous: str | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # Other processes sharing the file: wait for their write lock rather than fail.
        self.db.execute("PRAGMA busy_timeout = 30000")
        self.db.execute("PRAGMA journal_mode = WAL")
        if synchronous:
            self.db.execute(f"PRAGMA synchronous = {synchronous}")
        self.db.executescript(schema)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._closed = False

    async def run(self, work: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.run(self.db.close)
        self._thread.shutdown()
