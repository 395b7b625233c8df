"""`python -m aiprod_renderers.local`: the local renderer service."""

from aiprod_kit.server import run
from aiprod_kit.settings import LocalRendererSettings, exit_on_configuration_error, load_settings
from aiprod_renderers.local.service import build


def main() -> None:
    with exit_on_configuration_error():
        settings = load_settings(LocalRendererSettings)
    run("renderer-local", settings, settings.local_renderer_port, lambda: build(settings))


if __name__ == "__main__":
    main()
