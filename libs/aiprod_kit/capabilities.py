"""Whether a backend can render a shot (shared by the router's policy and the gateway's validation),
and what a backend is called."""

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2

# Frame sizes at 720p, the size every backend renders by default.
FRAME_SIZES_720P = {
    render_pb2.ASPECT_RATIO_16_9: (1280, 720),
    render_pb2.ASPECT_RATIO_9_16: (720, 1280),
    render_pb2.ASPECT_RATIO_1_1: (960, 960),
}

# Tolerance when comparing a requested duration with a backend's exact allowed ones.
_DURATION_EPSILON = 1e-6


def shot_mismatches(shot: render_pb2.Shot, capabilities: renderer_pb2.Capabilities) -> list[tuple[str, str]]:
    """The shot's fields the backend cannot satisfy, each with the reason, as (field, reason)."""
    mismatches = []
    duration = shot.duration_seconds
    if not capabilities.min_duration_seconds <= duration <= capabilities.max_duration_seconds:
        mismatches.append(
            (
                "duration_seconds",
                f"renders {capabilities.min_duration_seconds:g} to {capabilities.max_duration_seconds:g} s, "
                f"not {duration:g} s",
            )
        )
    elif capabilities.allowed_durations_seconds and not any(
        abs(duration - allowed) < _DURATION_EPSILON for allowed in capabilities.allowed_durations_seconds
    ):
        allowed = ", ".join(f"{value:g}" for value in capabilities.allowed_durations_seconds)
        mismatches.append(("duration_seconds", f"renders only {allowed} s, not {duration:g} s"))
    aspect_ratio = shot.aspect_ratio or render_pb2.ASPECT_RATIO_16_9
    if aspect_ratio not in capabilities.aspect_ratios:
        mismatches.append(("aspect_ratio", f"does not render {render_pb2.AspectRatio.Name(aspect_ratio)}"))
    if (shot.first_frame.data or shot.first_frame.uri) and not capabilities.image_input:
        mismatches.append(("first_frame", "does not take a first frame"))
    return mismatches


def backend_name(backend: int) -> str:
    """A backend's short name (local, runway, veo, replicate): in messages, logs and metric labels."""
    return backend_pb2.Backend.Name(backend).removeprefix("BACKEND_").lower()
