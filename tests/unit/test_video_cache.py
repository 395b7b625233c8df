"""The sandbox's video cache: one encode per distinct video, a file of its own for every task."""

import asyncio
import shutil
import threading
from pathlib import Path

import pytest

from aiprod_sandbox.video_cache import VideoCache


class Encoder:
    """Writes a video's stand-in; blocks until released when gated, to hold an encode in flight."""

    def __init__(self, gated: bool = False) -> None:
        self.calls: list[Path] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.fail = False

    def __call__(self, path: Path) -> None:
        self.calls.append(path)
        self.started.set()
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("encoder crashed")
        path.write_bytes(b"video " + path.name.encode())


async def test_tasks_asking_for_one_video_share_one_encode_and_keep_their_own_files(tmp_path):
    cache, encode = VideoCache(tmp_path / "cache", concurrency=2), Encoder(gated=True)
    key = VideoCache.key("A fox", 7, 4.0, 1280, 720)
    first = asyncio.create_task(cache.place(key, tmp_path / "runway" / "a-0.mp4", encode))
    second = asyncio.create_task(cache.place(key, tmp_path / "veo" / "b-0.mp4", encode))
    await asyncio.sleep(0)  # both asked before the encode ends
    encode.gate.set()
    await asyncio.gather(first, second)
    await cache.place(key, tmp_path / "replicate" / "c-0.mp4", encode)
    assert len(encode.calls) == 1
    assert (cache.encodes, cache.hits) == (1, 2)
    files = [
        tmp_path / "runway" / "a-0.mp4",
        tmp_path / "veo" / "b-0.mp4",
        tmp_path / "replicate" / "c-0.mp4",
    ]
    assert len({path.read_bytes() for path in files}) == 1
    # A task deleted (its file removed) takes nothing from the others.
    files[0].unlink()
    assert files[1].exists() and files[2].exists()


async def test_distinct_videos_are_encoded_each(tmp_path):
    cache, encode = VideoCache(tmp_path / "cache", concurrency=1), Encoder()
    keys = {
        VideoCache.key("A fox", 7, 4.0, 1280, 720),
        VideoCache.key("A fox", 8, 4.0, 1280, 720),
        VideoCache.key("A fox", 7, 6.0, 1280, 720),
        VideoCache.key("A fox", 7, 4.0, 720, 1280),
        VideoCache.key("A cat", 7, 4.0, 1280, 720),
    }
    assert len(keys) == 5
    for index, key in enumerate(sorted(keys)):
        await cache.place(key, tmp_path / f"task-{index}.mp4", encode)
    assert cache.encodes == 5 and cache.hits == 0


async def test_a_cancelled_task_leaves_the_encode_to_the_others(tmp_path):
    cache, encode = VideoCache(tmp_path / "cache", concurrency=1), Encoder(gated=True)
    key = VideoCache.key("A heron", 1, 2.0, 640, 360)
    cancelled = asyncio.create_task(cache.place(key, tmp_path / "a.mp4", encode))
    waiting = asyncio.create_task(cache.place(key, tmp_path / "b.mp4", encode))
    await asyncio.sleep(0)
    cancelled.cancel()
    encode.gate.set()
    await waiting
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert (tmp_path / "b.mp4").exists() and not (tmp_path / "a.mp4").exists()
    assert len(encode.calls) == 1


async def test_a_failed_encode_fails_its_waiters_and_is_tried_again_next_time(tmp_path):
    cache, encode = VideoCache(tmp_path / "cache", concurrency=1), Encoder(gated=True)
    encode.fail = True
    key = VideoCache.key("A kite", 3, 2.0, 640, 360)
    tasks = [asyncio.create_task(cache.place(key, tmp_path / f"{name}.mp4", encode)) for name in "ab"]
    await asyncio.sleep(0)
    encode.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(result, RuntimeError) for result in results)
    encode.fail = False
    await cache.place(key, tmp_path / "c.mp4", encode)
    assert len(encode.calls) == 2 and (tmp_path / "c.mp4").exists()


async def test_the_least_recently_used_video_leaves_a_full_cache_but_not_its_tasks(tmp_path):
    cache, encode = VideoCache(tmp_path / "cache", concurrency=1, entries=1), Encoder()
    old, new = VideoCache.key("old", 1, 2.0, 640, 360), VideoCache.key("new", 1, 2.0, 640, 360)
    await cache.place(old, tmp_path / "old-task.mp4", encode)
    await cache.place(new, tmp_path / "new-task.mp4", encode)
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [f"{new}.mp4"]
    assert (tmp_path / "old-task.mp4").exists()
    await cache.place(old, tmp_path / "old-again.mp4", encode)  # encoded again
    assert cache.encodes == 3


async def test_a_task_after_a_reset_encodes_afresh_rather_than_join_an_encode_from_before(tmp_path):
    # The sandbox's reset clears the cache and deletes its directory while an earlier task's encode
    # runs: a new task asking for the same video must not get that encode's failure.
    cache = VideoCache(tmp_path / "cache", concurrency=2)
    before, after = Encoder(gated=True), Encoder()
    key = VideoCache.key("A lantern", 5, 2.0, 640, 360)
    earlier = asyncio.create_task(cache.place(key, tmp_path / "earlier.mp4", before))
    assert await asyncio.to_thread(before.started.wait, 10)
    cache.clear()
    shutil.rmtree(tmp_path / "cache")
    await cache.place(key, tmp_path / "later.mp4", after)
    assert (tmp_path / "later.mp4").exists() and len(after.calls) == 1
    before.gate.set()
    await asyncio.gather(earlier, return_exceptions=True)  # whatever became of it, the reset stopped its task


async def test_an_encode_from_before_a_reset_never_writes_the_file_a_later_one_writes(tmp_path):
    # An encode a reset forgot runs on in its thread; a task after the reset encodes the same video
    # afresh. Had both written one partial file, the later task could get a file of two encodes.
    cache = VideoCache(tmp_path / "cache", concurrency=2)
    before, after = Encoder(gated=True), Encoder(gated=True)
    key = VideoCache.key("A lantern", 5, 2.0, 640, 360)
    earlier = asyncio.create_task(cache.place(key, tmp_path / "earlier.mp4", before))
    assert await asyncio.to_thread(before.started.wait, 10)
    cache.clear()
    shutil.rmtree(tmp_path / "cache")
    later = asyncio.create_task(cache.place(key, tmp_path / "later.mp4", after))
    assert await asyncio.to_thread(after.started.wait, 10)
    assert before.calls[0] != after.calls[0]
    before.gate.set()
    await asyncio.gather(earlier, return_exceptions=True)
    after.gate.set()
    await later
    assert (tmp_path / "later.mp4").read_bytes() == b"video " + after.calls[0].name.encode()
