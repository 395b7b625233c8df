"""Durable render keys: what became of each idempotency key of one backend, shared by its replicas.

A key goes through at most three writes, each one transaction:

1. `claim`: the intent, before the provider's create is sent. Only one claimant (process, replica)
   wins a key; the others read what the winner wrote.
2. `record_task`: the provider's task id, right after the create answered.
3. `record_end`: the render as it ended (state, failure, charge), so that a repeated StartRender or
   GetRender answers the same even once the provider has forgotten the task (Replicate deletes
   outputs after an hour).

A key whose render ended is deleted once claimed longer ago than the jobs' retention (`purge`,
`aiprod_kit.retention`); a key without an end is kept however old, as its create may have reached the
provider. A key purged is free again: a StartRender under it creates anew.

A key with an intent and no task id, once its claimant's create deadline has passed, may have
reached the provider: it is never sent again (the kit reports it PROVIDER_UNCERTAIN).

One SQLite file (WAL) per backend under the data directory by default, shared by the replicas on
one machine; PostgreSQL (`AIPROD_DATABASE_URL`) for replicas on many. Rows of every backend share one
table, keyed by backend and key.
"""

import re
import time
import uuid
from dataclasses import dataclass

from aiprod.common.v1 import render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.database import Database

_SCHEMAS = {
    "sqlite": """
CREATE TABLE IF NOT EXISTS render_keys (
    backend INTEGER NOT NULL,
    idempotency_key TEXT NOT NULL,
    -- the process that claimed the key, and when (Unix seconds)
    owner TEXT NOT NULL,
    claimed REAL NOT NULL,
    model TEXT NOT NULL,
    -- the aiprod.common.v1.Shot asked for, without first-frame bytes
    shot BLOB NOT NULL,
    -- the provider's task id, once its create answered
    task_id TEXT,
    -- the aiprod.renderer.v1.Render as it ended
    ended BLOB,
    PRIMARY KEY (backend, idempotency_key)
) WITHOUT ROWID;
-- A task's key by its id: SQLite chose the primary key's backend range over (backend, task_id), every key
-- of the file's one backend (363 ms at 1,000,000 keys); it takes this index (whose rows end with the
-- primary key's columns, backend among them).
CREATE INDEX IF NOT EXISTS render_keys_by_task ON render_keys (task_id);
DROP INDEX IF EXISTS render_keys_task;
-- The ended keys by when they were claimed: the purge reads only the keys it deletes.
CREATE INDEX IF NOT EXISTS render_keys_ended ON render_keys (backend, claimed) WHERE ended IS NOT NULL;
""",
    "postgresql": """
CREATE TABLE IF NOT EXISTS render_keys (
    backend INTEGER NOT NULL,
    idempotency_key TEXT NOT NULL,
    owner TEXT NOT NULL,
    claimed DOUBLE PRECISION NOT NULL,
    model TEXT NOT NULL,
    shot BYTEA NOT NULL,
    task_id TEXT,
    ended BYTEA,
    PRIMARY KEY (backend, idempotency_key)
);
CREATE INDEX IF NOT EXISTS render_keys_by_task ON render_keys (task_id, backend);
DROP INDEX IF EXISTS render_keys_task;
CREATE INDEX IF NOT EXISTS render_keys_ended ON render_keys (backend, claimed) WHERE ended IS NOT NULL;
""",
}
# What an idempotency key may be, and the rule as told to a caller who broke it.
KEY_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
KEY_RULE = "must be 1 to 128 characters from A-Z, a-z, 0-9 and . _ : -"
_COLUMNS = "idempotency_key, owner, claimed, model, shot, task_id, ended"


@dataclass(frozen=True)
class KeyRecord:
    """What the store knows of one key."""

    idempotency_key: str
    owner: str
    # Unix seconds.
    claimed: float
    model: str
    shot: render_pb2.Shot
    task_id: str
    ended: renderer_pb2.Render | None


def _record(row: tuple) -> KeyRecord:
    key, owner, claimed, model, shot, task_id, ended = row
    ended_render = None
    if ended is not None:
        ended_render = renderer_pb2.Render.FromString(bytes(ended))
    return KeyRecord(
        key,
        owner,
        float(claimed),
        model,
        render_pb2.Shot.FromString(bytes(shot)),
        task_id or "",
        ended_render,
    )


