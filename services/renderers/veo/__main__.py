"""`python -m aiprod_renderers.veo`: the Veo renderer service."""

from aiprod_kit.rendering.main import run_renderer
from aiprod_kit.settings import VeoSettings
from aiprod_renderers.veo.provider import VeoProvider

if __name__ == "__main__":
    run_renderer("renderer-veo", VeoSettings, VeoProvider)
