"""Output URLs with an expiry, as the providers hand out: `/outputs/{token}.mp4`.

Each URL carries an unguessable token that maps to a file and an expiry time. After the expiry the
URL answers as the provider's storage would: 403 for a Runway (or Veo) signed URL that has expired,
404 for a Replicate file that has been deleted.
"""

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

_EXPIRED_STATUS = {"runway": 403, "veo": 403, "replicate": 404}


@dataclass(frozen=True)
class Output:
    path: Path
    provider: str
    expires_at: float  # time.monotonic()

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.expires_at

    def expired_response(self) -> web.Response:
        status = _EXPIRED_STATUS[self.provider]
        text = "Request has expired" if status == 403 else "Not found"
        return web.Response(status=status, text=text)


class OutputStore:
    def __init__(self) -> None:
        self._outputs: dict[str, Output] = {}

    def publish(self, path: Path, provider: str, ttl_seconds: float) -> str:
        """A new token for the file, valid for ttl_seconds."""
        token = secrets.token_urlsafe(24)
        self._outputs[token] = Output(path, provider, time.monotonic() + ttl_seconds)
        return token

    def find(self, token: str) -> Output | None:
        return self._outputs.get(token)

    def revoke(self, paths: list[Path]) -> None:
        """Forgets every URL of these files: the task that made them was deleted."""
        doomed = set(paths)
        self._outputs = {token: out for token, out in self._outputs.items() if out.path not in doomed}

    def clear(self) -> None:
        self._outputs.clear()


def output_url(request: web.Request, token: str) -> str:
    """The URL as the client reached the sandbox (host and port included), so it works from anywhere."""
    return f"{request.url.origin()}/outputs/{token}.mp4"
