"""A render request as the command line gives it: the options `aiprod render` and `aiprod quote` share,
how each is read, and the spec they make (`build_spec`)."""

from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf import timestamp_pb2

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod_kit.capabilities import MAX_INLINE_IMAGE_BYTES
from aiprod_kit.money import usd_from_units

PromptArgument = Annotated[str, typer.Argument(help="What the video shows.")]
PresetOption = Annotated[
    str | None, typer.Option(metavar="NAME", help="Preset (default: the gateway's, quick_social).")
]
DurationOption = Annotated[
    float | None, typer.Option(metavar="SECONDS", min=0, help="Length (default: the preset's).")
]
MaxCostOption = Annotated[
    float | None,
    typer.Option(
        metavar="USD",
        min=0,
        help="The most the job may cost, in USD (default: the preset's price limit for its duration).",
    ),
]


QualityFloorOption = Annotated[
    float | None,
    typer.Option(
        metavar="SCORE",
        min=0,
        max=1,
        help="The lowest QC score (0 to 1) a video may have; the preset's floor when that is stricter.",
    ),
]


def deadline_from(value: str) -> timestamp_pb2.Timestamp:
    """An RFC 3339 time with its zone. Not a span from now: the same command must make the same request,
    for --request-id to find the job again and --quote-id to hold."""
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not an RFC 3339 time such as 2026-12-06T18:30:00Z (`date -u -d +30min +%FT%TZ`)"
        ) from None
    if moment.tzinfo is None:
        raise typer.BadParameter(f"{value!r} has no time zone: end it with Z or an offset such as +01:00")
    if moment <= datetime.now(UTC):
        raise typer.BadParameter(f"{value} is already past")
    deadline = timestamp_pb2.Timestamp()
    deadline.FromDatetime(moment.astimezone(UTC))
    return deadline


DeadlineOption = Annotated[
    timestamp_pb2.Timestamp | None,
    typer.Option(
        metavar="TIME",
        parser=deadline_from,
        help="When the video must be ready by, an RFC 3339 time such as 2026-12-06T18:30:00Z: the router "
        "prefers backends whose observed latency meets it.",
    ),
]
SeedOption = Annotated[
    int | None,
    typer.Option(
        metavar="N",
        min=1,
        max=2**64 - 1,
        help="Seed for a repeatable render (default: one derived from the prompt).",
    ),
]


def shot_from(value: str) -> render_pb2.Shot:
    """A shot given as SECONDS:PROMPT ("4:A heron takes off")."""
    seconds, separator, prompt = value.partition(":")
    try:
        duration = float(seconds)
    except ValueError:
        duration = 0.0
    if not separator or not prompt.strip() or not 0 < duration < float("inf"):
        raise typer.BadParameter(f"{value!r} is not SECONDS:PROMPT, such as '4:A heron takes off'")
    return render_pb2.Shot(prompt=prompt.strip(), duration_seconds=duration)


ShotOption = Annotated[
    list[render_pb2.Shot] | None,
    typer.Option(
        "--shot",
        metavar="SECONDS:PROMPT",
        parser=shot_from,
        help="One shot of the video, in playing order; repeat for each (the durations add up to --duration, "
        "or give it). Default: the gateway plans the shots.",
    ),
]
ContinuousOption = Annotated[
    bool,
    typer.Option(
        "--continuous",
        help="With --shot: each shot after the first starts from the last frame of the one before it, for "
        "cuts without a jump (it then renders after that one).",
    ),
]


def image_from(value: str) -> render_pb2.Image:
    """An image named on the command line: a URI is passed on for the gateway to check and the renderer
    to fetch; anything else is a local file, sent inline (the gateway reads its type from its bytes)."""
    if "://" in value:
        return render_pb2.Image(uri=value)
    path = Path(value).expanduser()
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise typer.BadParameter(f"{value} is not a file")
        if size > MAX_INLINE_IMAGE_BYTES:
            raise typer.BadParameter(
                f"{value} is {size} bytes; an image sent inline may be at most {MAX_INLINE_IMAGE_BYTES}: "
                "give a gs:// or https:// URI of it instead"
            )
        return render_pb2.Image(data=path.read_bytes())
    except OSError as error:
        raise typer.BadParameter(f"cannot read {value}: {error.strerror}") from None


