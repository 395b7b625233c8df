"""Content-addressed video storage on the local disk: <videos>/<sha[:2]>/<sha>.mp4.

A video is written to a temporary file in the same directory, hashed, synced, then renamed into
place, so a final name never holds a partial file and the same content is stored once.
"""

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

_CHUNK = 1 << 20

T = TypeVar("T")


@dataclass(frozen=True)
class StoredFile:
    path: Path
    sha256: str
    size_bytes: int

    @property
    def uri(self) -> str:
        return self.path.as_uri()


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def store(directory: Path, write: Callable[[Path], T], suffix: str = ".mp4") -> tuple[StoredFile, T]:
    """Calls write(temporary path), then moves the file to its content address under `directory`.

    Returns the stored file and what write returned. Blocking. If write raises, the temporary file
    is removed and the error goes on.
    """
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=directory, prefix=".partial-", suffix=suffix)
    os.close(descriptor)
    temporary = Path(name)
    try:
        written = write(temporary)
        sha256 = _sha256_of(temporary)
        with temporary.open("rb") as file:
            os.fsync(file.fileno())
        final = directory / sha256[:2] / f"{sha256}{suffix}"
        final.parent.mkdir(exist_ok=True)
        # mkstemp makes the file private; stored videos are meant to be read by the other services.
        temporary.chmod(0o644)
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return StoredFile(path=final, sha256=sha256, size_bytes=final.stat().st_size), written
