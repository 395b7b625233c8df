"""The render key store on SQLite (one file several processes share) and on PostgreSQL."""

import asyncio
from collections.abc import Callable

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.rendering.keys import RenderKeyStore
from aiprod_kit.retention import Retention

RUNWAY = backend_pb2.BACKEND_RUNWAY
ENDED = renderer_pb2.Render(state=renderer_pb2.RENDER_STATE_SUCCEEDED)
SHOT = render_pb2.Shot(
    prompt="A fox",
    duration_seconds=4,
    first_frame=render_pb2.Image(data=b"\x89PNG" + b"x" * 1000, mime_type="image/png"),
)


async def test_one_claimant_wins_a_key_and_the_others_read_what_it_wrote(open_database: Callable) -> None:
    first = await RenderKeyStore.open(await open_database("runway-keys"), RUNWAY, owner="replica-a")
    second = await RenderKeyStore.open(await open_database("runway-keys"), RUNWAY, owner="replica-b")
    won, record = await first.claim("key-1", "gen4.5", SHOT)
    assert won and record.task_id == "" and record.ended is None
    # The image's bytes are not kept; what the shot is, is.
    assert record.shot.first_frame.data == b"" and record.shot.first_frame.mime_type == "image/png"
    assert record.shot.duration_seconds == 4 and record.model == "gen4.5"
    lost, seen = await second.claim("key-1", "gen4.5", SHOT)
    assert not lost and seen.owner == "replica-a" and seen.task_id == ""
    # The winner claiming again (a retried transaction) still reads as its own.
    assert (await first.claim("key-1", "gen4.5", SHOT))[0]

    await first.record_task("key-1", "task-1")
    assert (await second.get("key-1")).task_id == "task-1"
    assert (await second.by_task("task-1")).idempotency_key == "key-1"
    assert not (await first.claim("key-1", "gen4.5", SHOT))[0]  # its create was sent: never again


async def test_the_first_ending_recorded_stays(open_database: Callable) -> None:
    store = await RenderKeyStore.open(await open_database("runway-keys"), RUNWAY)
    await store.claim("key-2", "gen4.5", SHOT)
    await store.record_task("key-2", "task-2")
    ended = renderer_pb2.Render(state=renderer_pb2.RENDER_STATE_CANCELLED)
    ended.charge.amount_micros = 480_000
    await store.record_end("key-2", ended)
    await store.record_end("key-2", renderer_pb2.Render(state=renderer_pb2.RENDER_STATE_FAILED))
    kept = (await store.by_task("task-2")).ended
    assert kept.state == renderer_pb2.RENDER_STATE_CANCELLED and kept.charge.amount_micros == 480_000


async def test_release_frees_only_an_unsent_claim_of_its_own(open_database: Callable) -> None:
    mine = await RenderKeyStore.open(await open_database("runway-keys"), RUNWAY, owner="a")
    other = await RenderKeyStore.open(await open_database("runway-keys"), RUNWAY, owner="b")
    await mine.claim("unsent", "gen4.5", SHOT)
    await other.release("unsent")
    assert await mine.get("unsent") is not None
    await mine.release("unsent")
    assert await mine.get("unsent") is None
    await mine.claim("sent", "gen4.5", SHOT)
    await mine.record_task("sent", "task-3")
    await mine.release("sent")
    assert (await mine.get("sent")).task_id == "task-3"


async def test_backends_keep_their_own_keys(open_database: Callable) -> None:
    database = await open_database("runway-keys")
    runway = await RenderKeyStore.open(database, RUNWAY)
    veo = await RenderKeyStore.open(database, backend_pb2.BACKEND_VEO)
    assert (await runway.claim("shared", "gen4.5", SHOT))[0]
    assert (await veo.claim("shared", "veo-3.0-generate-001", SHOT))[0]


async def test_racing_replicas_have_exactly_one_winner(open_database: Callable) -> None:
    stores = [
        await RenderKeyStore.open(await open_database("runway-keys"), RUNWAY, owner=f"r{i}") for i in range(4)
    ]
    outcomes = await asyncio.gather(*(store.claim("raced", "gen4.5", SHOT) for store in stores))
    assert sum(won for won, _ in outcomes) == 1
    assert len({record.owner for _, record in outcomes}) == 1


