"""Durable, content-addressed storage of finished videos: on the local disk or in Google Cloud Storage
(`aiprod_kit.rendering.gcs`).

A video is named by the SHA-256 of its bytes (`<sha[:2]>/<sha>.mp4`), so the same content is stored
once and storing it again is harmless. Neither store ever shows a partial file under a final name:
the local one writes through a temporary name and renames, GCS only shows an object once its upload
has completed.
"""

import asyncio
import contextlib
import hashlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit
from urllib.request import url2pathname

_CHUNK = 1 << 20
VIDEO_SUFFIX = ".mp4"
# Files in the store's directory that are not videos yet, or not any more: a store's, then a deletion's.
_PARTIAL = ".partial-"
_DELETING = ".deleting-"

T = TypeVar("T")


@dataclass(frozen=True)
class StoredVideo:
    """A video in durable storage."""

    uri: str
    sha256: str
    size_bytes: int


class VideoStore(ABC):
    """Where finished videos are kept."""

    @abstractmethod
    async def put(self, source: Path) -> StoredVideo:
        """Stores a copy of the finished file at `source` under its content address."""

    @abstractmethod
    async def fetch(self, uri: str, destination: Path) -> Path:
        """Copies the video at `uri`, which this store returned, to `destination`; returns it."""


def sha256_of(path: Path) -> str:
    """The hex SHA-256 of a file's bytes. Blocking."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@asynccontextmanager
async def scratch_directory(parent: Path, prefix: str | None = None) -> AsyncIterator[Path]:
    """A private working directory under parent, removed with everything in it; made and removed in a
    worker thread: removing a directory waits on the file system's journal, which the video store's
    fsyncs keep busy, and under load that stalled a renderer's event loop most of the time."""

    def make() -> Path:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=parent, prefix=prefix))

    path = await asyncio.to_thread(make)
    try:
        yield path
    finally:
        await asyncio.to_thread(shutil.rmtree, path, True)


def _fsync_directory(path: Path) -> None:
    # A rename is only durable once the directory holding the new name is synced.
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class LocalVideoStore(VideoStore):
    """Videos as files `<directory>/<sha[:2]>/<sha>.mp4`, with `file://` URIs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()

    async def put(self, source: Path) -> StoredVideo:
        stored, _ = await asyncio.to_thread(self.store, lambda temporary: shutil.copyfile(source, temporary))
        return stored

    async def fetch(self, uri: str, destination: Path) -> Path:
        await asyncio.to_thread(shutil.copyfile, self.path_of(uri), destination)
        return destination

    def path_of(self, uri: str) -> Path:
        """The file behind a `file://` URI of this store; ValueError for any other URI."""
        parts = urlsplit(uri)
        path = Path(url2pathname(parts.path))
        if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not path.is_absolute():
            raise ValueError(f"not a file URI: {uri!r}")
        # Resolved so that ".." cannot lead out of the store.
        path = path.resolve()
        if not path.is_relative_to(self.directory):
            raise ValueError(f"{uri!r} is not in the video store at {self.directory}")
        return path

    def delete_leftovers(self, before: float) -> int:
        """Deletes what stores and deletions cut short by a crash left, older than `before`: partial
        files, and files moved aside to be deleted; how many. Blocking."""
        deleted = 0
        for prefix in (_PARTIAL, _DELETING):
            for path in self.directory.glob(f"{prefix}*{VIDEO_SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                    if path.stat().st_mtime < before:
                        path.unlink()
                        deleted += 1
        return deleted

    def delete_if_stored_before(self, path: Path, before: float) -> bool:
        """Deletes the file at path unless it was stored (again) at or after `before`; whether it did.
        Blocking. Moved aside first and its time read there: a store of the same bytes racing with the
        deletion either lands after the move (a new file, kept) or is the file moved, put back."""
        aside = self.directory / f"{_DELETING}{os.getpid()}-{path.name}"
        try:
            os.rename(path, aside)
            stored = aside.stat().st_mtime
        except FileNotFoundError:  # deleted meanwhile
            return False
        if stored >= before:
            # The same bytes as any copy stored since, so replacing one with the other loses nothing.
            os.replace(aside, path)
            return False
        aside.unlink()
        return True

    def store(self, write: Callable[[Path], T]) -> tuple[StoredVideo, T]:
        """Calls write(temporary path), then moves the file to its content address. Blocking.

        Lets a producer (an encoder) write straight into the store without a copy. Returns the stored
        video and what write returned. If write raises, the temporary file is removed and the error
        goes on; a crash leaves at most a `.partial-*` file, never a partial video under a final name.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        # In the store's own directory, so that the final rename stays on one file system.
        descriptor, name = tempfile.mkstemp(dir=self.directory, prefix=_PARTIAL, suffix=VIDEO_SUFFIX)
        os.close(descriptor)
        temporary = Path(name)
        try:
            written = write(temporary)
            sha256 = sha256_of(temporary)
            with temporary.open("rb") as file:
                os.fsync(file.fileno())
            final = self.directory / sha256[:2] / f"{sha256}{VIDEO_SUFFIX}"
            final.parent.mkdir(exist_ok=True)
            # mkstemp makes the file private; stored videos are meant to be read by the other services.
            temporary.chmod(0o644)
            # Same content again replaces identical bytes: idempotent, and never a partial file.
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_directory(final.parent)
        _fsync_directory(self.directory)
        return StoredVideo(uri=final.as_uri(), sha256=sha256, size_bytes=final.stat().st_size), written


def video_store_from_settings(data_dir: Path, gcs_bucket: str) -> VideoStore:
    """GCS when a bucket is configured, else files under `data_dir / "videos"`."""
    if gcs_bucket:
        # Imported here: the GCS client (22 MB a process) only where a bucket asks for it.
        from aiprod_kit.rendering.gcs import GcsVideoStore

        return GcsVideoStore(gcs_bucket)
    return local_video_store(data_dir)


def local_video_store(data_dir: Path) -> LocalVideoStore:
    """The files under `data_dir / "videos"`, where every service of one machine's mesh keeps them."""
    return LocalVideoStore(data_dir / "videos")
