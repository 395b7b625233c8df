"""Copying a provider's output from its (expiring) URL."""

from pathlib import Path

import httpx

from aiprod_kit.rendering.provider import ErrorKind, ProviderError, retry_after_seconds
from aiprod_kit.telemetry import output_download


async def download_url(client: httpx.AsyncClient, url: str, destination: Path) -> None:
    """Streams url to destination. An expired or missing output is final (REFUSED); a server error or
    a broken transfer may be tried again (a GET has no side effect). The URL is a credential: its span
    keeps the host only (`output_download`), and no message quotes it."""
    try:
        with output_download():
            async with client.stream("GET", url) as response:
                if response.status_code in (401, 403, 404, 410):
                    raise ProviderError(
                        ErrorKind.REFUSED, "the output URL has expired or is gone", response.status_code
                    )
                if response.status_code >= 400:
                    kind = ErrorKind.RATE_LIMITED if response.status_code == 429 else ErrorKind.UNAVAILABLE
                    # Waited out as asked: a lone copy refused again and again would otherwise back off
                    # to 30 s between tries, and a storm's refusals could take its whole time.
                    retry_after = retry_after_seconds(response.headers.get("retry-after"))
                    raise ProviderError(
                        kind, "the output could not be fetched", response.status_code, retry_after=retry_after
                    )
                with destination.open("wb") as file:
                    async for chunk in response.aiter_bytes():
                        file.write(chunk)
    except httpx.TimeoutException as error:
        raise ProviderError(ErrorKind.AMBIGUOUS, "the output download timed out") from error
    except httpx.TransportError as error:
        raise ProviderError(ErrorKind.UNAVAILABLE, f"the output download broke: {error}") from error
