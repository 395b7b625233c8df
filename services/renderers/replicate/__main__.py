"""`python -m aiprod_renderers.replicate`: the Replicate renderer service."""

from aiprod_kit.rendering.main import run_renderer
from aiprod_kit.settings import ReplicateSettings
from aiprod_renderers.replicate.provider import ReplicateProvider

if __name__ == "__main__":
    run_renderer("renderer-replicate", ReplicateSettings, ReplicateProvider)
