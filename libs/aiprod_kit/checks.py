"""Checks of a caller's fields that every service shares, each returning the violations it finds as
(field, reason), for `aiprod_kit.errors.InvalidArgument`; an empty list means the field is fine.

Handlers run them before anything else, so that input no build should see (a NaN or infinite number,
an enum value this build does not know, a Timestamp or Duration outside protobuf's range, a string of
a hundred thousand characters) is INVALID_ARGUMENT naming its field, with nothing changed, instead of
an exception deep inside (INTERNAL) or a status too large for gRPC to send (RESOURCE_EXHAUSTED).

A reason quotes a caller's text only through `echo`, which cuts it to a short prefix.
"""

import math

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from aiprod.common.v1 import render_pb2
from aiprod_kit.capabilities import FRAME_SIZES, MAX_INLINE_IMAGE_BYTES

Violation = tuple[str, str]

# How much of a caller's text an error quotes.
ECHO_CHARACTERS = 64
# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
MIN_TIMESTAMP_SECONDS, MAX_TIMESTAMP_SECONDS = -62_135_596_800, 253_402_300_799
# google.protobuf.Duration's range: about 10,000 years either way.
MAX_DURATION_SECONDS = 315_576_000_000
NANOS_PER_SECOND = 1_000_000_000
# A shot's prompt: no provider takes more than 4,000 characters (Veo); the bound is for the mesh's own
# sake (logs, key records, errors), each backend's own limit being a mismatch the router ranks around.
MAX_PROMPT_CHARACTERS = 10_000
# A shot's length: far more than any backend renders in one call (the local renderer's 60 s), yet
# small enough that the costs and latencies computed from it stay in int64 and Duration range.
MAX_SHOT_SECONDS = 3600.0
# A provider's task id: the longest one made (a Vertex operation name, projects/.../operations/UUID, under
# 200 characters), with room.
MAX_TASK_ID_CHARACTERS = 256
# An image's media type (RFC 6838: type and subtype of at most 127 characters each) and URI.
MAX_MIME_TYPE_CHARACTERS = 255
MAX_IMAGE_URI_CHARACTERS = 2048


def echo(value: str, limit: int = ECHO_CHARACTERS) -> str:
    """A caller's text as an error may quote it: quoted, cut to its first `limit` characters."""
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


def finite_number(
    value: float, field: str, low: float = -math.inf, high: float = math.inf
) -> list[Violation]:
    """A finite number between low and high, both included."""
    if math.isfinite(value) and low <= value <= high:
        return []
    return [(field, f"must be a finite number{_range(low, high)}, not {value:g}")]


def _range(low: float, high: float) -> str:
    """How a reason says the range [low, high] (either end infinite: open that way)."""
    if low > -math.inf and high < math.inf:
        return f" between {low:g} and {high:g}"
    if low > -math.inf:
        return f" of at least {low:g}"
    if high < math.inf:
        return f" of at most {high:g}"
    return ""


def known_enum(
    value: int, enum: EnumTypeWrapper, field: str, *, allow_unspecified: bool = True
) -> list[Violation]:
    """A value the enum's descriptor knows (a newer peer's, or a made-up one, is not); with
    allow_unspecified=False, not its zero value either."""
    descriptor = enum.DESCRIPTOR
    if value not in descriptor.values_by_number:
        return [(field, f"unknown {descriptor.name} value {value}")]
    if value == 0 and not allow_unspecified:
        return [
            (field, f"must be set (a {descriptor.name} other than {descriptor.values_by_number[0].name})")
        ]
    return []


def valid_timestamp(stamp: timestamp_pb2.Timestamp, field: str) -> list[Violation]:
    """A Timestamp protobuf allows: from the year 1 to 9999, nanos within a second."""
    if not MIN_TIMESTAMP_SECONDS <= stamp.seconds <= MAX_TIMESTAMP_SECONDS:
        return [(field, "must be a time between the years 1 and 9999 (RFC 3339)")]
    if not 0 <= stamp.nanos < NANOS_PER_SECOND:
        return [(field, f"nanos must be 0 to {NANOS_PER_SECOND - 1}, not {stamp.nanos}")]
    return []


