"""`python -m aiprod_renderers.local`: the local renderer service."""

from aiprod_kit.server import run
from aiprod_kit.settings import LocalRendererSettings, load_settings_or_exit
from aiprod_renderers.local.service import build


def main() -> None:
    settings = load_settings_or_exit(LocalRendererSettings)
    run("renderer-local", settings, settings.local_renderer_port, lambda: build(settings))


if __name__ == "__main__":
    main()
