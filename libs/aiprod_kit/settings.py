"""Typed settings, read once at start-up from environment variables prefixed ``AIPROD_``."""

from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

# The documented ports of `aiprod up`; tests set 0 to get free ones.
GATEWAY_PORT = 50051
ROUTER_PORT = 50052
METRICS_PORT = 50053
LOCAL_RENDERER_PORT = 50060


class CommonSettings(BaseSettings):
    """Settings every service reads."""

    model_config = SettingsConfigDict(env_prefix="AIPROD_", extra="ignore", frozen=True)

    # Address the service binds to; 0.0.0.0 in a container.
    host: str = "127.0.0.1"
    # Where durable local state lives: the job store and the videos.
    data_dir: Path = Path(".aiprod")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    # Where traces and metrics go: nowhere, or the console for local debugging.
    otel_exporter: Literal["none", "console"] = "none"
    # How long in-flight calls may run on after SIGTERM before they are cut.
    shutdown_grace_seconds: float = 5.0


class GatewaySettings(CommonSettings):
    gateway_port: int = GATEWAY_PORT
    router_target: str = f"localhost:{ROUTER_PORT}"
    metrics_target: str = f"localhost:{METRICS_PORT}"
    # How many jobs the dispatcher renders at once.
    dispatch_concurrency: int = 4


class RouterSettings(CommonSettings):
    router_port: int = ROUTER_PORT
    # The renderers, as comma-separated backend=target pairs.
    renderers: str = f"local=localhost:{LOCAL_RENDERER_PORT}"
    metrics_target: str = f"localhost:{METRICS_PORT}"


class MetricsSettings(CommonSettings):
    metrics_port: int = METRICS_PORT


class LocalRendererSettings(CommonSettings):
    local_renderer_port: int = LOCAL_RENDERER_PORT
    # Frames encoded per second of wall time at most; 0 means as fast as the machine goes.
    # Demos and fault tests slow a render down with it so that there is time to watch or kill it.
    local_render_pace_fps: float = 0.0
    # How many renders run at once.
    local_render_concurrency: int = 2
