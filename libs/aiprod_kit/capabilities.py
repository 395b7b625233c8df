"""Whether a backend can render a shot (shared by the router's policy and the gateway's validation),
and what a backend is called."""

from dataclasses import dataclass, field
from typing import NamedTuple

from google.protobuf.message import Message

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2

# Frame sizes at 720p, the size every backend renders by default.
FRAME_SIZES_720P = {
    render_pb2.ASPECT_RATIO_16_9: (1280, 720),
    render_pb2.ASPECT_RATIO_9_16: (720, 1280),
    render_pb2.ASPECT_RATIO_1_1: (960, 960),
}
DEFAULT_RESOLUTION = "720p"
# Every resolution a shot may ask for, and its frame sizes.
FRAME_SIZES = {
    DEFAULT_RESOLUTION: FRAME_SIZES_720P,
    "1080p": {
        render_pb2.ASPECT_RATIO_16_9: (1920, 1080),
        render_pb2.ASPECT_RATIO_9_16: (1080, 1920),
        render_pb2.ASPECT_RATIO_1_1: (1440, 1440),
    },
}

# Shapes of shot whose mismatches an offer keeps.
SHAPES_KEPT = 256
# Tolerance when comparing a requested duration with a backend's exact allowed ones.
_DURATION_EPSILON = 1e-6

# The largest first frame the public API takes inline (Image.data), and the most a renderer may read
# of one it fetches from a URI: the gateway refuses larger inline images, and every gRPC server and
# channel of the mesh is sized to carry one (aiprod_kit.channels.MAX_MESSAGE_BYTES).
MAX_INLINE_IMAGE_BYTES = 10 * 1024 * 1024


# What a resolution adds to a model's nominal quality (our judgement: the same motion, sharper).
RESOLUTION_QUALITY = {DEFAULT_RESOLUTION: 0.0, "1080p": 0.02}


# The fields a model offer and a backend's capabilities share, under the same names: what differs from
# one offer to the next. The rest of Capabilities (prompt and image limits) is the backend's own.
_OFFER_FIELDS = (
    "price_per_second",
    "nominal_quality",
    "min_duration_seconds",
    "max_duration_seconds",
    "allowed_durations_seconds",
    "aspect_ratios",
    "image_input",
    "requires_first_frame",
    "audio",
    "max_reference_images",
)


def _copy_offer_fields(source: Message, target: Message) -> None:
    for name in _OFFER_FIELDS:
        value = getattr(source, name)
        if isinstance(value, Message):
            getattr(target, name).CopyFrom(value)
        elif isinstance(value, (int, float, bool)):
            setattr(target, name, value)
        else:  # a repeated field
            getattr(target, name).extend(value)


def with_offers(
    backend: int, offered: list[renderer_pb2.ModelOffer], **backend_limits: int
) -> renderer_pb2.Capabilities:
    """A backend's capabilities from its offers: the top-level fields describe the first (the default),
    models and resolutions list every one; backend_limits are its prompt and image limits."""
    capabilities = renderer_pb2.Capabilities(
        backend=backend,
        models=dict.fromkeys(offer.model for offer in offered),
        resolutions=dict.fromkeys(offer.resolution for offer in offered),
        offers=offered if len(offered) > 1 else [],
        **backend_limits,
    )
    _copy_offer_fields(offered[0], capabilities)
    return capabilities


def frame_size(shot: render_pb2.Shot) -> tuple[int, int]:
    """The frame a shot renders at: its aspect ratio at its resolution (720p when it names none)."""
    sizes = FRAME_SIZES[shot.resolution or DEFAULT_RESOLUTION]
    return sizes[shot.aspect_ratio or render_pb2.ASPECT_RATIO_16_9]


def offers(capabilities: renderer_pb2.Capabilities) -> list[renderer_pb2.ModelOffer]:
    """Every model and resolution a backend offers, the default first: its offers, or the one its
    top-level fields describe."""
    if capabilities.offers:
        return list(capabilities.offers)
    only = renderer_pb2.ModelOffer(
        model=capabilities.models[0] if capabilities.models else "",
        resolution=capabilities.resolutions[0] if capabilities.resolutions else DEFAULT_RESOLUTION,
    )
    _copy_offer_fields(capabilities, only)
    return [only]