async def _key(
    store: RenderKeyStore, key: str, claimed: float, task_id: str = "", ended: bool = True
) -> None:
    """A key claimed then, with its task id and its end if asked."""
    await store.claim(key, "gen4.5", SHOT, now=claimed)
    if task_id:
        await store.record_task(key, task_id)
    if ended:
        await store.record_end(key, ENDED)


async def _keys(store: RenderKeyStore) -> set[str]:
    return {row[0] for row in await store._db.fetchall("SELECT idempotency_key FROM render_keys")}


async def test_a_purge_deletes_only_ended_keys_claimed_before_the_cutoff(open_database: Callable) -> None:
    store = await RenderKeyStore.open(await open_database("runway-keys"), RUNWAY, owner="a")
    veo = await RenderKeyStore.open(await open_database("runway-keys"), backend_pb2.BACKEND_VEO)
    await _key(store, "ended-old", 100.0, "task-old")
    await _key(store, "ended-old-no-task", 199.0)  # refused at its create: ended without a task
    await _key(store, "ended-at-cutoff", 200.0, "task-cutoff")
    await _key(store, "ended-new", 300.0, "task-new")
    # Without an end, however old: its create may have reached the provider.
    await _key(store, "sent-unended", 1.0, "task-sent", ended=False)
    await _key(store, "claimed-unended", 2.0, ended=False)
    await _key(veo, "other-backend", 100.0, "task-veo")

    assert await store.purge(200.0, 1000) == 2
    kept = {"ended-at-cutoff", "ended-new", "sent-unended", "claimed-unended", "other-backend"}
    assert await _keys(store) == kept
    assert await store.purge(200.0, 1000) == 0
    # The keys kept answer as before: a StartRender or GetRender under them finds what they were.
    assert (await store.by_task("task-new")).ended.state == ENDED.state
    assert (await store.get("ended-at-cutoff")).task_id == "task-cutoff"
    won, sent = await store.claim("sent-unended", "gen4.5", SHOT)
    assert not won and sent.task_id == "task-sent"  # never sent twice
    assert (await veo.by_task("task-veo")).idempotency_key == "other-backend"
    # A key purged is free again.
    assert await store.get("ended-old") is None and await store.by_task("task-old") is None


async def test_a_purge_deletes_a_batch_and_retention_repeats_it_until_none_is_left(
    open_database: Callable,
) -> None:
    store = await RenderKeyStore.open(await open_database("runway-keys"), RUNWAY)
    for index in range(7):
        await _key(store, f"old-{index}", 100.0 + index)
    await _key(store, "kept", 100.0, ended=False)
    assert await store.purge(1000.0, 3) == 3
    assert await _keys(store) == {"old-3", "old-4", "old-5", "old-6", "kept"}  # the oldest first
    retention = Retention("render keys", store.purge, 500.0, batch=3, clock=lambda: 1500.0)
    assert await retention.purge_once() == 4
    assert await _keys(store) == {"kept"}


async def test_replicas_purging_at_once_both_succeed(open_database: Callable) -> None:
    stores = [await RenderKeyStore.open(await open_database("runway-keys"), RUNWAY) for _ in range(2)]
    for index in range(50):
        await _key(stores[index % 2], f"old-{index}", 100.0)
    await _key(stores[0], "new", 300.0)
    await _key(stores[1], "unended", 1.0, ended=False)
    deleted = await asyncio.gather(*(store.purge(200.0, 30) for store in stores))
    assert sum(deleted) == 50
    assert await _keys(stores[0]) == {"new", "unended"}


async def test_retention_purges_keys_claimed_longer_ago_than_it_and_zero_keeps_them(
    open_database: Callable,
) -> None:
    store = await RenderKeyStore.open(await open_database("runway-keys"), RUNWAY)
    await _key(store, "old", 1000.0 - 86400.0 - 1)
    await _key(store, "young", 1000.0 - 86400.0 + 1)
    assert await Retention("render keys", store.purge, 0.0, clock=lambda: 1000.0).purge_once() == 0
    assert await _keys(store) == {"old", "young"}
    assert await Retention("render keys", store.purge, 86400.0, clock=lambda: 1000.0).purge_once() == 1
    assert await _keys(store) == {"young"}
