"""The sandbox's settings, read once at start-up from `AIPROD_` environment variables."""

from pydantic import Field

from aiprod_kit.settings import CommonSettings

SANDBOX_PORT = 50080


class SandboxSettings(CommonSettings):
    sandbox_port: int = SANDBOX_PORT
    # How long a simulated render takes; the control API can change it at run time.
    sandbox_render_seconds: float = 3.0
    # Every video's shorter side, in pixels; 0: each provider's own size (720p, or 1080p when asked). For
    # tests and benchmarks that measure the mesh rather than the encoder: a provider renderer's QC takes
    # any size of the asked aspect ratio, as providers deliver several.
    sandbox_video_short_side: int = Field(0, ge=0)
    # The API keys (Runway, Replicate) and OAuth tokens (Vertex) the sandbox accepts, comma-separated.
    sandbox_api_key: str = "sandbox-key"

    @property
    def accepted_keys(self) -> frozenset[str]:
        return frozenset(key.strip() for key in self.sandbox_api_key.split(",") if key.strip())