def stored_shot(shot: render_pb2.Shot) -> bytes:
    """The shot as kept: the bytes of its images (up to megabytes each) are dropped, what they are
    stays."""
    kept = render_pb2.Shot()
    kept.CopyFrom(shot)
    for image in (kept.first_frame, *kept.reference_images):
        image.data = b""
    return kept.SerializeToString()


class RenderKeyStore:
    """The render keys of one backend on a `Database`."""

    def __init__(self, database: Database, backend: int, owner: str | None = None) -> None:
        self._db = database
        self._backend = backend
        # This process, as the claimant of the keys it creates.
        self.owner = owner or uuid.uuid4().hex

    @classmethod
    async def open(cls, database: Database, backend: int, owner: str | None = None) -> "RenderKeyStore":
        await database.create_schema(_SCHEMAS)
        return cls(database, backend, owner)

    async def close(self) -> None:
        await self._db.close()

    async def get(self, key: str) -> KeyRecord | None:
        row = await self._db.fetchone(
            f"SELECT {_COLUMNS} FROM render_keys WHERE backend = ? AND idempotency_key = ?",
            (self._backend, key),
        )
        return _record(row) if row else None

    async def by_task(self, task_id: str) -> KeyRecord | None:
        row = await self._db.fetchone(
            f"SELECT {_COLUMNS} FROM render_keys WHERE backend = ? AND task_id = ?", (self._backend, task_id)
        )
        return _record(row) if row else None

    async def claim(
        self, key: str, model: str, shot: render_pb2.Shot, now: float | None = None
    ) -> tuple[bool, KeyRecord]:
        """Records the intent to create under key unless the key is known; returns (won, the record).
        Only one claimant wins a key, across processes."""
        row = None
        while row is None:  # a key purged between the INSERT and the SELECT (PostgreSQL) is claimed anew
            async with self._db.transaction() as transaction:
                await transaction.lock(f"render-key:{self._backend}:{key}")
                await transaction.execute(
                    "INSERT INTO render_keys (backend, idempotency_key, owner, claimed, model, shot) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (backend, idempotency_key) DO NOTHING",
                    (
                        self._backend,
                        key,
                        self.owner,
                        time.time() if now is None else now,
                        model,
                        stored_shot(shot),
                    ),
                )
                row = await transaction.fetchone(
                    f"SELECT {_COLUMNS} FROM render_keys WHERE backend = ? AND idempotency_key = ?",
                    (self._backend, key),
                )
        record = _record(row)
        return record.owner == self.owner and not record.task_id and record.ended is None, record

    async def release(self, key: str) -> None:
        """Forgets an intent of this process whose create was certainly never sent."""
        async with self._db.transaction() as transaction:
            await transaction.execute(
                "DELETE FROM render_keys WHERE backend = ? AND idempotency_key = ? AND owner = ? "
                "AND task_id IS NULL AND ended IS NULL",
                (self._backend, key, self.owner),
            )

    async def record_task(self, key: str, task_id: str) -> None:
        async with self._db.transaction() as transaction:
            await transaction.execute(
                "UPDATE render_keys SET task_id = ? WHERE backend = ? AND idempotency_key = ?",
                (task_id, self._backend, key),
            )

    async def record_end(self, key: str, render: renderer_pb2.Render) -> None:
        """Keeps the render as it ended; the first ending recorded stays (replicas agree on one)."""
        async with self._db.transaction() as transaction:
            await transaction.execute(
                "UPDATE render_keys SET ended = ? WHERE backend = ? AND idempotency_key = ? AND ended IS NULL",
                (render.SerializeToString(), self._backend, key),
            )

    async def purge(self, before: float, limit: int) -> int:
        """Deletes up to limit keys of this backend whose render ended and that were claimed before
        `before` (Unix seconds); how many. One short transaction: `Retention` calls it batch by batch."""
        async with self._db.transaction() as transaction:
            # Replicas purge one at a time (PostgreSQL), not the same rows.
            await transaction.lock(f"render-keys-purge:{self._backend}")
            # An ended key's end and claim never change, so the rows selected are the rows deleted,
            # found by primary key: the condition again in the DELETE made SQLite, without
            # statistics, read the index's every key past the cutoff at each batch (4.5 s for 100,000).
            rows = await transaction.fetchall(
                "DELETE FROM render_keys WHERE backend = ? AND idempotency_key IN (SELECT idempotency_key "
                "FROM render_keys WHERE backend = ? AND ended IS NOT NULL AND claimed < ? "
                "ORDER BY claimed LIMIT ?) RETURNING 1",
                (self._backend, self._backend, before, limit),
            )
        return len(rows)