_IMAGE_HELP = (
    "a PNG, JPEG or WebP file (sent inline), or a gs:// or https:// URI the gateway takes images from"
)
FirstFrameOption = Annotated[
    render_pb2.Image | None,
    typer.Option(
        "--first-frame",
        metavar="IMAGE",
        parser=image_from,
        help=f"Start the video from this image (image-to-video): {_IMAGE_HELP}.",
    ),
]
ReferenceImageOption = Annotated[
    list[render_pb2.Image] | None,
    typer.Option(
        "--reference-image",
        metavar="IMAGE",
        parser=image_from,
        help="An image every shot keeps to (a character, a product, a style), for the backends that take "
        f"them; repeat for up to three: {_IMAGE_HELP}.",
    ),
]


class AspectRatio(StrEnum):
    LANDSCAPE = "16:9"
    PORTRAIT = "9:16"
    SQUARE = "1:1"

    def to_proto(self) -> render_pb2.AspectRatio:
        return render_pb2.AspectRatio.Value("ASPECT_RATIO_" + self.value.replace(":", "_"))


class Backend(StrEnum):
    LOCAL = "local"
    RUNWAY = "runway"
    VEO = "veo"
    REPLICATE = "replicate"

    def to_proto(self) -> backend_pb2.Backend:
        return backend_pb2.Backend.Value("BACKEND_" + self.name)


class Resolution(StrEnum):
    HD = "720p"
    FULL_HD = "1080p"


AspectRatioOption = Annotated[AspectRatio | None, typer.Option(help="Frame shape (default 16:9).")]
ResolutionOption = Annotated[
    Resolution | None,
    typer.Option(help="Resolution (default: the router's choice among the backends' offers)."),
]
BackendOption = Annotated[
    Backend | None, typer.Option(help="Preferred backend (default: the router's choice).")
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help="With --backend: the model to use there when it qualifies, such as gen4_turbo (`aiprod "
        "backends` lists each backend's models).",
    ),
]


def build_spec(
    prompt: str,
    *,
    preset: str | None = None,
    duration: float | None = None,
    aspect_ratio: AspectRatio | None = None,
    backend: Backend | None = None,
    model: str | None = None,
    max_cost: float | None = None,
    resolution: Resolution | None = None,
    first_frame: render_pb2.Image | None = None,
    reference_images: list[render_pb2.Image] | None = None,
    quality_floor: float | None = None,
    deadline: timestamp_pb2.Timestamp | None = None,
    seed: int | None = None,
    shots: list[render_pb2.Shot] | None = None,
    continuous: bool = False,
) -> render_pb2.RenderSpec:
    """Leaves unset what was not given, so that the gateway applies the preset's defaults.

    The same options make the same spec, byte for byte: a quote binds only the spec it priced.
    With shots, the first frame is the first shot's (the gateway keeps a caller's shots as given).
    """
    if model and not backend:
        raise typer.BadParameter("it needs the backend that has the model (--backend)", param_hint="--model")
    if continuous and not shots:
        raise typer.BadParameter("it needs the shots given with --shot", param_hint="--continuous")
    shots = [
        render_pb2.Shot(prompt=shot.prompt, duration_seconds=shot.duration_seconds) for shot in shots or []
    ]
    for shot in shots[1:]:
        shot.continuous = continuous
    if shots and first_frame is not None:
        shots[0].first_frame.CopyFrom(first_frame)
        first_frame = None
    constraints = None
    if backend or max_cost is not None or quality_floor or deadline is not None:
        constraints = render_pb2.RenderConstraints(
            preferred_backend=backend.to_proto() if backend else backend_pb2.BACKEND_UNSPECIFIED,
            preferred_model=model or "",
            max_cost=usd_from_units(max_cost) if max_cost is not None else None,
            quality_floor=quality_floor or 0.0,
            deadline=deadline,
        )
    return render_pb2.RenderSpec(
        prompt=prompt,
        preset=preset or "",
        duration_seconds=duration or 0.0,
        aspect_ratio=aspect_ratio.to_proto() if aspect_ratio else render_pb2.ASPECT_RATIO_UNSPECIFIED,
        constraints=constraints,
        resolution=resolution.value if resolution else "",
        first_frame=first_frame,
        reference_images=reference_images or [],
        seed=seed or 0,
        shots=shots,
    )
