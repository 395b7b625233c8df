"""Content-addressed video stores: on the local disk, and on GCS through a real local emulator."""

import asyncio
import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from google.api_core.exceptions import PreconditionFailed
from google.cloud import storage

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.database import SqliteDatabase
from aiprod_kit.failures import Reason
from aiprod_kit.money import usd
from aiprod_kit.rendering import qc
from aiprod_kit.rendering.gcs import GcsVideoStore
from aiprod_kit.rendering.keys import RenderKeyStore
from aiprod_kit.rendering.provider import (
    ErrorKind,
    Provider,
    ProviderError,
    ProviderTask,
    TaskState,
    VideoSource,
)
from aiprod_kit.rendering.service import ProviderRendererService
from aiprod_kit.rendering.storage import (
    LocalVideoStore,
    StoredVideo,
    VideoStore,
    video_store_from_settings,
)
from aiprod_kit.server import HealthSignal
from aiprod_kit.settings import RunwaySettings
from aiprod_renderers.local import synth

CONTENT = b"not really a video, but bytes all the same"
SHA256 = hashlib.sha256(CONTENT).hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file())


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.bin"
    path.write_bytes(CONTENT)
    return path


# Local store.


async def test_local_put_is_content_addressed(tmp_path: Path, source: Path) -> None:
    store = LocalVideoStore(tmp_path / "videos")
    stored = await store.put(source)
    final = (tmp_path / "videos").resolve() / SHA256[:2] / f"{SHA256}.mp4"
    assert stored == StoredVideo(uri=final.as_uri(), sha256=SHA256, size_bytes=len(CONTENT))
    assert store.path_of(stored.uri) == final
    assert final.read_bytes() == CONTENT
    # Readable by the other services; the source is copied, not taken.
    assert final.stat().st_mode & 0o777 == 0o644
    assert await asyncio.to_thread(source.read_bytes) == CONTENT


async def test_local_put_again_is_idempotent(tmp_path: Path, source: Path) -> None:
    store = LocalVideoStore(tmp_path / "videos")
    first = await store.put(source)
    assert await store.put(source) == first
    # Concurrent puts of the same content also end on the one file, with no temporary files left.
    assert set(await asyncio.gather(*(store.put(source) for _ in range(5)))) == {first}
    assert _files(tmp_path / "videos") == [store.path_of(first.uri)]


async def test_local_fetch(tmp_path: Path, source: Path) -> None:
    store = LocalVideoStore(tmp_path / "videos")
    stored = await store.put(source)
    copy = await store.fetch(stored.uri, tmp_path / "copy.mp4")
    assert copy.read_bytes() == CONTENT


@pytest.mark.parametrize(
    "uri",
    ["gs://bucket/videos/ab/ab.mp4", "file:///etc/passwd", "file://{videos}/../outside.mp4", "relative.mp4"],
)
def test_local_path_of_refuses_other_uris(tmp_path: Path, uri: str) -> None:
    store = LocalVideoStore(tmp_path / "videos")
    with pytest.raises(ValueError):
        store.path_of(uri.format(videos=store.directory))


def test_local_store_writes_through_a_temporary_name(tmp_path: Path) -> None:
    store = LocalVideoStore(tmp_path / "videos")
    seen_while_writing: list[Path] = []

    def write(path: Path) -> str:
        path.write_bytes(CONTENT)
        seen_while_writing.extend(_files(store.directory))
        return "written"

    stored, written = store.store(write)
    assert written == "written"
    # While being written the file only had a temporary name, which is gone now.
    assert [path.name.startswith(".partial-") for path in seen_while_writing] == [True]
    assert _files(store.directory) == [store.path_of(stored.uri)]


def test_local_store_leaves_nothing_on_failure(tmp_path: Path) -> None:
    store = LocalVideoStore(tmp_path / "videos")

    def fail(path: Path) -> None:
        path.write_bytes(CONTENT[:10])
        raise RuntimeError("encoder died")

    with pytest.raises(RuntimeError):
        store.store(fail)
    assert _files(store.directory) == []


