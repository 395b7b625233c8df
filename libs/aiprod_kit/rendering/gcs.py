"""Finished videos in Google Cloud Storage: the `VideoStore` used when a bucket is configured."""

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

from google.api_core.exceptions import PreconditionFailed
from google.cloud import storage

from aiprod_kit.rendering.storage import VIDEO_SUFFIX, StoredVideo, VideoStore, sha256_of

_GCS_PREFIX = "videos"


class GcsVideoStore(VideoStore):
    """Videos as objects `gs://<bucket>/videos/<sha[:2]>/<sha>.mp4` in Google Cloud Storage.

    The client library is blocking, so each call runs in a worker thread.
    """

    def __init__(self, bucket_name: str, client: storage.Client | None = None) -> None:
        self.bucket_name = bucket_name
        self._bucket = (client or storage.Client()).bucket(bucket_name)

    async def put(self, source: Path) -> StoredVideo:
        return await asyncio.to_thread(self._put, source)

    async def fetch(self, uri: str, destination: Path) -> Path:
        await asyncio.to_thread(
            self._bucket.blob(self.object_name(uri)).download_to_filename, str(destination)
        )
        return destination

    def object_name(self, uri: str) -> str:
        """The object name behind a `gs://` URI of this store's bucket; ValueError for any other URI."""
        parts = urlsplit(uri)
        if parts.scheme != "gs" or parts.netloc != self.bucket_name or not parts.path.lstrip("/"):
            raise ValueError(f"{uri!r} is not an object of gs://{self.bucket_name}")
        return parts.path.lstrip("/")

    def _put(self, source: Path) -> StoredVideo:
        sha256 = sha256_of(source)
        size_bytes = source.stat().st_size
        name = f"{_GCS_PREFIX}/{sha256[:2]}/{sha256}{VIDEO_SUFFIX}"
        stored = StoredVideo(uri=f"gs://{self.bucket_name}/{name}", sha256=sha256, size_bytes=size_bytes)
        # A metadata read is far cheaper than uploading a video again (a retried render, say).
        if self._bucket.get_blob(name) is not None:
            return stored
        blob = self._bucket.blob(name)
        blob.metadata = {"sha256": sha256}
        try:
            # Generation 0 means "only if absent": a concurrent or retried upload of the same content
            # keeps the existing object.
            blob.upload_from_filename(str(source), content_type="video/mp4", if_generation_match=0)
        except PreconditionFailed:
            pass  # Already there: the name is the content's hash, so it holds the same bytes.
        return stored
