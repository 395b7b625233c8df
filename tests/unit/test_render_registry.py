"""The renderer kit's render record and registry: watch streams and a render's one ending."""

import asyncio
from pathlib import Path
from unittest.mock import patch

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.database import SqliteDatabase
from aiprod_kit.failures import Reason, failure
from aiprod_kit.rendering.keys import RenderKeyStore
from aiprod_kit.rendering.record import RenderRecord
from aiprod_kit.rendering.registry import RenderRegistry

RUNNING = renderer_pb2.RENDER_STATE_RUNNING
FAILED = renderer_pb2.RENDER_STATE_FAILED
SHOT = render_pb2.Shot(prompt="A fox", duration_seconds=4)


def _record(key: str = "key-1", task_id: str = "task-1") -> RenderRecord:
    return RenderRecord(key, SHOT, "model", backend_pb2.BACKEND_RUNWAY, task_id)


async def test_a_watch_sends_every_change_and_ends_with_the_ending() -> None:
    render = _record()
    registry: RenderRegistry[RenderRecord] = RenderRegistry("test")
    registry.add(render)
    seen: list[renderer_pb2.Render] = []

    async def watch() -> None:
        async for status in render.watch():
            seen.append(status)
            # The render changes while this message is "being sent": the change is not missed.
            if len(seen) == 1:
                render.update(RUNNING, 0.5)
                await registry.end(render, FAILED, failure(Reason.PROVIDER_FAILED, "no", True), 7)

    async with asyncio.timeout(5):
        await watch()
    assert [status.state for status in seen] == [renderer_pb2.RENDER_STATE_PENDING, FAILED]
    assert seen[-1].progress == 0.5
    assert seen[-1].failure.reason == Reason.PROVIDER_FAILED
    assert seen[-1].charge.amount_micros == 7


async def test_a_render_ends_once_and_frees_its_slot() -> None:
    render = _record()
    slots = asyncio.Semaphore(1)
    await slots.acquire()
    render.slot = slots
    registry: RenderRegistry[RenderRecord] = RenderRegistry("test")
    await registry.end(render, FAILED, failure(Reason.RENDER_LOST, "gone", True), 1)
    await registry.end(render, renderer_pb2.RENDER_STATE_CANCELLED, failure(Reason.CANCELLED, "", False), 2)
    assert render.status.state == FAILED and render.status.charge.amount_micros == 1
    assert not slots.locked() and render.slot is None
    # Progress after the end changes nothing.
    render.update(RUNNING, 0.9)
    assert render.status.state == FAILED and render.status.progress == 0


async def test_an_ending_is_kept_in_the_key_store_before_it_is_announced(tmp_path: Path) -> None:
    keys = await RenderKeyStore.open(
        SqliteDatabase(tmp_path / "keys.sqlite3", "keys"), backend_pb2.BACKEND_RUNWAY
    )
    try:
        registry: RenderRegistry[RenderRecord] = RenderRegistry("test", keys)
        render = _record(task_id="")
        registry.add(render)
        await keys.claim(render.key, render.model, render.shot)
        await registry.record_task(render, "task-9")
        assert registry.by_task("task-9") is render
        change = render.next_change()

        async def announced() -> renderer_pb2.Render | None:
            await change.wait()
            record = await keys.get(render.key)
            return record.ended if record else None

        waiter = asyncio.create_task(announced())
        await registry.end(render, FAILED, failure(Reason.OUTPUT_STORE_FAILED, "disk full", True), 3)
        kept = await waiter
        assert kept is not None
        assert (kept.handle, kept.state, kept.failure, kept.charge) == (
            render.status.handle,
            FAILED,
            render.status.failure,
            render.status.charge,
        )
        assert kept.handle.task_id == "task-9"
    finally:
        await keys.close()


async def test_an_ended_render_the_key_store_keeps_is_forgotten_here_after_a_while(tmp_path: Path) -> None:
    keys = await RenderKeyStore.open(
        SqliteDatabase(tmp_path / "keys.sqlite3", "keys"), backend_pb2.BACKEND_RUNWAY
    )
    try:
        registry: RenderRegistry[RenderRecord] = RenderRegistry("test", keys, ended_kept_seconds=0.05)
        forgotten = asyncio.Event()
        forget = registry.forget

        def forget_and_tell(render: RenderRecord) -> None:
            forget(render)
            forgotten.set()

        registry.forget = forget_and_tell  # type: ignore[method-assign]
        render = _record(task_id="")
        registry.add(render)
        await keys.claim(render.key, render.model, render.shot)
        await registry.record_task(render, "task-5")
        await registry.end(render, FAILED, failure(Reason.PROVIDER_FAILED, "no", True), 4)
        # Still answered from memory just after its end...
        assert registry.by_task("task-5") is render and registry.by_key(render.key) is render
        async with asyncio.timeout(5):
            await forgotten.wait()
        assert registry.by_task("task-5") is None and registry.by_key(render.key) is None
        # ...then by the key store, as it ended.
        record = await keys.by_task("task-5")
        assert record is not None and record.ended is not None
        assert record.ended.state == FAILED and record.ended.charge.amount_micros == 4
    finally:
        await keys.close()


async def test_an_ending_the_key_store_did_not_keep_stays_in_memory(tmp_path: Path) -> None:
    without_store: RenderRegistry[RenderRecord] = RenderRegistry("test", ended_kept_seconds=0)
    render = _record()
    without_store.add(render)
    await without_store.end(render, FAILED, failure(Reason.PROVIDER_FAILED, "no", True), 4)
    keys = await RenderKeyStore.open(
        SqliteDatabase(tmp_path / "keys.sqlite3", "keys"), backend_pb2.BACKEND_RUNWAY
    )
    await keys.close()  # every write to it fails
    unwritable: RenderRegistry[RenderRecord] = RenderRegistry("test", keys, ended_kept_seconds=0)
    other = _record("key-2", "task-2")
    unwritable.add(other)
    with patch("aiprod_kit.rendering.registry._STORE_BACKOFF_SECONDS", 0):
        await unwritable.end(other, FAILED, failure(Reason.PROVIDER_FAILED, "no", True), 4)
    # Whatever ran after the ends (a forget due at once would have), both are still known here.
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert without_store.by_task("task-1") is render
    assert unwritable.by_task("task-2") is other and unwritable.by_key("key-2") is other