def offer_capabilities(
    capabilities: renderer_pb2.Capabilities, offer: renderer_pb2.ModelOffer
) -> renderer_pb2.Capabilities:
    """The backend's capabilities as one of its offers has them: that model at that resolution, at its
    price and quality, within its limits (the backend's own limits, prompt and image, kept)."""
    offered = renderer_pb2.Capabilities(
        backend=capabilities.backend,
        models=[offer.model],
        resolutions=[offer.resolution],
        max_prompt_characters=capabilities.max_prompt_characters,
        max_image_bytes=capabilities.max_image_bytes,
    )
    _copy_offer_fields(offer, offered)
    return offered


def find_offer(
    capabilities: renderer_pb2.Capabilities, model: str, resolution: str
) -> renderer_pb2.ModelOffer | None:
    """The backend's offer of a model at a resolution (empty: the model's first offer)."""
    return next(
        (
            offer
            for offer in offers(capabilities)
            if offer.model == model and (not resolution or offer.resolution == resolution)
        ),
        None,
    )


@dataclass(frozen=True, slots=True)
class ShotShape:
    """The fields of a shot that shot_mismatches reads, read from the message once per route request:
    with the prompt's and the inline image's lengths (`sized`), and without them (`unsized`, for a
    backend with no limit on either)."""

    sized: tuple
    unsized: tuple

    @classmethod
    def of(cls, shot: render_pb2.Shot) -> "ShotShape":
        first_frame = shot.first_frame
        unsized = (
            shot.duration_seconds,
            shot.aspect_ratio,
            shot.resolution,
            bool(first_frame.data or first_frame.uri),
        )
        return cls((*unsized, len(shot.prompt), len(first_frame.data)), unsized)


@dataclass(frozen=True, slots=True)
class Offered:
    """One offer's capabilities (offer_capabilities) with what routing reads of them as plain values,
    read from the message once rather than at every decision."""

    capabilities: renderer_pb2.Capabilities
    model: str
    resolution: str
    price_per_second_micros: int
    nominal_quality: float
    # Whether the offer limits the prompt's length or the image's size: then a shot's lengths matter.
    sized: bool = False
    # How each shape of shot fits the offer (shots repeat their shapes).
    _fits: dict[tuple, "ShotFit"] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, capabilities: renderer_pb2.Capabilities) -> "Offered":
        """capabilities: one offer's (a backend's own when it has one offer)."""
        return cls(
            capabilities,
            capabilities.models[0] if capabilities.models else "",
            capabilities.resolutions[0] if capabilities.resolutions else DEFAULT_RESOLUTION,
            capabilities.price_per_second.amount_micros,
            capabilities.nominal_quality,
            bool(capabilities.max_prompt_characters or capabilities.max_image_bytes),
        )

    def fit(self, shot: render_pb2.Shot, shape: ShotShape | None = None) -> "ShotFit":
        """What the offer makes of the shot, worked out once per shape of shot (shape: the shot's, when
        the caller has it already)."""
        if shape is None:
            shape = ShotShape.of(shot)
        key = shape.sized if self.sized else shape.unsized
        fit = self._fits.get(key)
        if fit is None:
            if len(self._fits) >= SHAPES_KEPT:
                self._fits.clear()
            fit = self._fits[key] = ShotFit(
                tuple(shot_mismatches(shot, self.capabilities)),
                round(self.price_per_second_micros * shape.unsized[0]),
            )
        return fit


class ShotFit(NamedTuple):
    """A shot at one offer."""

    # What the offer cannot do of it, as (field, reason): shot_mismatches.
    mismatches: tuple[tuple[str, str], ...]
    # Its list price: the offer's price per second times the shot's duration.
    list_cost_micros: int


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
    has_first_frame = bool(shot.first_frame.data or shot.first_frame.uri)
    if has_first_frame and not capabilities.image_input:
        mismatches.append(("first_frame", "does not take a first frame"))
    if not has_first_frame and capabilities.requires_first_frame:
        mismatches.append(("first_frame", "renders only from a first frame (image-to-video)"))
    resolutions = capabilities.resolutions or [DEFAULT_RESOLUTION]
    if shot.resolution and shot.resolution not in resolutions:
        mismatches.append(("resolution", f"renders {', '.join(resolutions)}, not {shot.resolution}"))
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
