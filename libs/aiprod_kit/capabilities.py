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

# The largest first frame the public API takes inline (Image.data), and the most a renderer may read
# of one it fetches from a URI: the gateway refuses larger inline images, and every gRPC server and
# channel of the mesh is sized to carry one (aiprod_kit.channels.MAX_MESSAGE_BYTES).
MAX_INLINE_IMAGE_BYTES = 10 * 1024 * 1024


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
        # An unknown value has no name: said as its number rather than raised.
        name = (
            render_pb2.AspectRatio.Name(aspect_ratio)
            if aspect_ratio in render_pb2.AspectRatio.values()
            else str(aspect_ratio)
        )
        mismatches.append(("aspect_ratio", f"does not render {name}"))
    if (shot.first_frame.data or shot.first_frame.uri) and not capabilities.image_input:
        mismatches.append(("first_frame", "does not take a first frame"))
    # Limits of the provider's own API (0: none known): checked here so that the router ranks a long
    # prompt or a large image to a backend that takes it instead of failing at one that does not.
    # Characters are code points, as the providers count them.
    prompt_characters = len(shot.prompt)
    if capabilities.max_prompt_characters and prompt_characters > capabilities.max_prompt_characters:
        mismatches.append(
            (
                "prompt",
                f"takes prompts of at most {capabilities.max_prompt_characters} characters: "
                f"this one of {prompt_characters} is too long",
            )
        )
    # Only an inline image has a size known before the render; one behind a URI is capped where read.
    image_bytes = len(shot.first_frame.data)
    if (
        capabilities.image_input
        and capabilities.max_image_bytes
        and image_bytes > capabilities.max_image_bytes
    ):
        mismatches.append(
            (
                "first_frame.data",
                f"takes first frames of at most {capabilities.max_image_bytes} bytes: "
                f"this one of {image_bytes} is too large",
            )
        )
    return mismatches


def backend_name(backend: int) -> str:
    """A backend's short name (local, runway, veo, replicate): in messages, logs and metric labels."""
    return backend_pb2.Backend.Name(backend).removeprefix("BACKEND_").lower()
