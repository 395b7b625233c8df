"""`python -m aiprod_sandbox`: the provider sandbox."""

import asyncio
import contextlib

from aiprod_kit.settings import exit_on_configuration_error, load_settings_or_exit
from aiprod_sandbox.app import serve
from aiprod_sandbox.settings import SandboxSettings


def main() -> None:
    settings = load_settings_or_exit(SandboxSettings)
    with exit_on_configuration_error(), contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
