"""Running the `aiprod` command as users do: `aiprod up` on free ports, then commands against it."""

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from aiprod_kit.apikeys import ADMIN_KEY_VARIABLE, API_KEY_VARIABLE

AIPROD = Path(sys.executable).with_name("aiprod")
# Long enough for a cold start of the mesh on a slow machine; never waited out on success.
START_TIMEOUT_SECONDS = 180


def cli_environment(api_key: str | None = None, admin_key: str | None = None) -> dict[str, str]:
    """The environment of a command run as a user would: this process's, without the keys of whoever runs
    the tests, with the keys given. Its output goes to a pipe, where the CLI folds no line."""
    environment = dict(os.environ)
    environment.pop("COLUMNS", None)
    for variable, key in ((API_KEY_VARIABLE, api_key), (ADMIN_KEY_VARIABLE, admin_key)):
        environment.pop(variable, None)
        if key is not None:
            environment[variable] = key
    return environment


def aiprod(
    *args: str, timeout: float = 180, api_key: str | None = None, admin_key: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs the command to its end, with the API key (AIPROD_API_KEY) and admin key given, if any."""
    return subprocess.run(
        [str(AIPROD), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=cli_environment(api_key, admin_key),
    )


def usage_error(stderr: str) -> str:
    """The message of a usage error as one line: click's panel folds it into a box of 80 columns."""
    return " ".join(stderr.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def aiprod_up(
    tmp_path: Path, *options: str, environment: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """Runs `aiprod up --json --free-ports`; yields the process and the JSON it printed once up (the
    services, and the development tenant's `api_key` and the `admin_key`)."""
    log_path = tmp_path / "aiprod-up.stderr"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(AIPROD), "up", "--json", "--free-ports", "--data-dir", str(tmp_path / "data"), *options],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, **(environment or {})},
        )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_SECONDS)
        line = process.stdout.readline() if ready else ""
        if not line:
            pytest.fail(f"aiprod up printed nothing; its stderr:\n{log_path.read_text()}")
        yield process, json.loads(line)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def gateway_address(info: dict[str, Any]) -> str:
    return next(service["address"] for service in info["services"] if service["name"] == "gateway")
