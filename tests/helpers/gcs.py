"""Google Cloud Storage for tests: gcp-storage-emulator, a real local server the official client talks to
(`STORAGE_EMULATOR_HOST`), started as a process on a free loopback port."""

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def storage_emulator() -> Iterator[str]:
    """The emulator's address (http://127.0.0.1:PORT), in memory, for as long as the block runs."""
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gcp_storage_emulator",
            "start",
            "--host=127.0.0.1",
            f"--port={port}",
            "--in-memory",
            "-q",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    host = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{host}/storage/v1/b", timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # It answers: up.
            except OSError:
                if process.poll() is not None:
                    pytest.fail(f"the storage emulator exited with {process.returncode}")
                if time.monotonic() > deadline:
                    pytest.fail("the storage emulator did not come up in 30 s")
                time.sleep(0.05)
        yield host
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
