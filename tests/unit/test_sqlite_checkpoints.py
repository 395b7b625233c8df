"""A private SQLite file (used from the event loop) checkpoints its log on a thread: the log stays
bounded, and transactions and reads running meanwhile are unaffected."""

import asyncio
import os

from aiprod_kit.database import SqliteDatabase

ROW = os.urandom(8192)  # two pages or more a commit


async def test_a_private_database_checkpoints_its_log_and_starts_it_over(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    database = SqliteDatabase(path, "jobs", private=True)
    await database.create_schema({"sqlite": "CREATE TABLE rows (id INTEGER PRIMARY KEY, data BLOB NOT NULL)"})
    every = SqliteDatabase.CHECKPOINT_EVERY_COMMITS
    wal = path.with_name(path.name + "-wal")
    sizes = []
    for index in range(6 * every):
        async with database.transaction() as transaction:
            await transaction.execute("INSERT INTO rows (id, data) VALUES (?, ?)", (index, ROW))
        await asyncio.sleep(0)  # the checkpoint's turn, as a server's loop gives it between calls
        sizes.append(wal.stat().st_size)
    # Two pages a commit at least: without checkpoints the log would hold all of them.
    all_commits = 6 * every * 2 * 4096
    assert max(sizes) < all_commits / 2
    assert await database.fetchone("SELECT COUNT(*) FROM rows") == (6 * every,)
    await database.close()


async def test_transactions_and_reads_meanwhile_all_succeed(tmp_path):
    database = SqliteDatabase(tmp_path / "jobs.sqlite3", "jobs", private=True)
    await database.create_schema({"sqlite": "CREATE TABLE rows (id INTEGER PRIMARY KEY, data BLOB NOT NULL)"})

    async def writer(first: int) -> None:
        for index in range(first, first + 100):
            async with database.transaction() as transaction:
                await transaction.execute("INSERT INTO rows (id, data) VALUES (?, ?)", (index, ROW))
                assert await transaction.fetchone("SELECT id FROM rows WHERE id = ?", (index,)) == (index,)
            assert await database.fetchone("SELECT COUNT(*) FROM rows WHERE id = ?", (index,)) == (1,)

    await asyncio.gather(*(writer(first) for first in range(0, 800, 100)))
    assert await database.fetchone("SELECT COUNT(*) FROM rows") == (800,)
    await database.close()
