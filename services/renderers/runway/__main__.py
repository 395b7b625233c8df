"""`python -m aiprod_renderers.runway`: the Runway renderer service."""

from aiprod_kit.rendering.main import run_renderer
from aiprod_kit.settings import RunwaySettings
from aiprod_renderers.runway.provider import RunwayProvider

if __name__ == "__main__":
    run_renderer("renderer-runway", RunwaySettings, RunwayProvider)
