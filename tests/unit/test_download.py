"""Copying an output from its URL: what a refusal tells the retries (aiprod_kit.rendering.download)."""

import httpx
import pytest

from aiprod_kit.rendering.download import download_url
from aiprod_kit.rendering.provider import ErrorKind, ProviderError


def client(status: int, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers=headers, content=b"video" if status == 200 else b"")

    return httpx.AsyncClient(transport=httpx.MockTransport(answer))


@pytest.mark.parametrize(("status", "kind"), [(429, ErrorKind.RATE_LIMITED), (503, ErrorKind.UNAVAILABLE)])
async def test_a_refused_copy_says_how_long_the_provider_asked_to_wait(tmp_path, status, kind):
    async with client(status, {"Retry-After": "1"}) as refusing:
        with pytest.raises(ProviderError) as refused:
            await download_url(refusing, "https://outputs.example/video.mp4", tmp_path / "out.mp4")
    assert (refused.value.kind, refused.value.status, refused.value.retry_after) == (kind, status, 1.0)


async def test_a_refusal_without_retry_after_leaves_the_wait_to_the_backoff(tmp_path):
    async with client(429) as refusing:
        with pytest.raises(ProviderError) as refused:
            await download_url(refusing, "https://outputs.example/video.mp4", tmp_path / "out.mp4")
    assert refused.value.retry_after is None


async def test_a_copy_is_written_whole(tmp_path):
    async with client(200) as serving:
        await download_url(serving, "https://outputs.example/video.mp4", tmp_path / "out.mp4")
    assert (tmp_path / "out.mp4").read_bytes() == b"video"
