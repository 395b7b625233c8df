"""The sandbox's settings, read once at start-up from `AIPROD_` environment variables."""

from aiprod_kit.settings import CommonSettings

SANDBOX_PORT = 50080


class SandboxSettings(CommonSettings):
    sandbox_port: int = SANDBOX_PORT
    # How long a simulated render takes; the control API can change it at run time.
    sandbox_render_seconds: float = 3.0
    # The API keys (Runway, Replicate) and OAuth tokens (Vertex) the sandbox accepts, comma-separated.
    sandbox_api_key: str = "sandbox-key"

    @property
    def accepted_keys(self) -> frozenset[str]:
        return frozenset(key.strip() for key in self.sandbox_api_key.split(",") if key.strip())
