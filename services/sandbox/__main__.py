"""`python -m aiprod_sandbox`: the provider sandbox."""

import asyncio
import contextlib

from aiprod_sandbox.app import serve
from aiprod_sandbox.settings import SandboxSettings


def main() -> None:
    settings = SandboxSettings()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