def test_local_store_crash_never_leaves_a_partial_video(tmp_path: Path) -> None:
    """A process that dies mid-write, with no chance to clean up, leaves no file under a final name."""
    videos = tmp_path / "videos"
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from aiprod_kit.rendering.storage import LocalVideoStore

        def write(path):
            path.write_bytes(b"half a vid")
            os._exit(3)

        LocalVideoStore(Path({str(videos)!r})).store(write)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], timeout=60, check=False)
    assert result.returncode == 3
    assert [path.name.startswith(".partial-") for path in _files(videos)] == [True]
    assert not list(videos.glob("*/*.mp4"))


def test_local_store_failed_sync_leaves_no_final_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalVideoStore(tmp_path / "videos")

    def broken_fsync(descriptor: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk gone"):
        store.store(lambda path: path.write_bytes(CONTENT))
    assert _files(store.directory) == []


def _stored_at(store: LocalVideoStore, content: bytes, when: float) -> Path:
    stored, _ = store.store(lambda path: path.write_bytes(content))
    path = store.path_of(stored.uri)
    os.utime(path, (when, when))
    return path


def test_local_leftovers_of_crashes_are_deleted_once_old(tmp_path: Path) -> None:
    """What a store or a deletion cut short left (a partial file, a file moved aside) goes once older
    than the cutoff; videos, and a store under way, stay."""
    store = LocalVideoStore(tmp_path / "videos")
    now = time.time()
    video = _stored_at(store, CONTENT, now - 100)
    old = [store.directory / ".partial-crashed.mp4", store.directory / ".deleting-7-abc.mp4"]
    writing = store.directory / ".partial-writing.mp4"
    for path in (*old, writing):
        path.write_bytes(b"half")
    for path in old:
        os.utime(path, (now - 100, now - 100))
    assert store.delete_leftovers(now - 50) == 2
    assert _files(store.directory) == sorted([video, writing])
    assert store.delete_leftovers(now - 50) == 0


def test_local_video_stored_again_while_being_deleted_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A render storing the same bytes as the deletion runs: the file it stored stays, whichever came first."""
    store = LocalVideoStore(tmp_path / "videos")
    now = time.time()
    old = _stored_at(store, CONTENT, now - 100)
    assert store.delete_if_stored_before(old, now - 50) and not old.exists()
    assert not store.delete_if_stored_before(old, now - 50)  # gone already

    rename = os.rename

    def stored_again_first(source, destination) -> None:
        store.store(lambda path: path.write_bytes(CONTENT))  # just before the deletion moves it aside
        rename(source, destination)

    _stored_at(store, CONTENT, now - 100)
    monkeypatch.setattr(os, "rename", stored_again_first)
    assert not store.delete_if_stored_before(old, now - 50)
    assert old.read_bytes() == CONTENT and old.stat().st_mtime >= now - 50

    def stored_again_after(source, destination) -> None:
        rename(source, destination)
        store.store(lambda path: path.write_bytes(CONTENT))  # just after it moved the old one aside

    os.utime(old, (now - 100, now - 100))
    monkeypatch.setattr(os, "rename", stored_again_after)
    assert store.delete_if_stored_before(old, now - 50)
    assert old.read_bytes() == CONTENT and _files(store.directory) == [old]


def test_video_store_from_settings_local(tmp_path: Path) -> None:
    store = video_store_from_settings(tmp_path, "")
    assert isinstance(store, LocalVideoStore)
    assert store.directory == (tmp_path / "videos").resolve()


# GCS store, against gcp-storage-emulator on a free loopback port (the gcs_bucket fixture).


def _objects(gcs_bucket: storage.Bucket) -> list[storage.Blob]:
    return list(gcs_bucket.client.list_blobs(gcs_bucket.name))


async def test_gcs_put_and_fetch_a_video(gcs_bucket: storage.Bucket, tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    synth.encode_video(video, "A lighthouse at dusk", 2, 1.0, 320, 180)
    sha256 = hashlib.sha256(video.read_bytes()).hexdigest()
    store = GcsVideoStore(gcs_bucket.name, client=gcs_bucket.client)

    stored = await store.put(video)
    name = f"videos/{sha256[:2]}/{sha256}.mp4"
    assert stored == StoredVideo(
        uri=f"gs://{gcs_bucket.name}/{name}", sha256=sha256, size_bytes=video.stat().st_size
    )
    blob = gcs_bucket.get_blob(name)
    assert blob is not None
    assert (blob.content_type, blob.metadata, blob.size) == (
        "video/mp4",
        {"sha256": sha256},
        stored.size_bytes,
    )

    fetched = await store.fetch(stored.uri, tmp_path / "fetched.mp4")
    assert fetched.read_bytes() == video.read_bytes()
    assert qc.check_video(fetched, duration_seconds=1.0, width=320, height=180).score >= 0.95


async def test_gcs_put_again_keeps_the_one_object(gcs_bucket: storage.Bucket, source: Path) -> None:
    store = GcsVideoStore(gcs_bucket.name, client=gcs_bucket.client)
    first = await store.put(source)
    generation = gcs_bucket.get_blob(store.object_name(first.uri)).generation
    assert await store.put(source) == first
    objects = _objects(gcs_bucket)
    assert [(blob.name, blob.generation) for blob in objects] == [(store.object_name(first.uri), generation)]


async def test_gcs_put_large_file_resumable(gcs_bucket: storage.Bucket, tmp_path: Path) -> None:
    # Above the client's 8 MiB multipart limit, so it goes up as a resumable upload.
    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(9 << 20))
    store = GcsVideoStore(gcs_bucket.name, client=gcs_bucket.client)
    stored = await store.put(big)
    fetched = await store.fetch(stored.uri, tmp_path / "fetched.mp4")
    assert hashlib.sha256(fetched.read_bytes()).hexdigest() == stored.sha256
    assert gcs_bucket.get_blob(store.object_name(stored.uri)).metadata == {"sha256": stored.sha256}


def test_gcs_object_name_refuses_other_uris(gcs_bucket: storage.Bucket) -> None:
    store = GcsVideoStore(gcs_bucket.name, client=gcs_bucket.client)
    assert store.object_name(f"gs://{gcs_bucket.name}/videos/ab/ab.mp4") == "videos/ab/ab.mp4"
    for uri in ("gs://another-bucket/videos/ab/ab.mp4", f"gs://{gcs_bucket.name}/", "file:///videos/ab.mp4"):
        with pytest.raises(ValueError):
            store.object_name(uri)


def test_video_store_from_settings_gcs(gcs_bucket: storage.Bucket, tmp_path: Path) -> None:
    store = video_store_from_settings(tmp_path, gcs_bucket.name)
    assert isinstance(store, GcsVideoStore)
    assert store.bucket_name == gcs_bucket.name


async def test_gcs_lost_race_is_fine(source: Path) -> None:
    """Another upload of the same content lands between the check and ours: GCS answers 412, and the
    object there is the same video. (The emulator does not enforce preconditions, so a stand-in does.)"""
    uploads: list[dict[str, Any]] = []

    class RacedBlob:
        metadata: dict[str, str] | None = None

        def upload_from_filename(self, filename: str, **options: Any) -> None:
            uploads.append(options)
            raise PreconditionFailed("At least one of the pre-conditions you specified did not hold.")

    class RacedBucket:
        def get_blob(self, name: str) -> None:
            return None

        def blob(self, name: str) -> RacedBlob:
            return RacedBlob()

    class RacedClient:
        def bucket(self, name: str) -> RacedBucket:
            return RacedBucket()

    store: VideoStore = GcsVideoStore("raced", client=RacedClient())  # type: ignore[arg-type]
    stored = await store.put(source)
    assert stored.uri == f"gs://raced/videos/{SHA256[:2]}/{SHA256}.mp4"
    assert uploads == [{"content_type": "video/mp4", "if_generation_match": 0}]


# A renderer's output that cannot be stored, or is slow to fetch -----------------------------------


class _PaidProvider(Provider):
    """A provider whose every task succeeds at once with a real video; its download first meets
    `rate_limits` 429 answers."""

    backend = backend_pb2.BACKEND_RUNWAY
    name = "paid"

    def __init__(self, video: bytes, rate_limits: int = 0) -> None:
        self._video = video
        self.rate_limits = rate_limits
        self.downloads = 0

    def capabilities(self) -> renderer_pb2.Capabilities:
        return renderer_pb2.Capabilities(
            backend=self.backend,
            models=["paid-1"],
            min_duration_seconds=1,
            max_duration_seconds=10,
            aspect_ratios=[render_pb2.ASPECT_RATIO_16_9],
            price_per_second=usd(100_000),
        )

    def missing_configuration(self) -> list[str]:
        return []

    async def create(self, shot: render_pb2.Shot, model: str, idempotency_key: str) -> str:
        return f"task-{idempotency_key}"

    async def get(self, task_id: str) -> ProviderTask:
        return ProviderTask(
            TaskState.SUCCEEDED, 1.0, outputs=(VideoSource(url="https://outputs.test/v.mp4"),)
        )

    async def cancel(self, task_id: str) -> bool:
        return True

    async def probe(self) -> None:
        return None

    async def download(self, source: VideoSource, destination: Path) -> None:
        self.downloads += 1
        if self.downloads <= self.rate_limits:
            raise ProviderError(ErrorKind.RATE_LIMITED, "slow down", 429, retry_after=0.01)
        await asyncio.to_thread(destination.write_bytes, self._video)

    async def aclose(self) -> None:
        return None

    def charge_micros(
        self, shot: render_pb2.Shot, task: ProviderTask | None, *, model: str = "", cancelled: bool = False
    ) -> int:
        return 123_000


class _BrokenStore(VideoStore):
    async def put(self, source: Path) -> StoredVideo:
        raise OSError(28, "No space left on device")

    async def fetch(self, uri: str, destination: Path) -> Path:
        raise AssertionError("never called")


async def _render_to_the_end(tmp_path: Path, provider: Provider, store: VideoStore) -> renderer_pb2.Render:
    """Runs the kit's service in this process on provider and store; the render of one StartRender as
    it ended."""
    settings = RunwaySettings(RUNWAYML_API_SECRET="key", poll_seconds=0.01)  # type: ignore[call-arg]
    keys = await RenderKeyStore.open(SqliteDatabase(tmp_path / "keys.sqlite3", "keys"), provider.backend)
    serving = asyncio.Event()
    health = HealthSignal(serving=False)

    async def publish(now_serving: bool) -> None:
        if now_serving:
            serving.set()

    await health.bind(publish)
    service = ProviderRendererService(provider, settings, store, health, tmp_path / "work", keys)
    await service.start()
    try:
        async with asyncio.timeout(30):
            await serving.wait()
            request = renderer_pb2.StartRenderRequest(
                idempotency_key="paid-1",
                shot=render_pb2.Shot(
                    prompt="A lighthouse", duration_seconds=1, aspect_ratio=render_pb2.ASPECT_RATIO_16_9
                ),
            )
            started = (await service.StartRender(request, None)).render  # type: ignore[arg-type]
            watch = renderer_pb2.WatchRenderRequest(task_id=started.handle.task_id)
            return [message.render async for message in service.WatchRender(watch, None)][-1]  # type: ignore[arg-type]
    finally:
        await service.close()
        await keys.close()


@pytest.fixture
def video(tmp_path: Path) -> bytes:
    path = tmp_path / "made.mp4"
    synth.encode_video(path, "A lighthouse at dusk", 2, 1.0, 1280, 720)
    return path.read_bytes()


async def test_an_output_that_cannot_be_stored_fails_the_render_with_its_charge(
    tmp_path: Path, video: bytes
) -> None:
    final = await _render_to_the_end(tmp_path, _PaidProvider(video), _BrokenStore())
    assert final.state == renderer_pb2.RENDER_STATE_FAILED
    assert final.failure.reason == Reason.OUTPUT_STORE_FAILED and final.failure.retryable
    # The provider billed the task whatever became of its output.
    assert final.charge.amount_micros == 123_000


async def test_a_paid_output_is_fetched_through_rate_limits(tmp_path: Path, video: bytes) -> None:
    provider = _PaidProvider(video, rate_limits=6)
    final = await _render_to_the_end(tmp_path, provider, LocalVideoStore(tmp_path / "videos"))
    assert final.state == renderer_pb2.RENDER_STATE_SUCCEEDED, final.failure
    assert provider.downloads == 7
    assert final.charge.amount_micros == 123_000 and final.output.cost == final.charge
