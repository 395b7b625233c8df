"""The render key store on SQLite (one file several processes share) and on PostgreSQL."""

import asyncio
from collections.abc import Callable

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.rendering.keys import RenderKeyStore

RUNWAY = backend_pb2.BACKEND_RUNWAY
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