def valid_duration(
    duration: duration_pb2.Duration,
    field: str,
    low_seconds: float = -math.inf,
    high_seconds: float = math.inf,
) -> list[Violation]:
    """A Duration protobuf allows (about 10,000 years either way, nanos within a second and of the
    seconds' sign), between low_seconds and high_seconds."""
    seconds, nanos = duration.seconds, duration.nanos
    if not -MAX_DURATION_SECONDS <= seconds <= MAX_DURATION_SECONDS:
        return [(field, f"seconds must be within ±{MAX_DURATION_SECONDS}")]
    if not -NANOS_PER_SECOND < nanos < NANOS_PER_SECOND or (seconds > 0 > nanos) or (seconds < 0 < nanos):
        return [(field, "nanos must be within a second and of the seconds' sign")]
    total = seconds + nanos / NANOS_PER_SECOND
    if not low_seconds <= total <= high_seconds:
        return [(field, f"must be a number of seconds{_range(low_seconds, high_seconds)}, not {total:g}")]
    return []


def bounded_string(value: str, field: str, max_characters: int, *, required: bool = False) -> list[Violation]:
    """A string of at most max_characters (and, when required, not empty nor blank)."""
    if len(value) > max_characters:
        return [(field, f"must be at most {max_characters} characters, not {len(value)}")]
    if required and not value.strip():
        return [(field, "must not be empty")]
    return []


def image_violations(image: render_pb2.Image, field: str, *, required: bool = False) -> list[Violation]:
    """An image's shape: its data or its URI, not both (neither: no image, unless required), each
    within bounds, and a media type of a sensible length."""
    violations = []
    if image.data and image.uri:
        violations.append((field, "give data or uri, not both"))
    elif required and not (image.data or image.uri):
        violations.append((field, "give data or uri"))
    if len(image.data) > MAX_INLINE_IMAGE_BYTES:
        violations.append(
            (f"{field}.data", f"must be at most {MAX_INLINE_IMAGE_BYTES} bytes, not {len(image.data)}")
        )
    violations += bounded_string(image.uri, f"{field}.uri", MAX_IMAGE_URI_CHARACTERS)
    violations += bounded_string(image.mime_type, f"{field}.mime_type", MAX_MIME_TYPE_CHARACTERS)
    return violations


def shot_violations(shot: render_pb2.Shot, field: str = "shot") -> list[Violation]:
    """What makes a Shot one no backend should be asked to render, whatever it can do (what one backend
    cannot do is `aiprod_kit.capabilities.shot_mismatches`): an empty or overlong prompt, a duration
    that is not a positive finite number of seconds, an unknown aspect ratio, a misshapen image."""
    violations = bounded_string(shot.prompt, f"{field}.prompt", MAX_PROMPT_CHARACTERS, required=True)
    duration = shot.duration_seconds
    if not (math.isfinite(duration) and 0 < duration <= MAX_SHOT_SECONDS):
        violations.append(
            (
                f"{field}.duration_seconds",
                f"must be a number of seconds above 0 and at most {MAX_SHOT_SECONDS:g}, not {duration:g}",
            )
        )
    violations += known_enum(shot.aspect_ratio, render_pb2.AspectRatio, f"{field}.aspect_ratio")
    violations += resolution_violations(shot.resolution, f"{field}.resolution")
    violations += image_violations(shot.first_frame, f"{field}.first_frame")
    for index, image in enumerate(shot.reference_images):
        violations += image_violations(image, f"{field}.reference_images[{index}]", required=True)
    return violations


def resolution_violations(resolution: str, field: str) -> list[Violation]:
    """A resolution as a caller names it: empty (any) or one of the frame sizes the mesh knows."""
    if resolution and resolution not in FRAME_SIZES:
        return [(field, f"unknown resolution {echo(resolution)}; known: {', '.join(FRAME_SIZES)}")]
    return []


def task_id_violations(task_id: str, field: str = "task_id") -> list[Violation]:
    """A provider's task id as a caller names it: not empty, at most MAX_TASK_ID_CHARACTERS."""
    if not task_id:
        return [(field, "must not be empty")]
    return bounded_string(task_id, field, MAX_TASK_ID_CHARACTERS)
