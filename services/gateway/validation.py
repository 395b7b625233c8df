"""Checks of the gateway's requests. Every problem is reported at once, each naming its field.

A first frame or a reference image comes from an untrusted caller and is read by a renderer with the
mesh's own network and credentials, so its URI is held to what the operator allows (a spec takes at
most MAX_REFERENCE_IMAGES reference images, and so does each of its shots):

- inline (`data`): at most MAX_FIRST_FRAME_BYTES, and a PNG, JPEG or WebP image of its declared media
  type and of a size a renderer can decode, checked without decoding it (`aiprod_gateway.images`);
- `gs://BUCKET/OBJECT`: only in the buckets of AIPROD_GATEWAY_IMAGE_BUCKETS (none by default);
- `https://HOST/...`: no user name or password, and HOST, a name or an address, must be a public
  (globally routable) address: never loopback, private, link-local, multicast or reserved. The gateway
  does not fetch the image; whoever fetches it reads at most MAX_FIRST_FRAME_BYTES and follows no
  redirect to an address these rules refuse;
- `file://`: only when AIPROD_GATEWAY_ALLOW_FILE_IMAGES is set (local development).

Errors quote at most a short prefix of what the caller sent.
"""

import asyncio
import base64
import functools
import hashlib
import ipaddress
import math
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from google.protobuf import timestamp_pb2

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_gateway import images as inline_images
from aiprod_kit.capabilities import MAX_INLINE_IMAGE_BYTES
from aiprod_kit.checks import resolution_violations
from aiprod_kit.errors import ErrorReason, InvalidArgument, Unavailable
from aiprod_kit.presets import DEFAULT_PRESET, PRESETS, Preset
from aiprod_kit.settings import GatewaySettings

MAX_PROMPT_CHARS = 2000
# The most shots a plan holds: 180 s in the shortest clips a provider makes, with room.
MAX_SHOTS = 90
# A provider's model name, as a caller may prefer one (Replicate's owner/name are the longest).
MAX_MODEL_CHARACTERS = 128
# Two durations this close are one (float sums of shot lengths).
_SAME_DURATION_SECONDS = 1e-3
MAX_FIRST_FRAME_BYTES = MAX_INLINE_IMAGE_BYTES
# The most reference images a spec or a shot holds: what the backend that takes the most (Veo 3.1) takes.
MAX_REFERENCE_IMAGES = 3
# Longer URIs are refused outright: no provider takes more, and a bound keeps errors and logs short.
MAX_IMAGE_URI_CHARS = 2048
# How much of a caller's value an error quotes.
_ECHO_CHARS = 64
# How long resolving a first frame's host may take before the request is answered UNAVAILABLE.
_RESOLVE_TIMEOUT_SECONDS = 5.0
# A DNS host name: letters, digits and dashes in dot-separated labels, the last one (the top-level
# domain) not all digits, so that numeric forms such as "2130706433" or "0x7f.1", which resolvers
# read as IPv4 addresses, never pass as names.
_HOST_NAME = re.compile(
    r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z]([a-z0-9-]{0,61}[a-z0-9])?"
)
_IMAGE_URI_FIELD = "spec.first_frame.uri"
# Resolves (host, port) to addresses; the event loop's getaddrinfo unless a test gives another.
Resolver = Callable[[str, int], Awaitable[list[str]]]
MAX_PAGE_SIZE = 1000
# The range of google.protobuf.Timestamp: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_TIMESTAMP_SECONDS, _MAX_TIMESTAMP_SECONDS = -62_135_596_800, 253_402_300_799
# The largest position a page token may name: a signed 64-bit integer, as the job stores keep it.
_MAX_CURSOR = 2**63 - 1
DEFAULT_PAGE_SIZE = 50
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_JOB_ID = re.compile(r"job_[0-9a-f]{32}")
_PAGE_TOKEN_PREFIX = "v1:"


@dataclass(frozen=True)
class ImagePolicy:
    """Where first frames and reference images may come from: the operator's choice (GatewaySettings)."""

    buckets: frozenset[str] = frozenset()
    allow_files: bool = False

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> "ImagePolicy":
        return cls(settings.image_buckets, settings.gateway_allow_file_images)


@functools.cache
def _configured_policy() -> ImagePolicy:
    # The gateway process's own settings, read once (as its __main__ does at start-up).
    return ImagePolicy.from_settings(GatewaySettings())


def _valid_timestamp(value: timestamp_pb2.Timestamp) -> bool:
    """Whether a Timestamp is one protobuf allows (0001-01-01 to 9999-12-31, nanos in a second)."""
    return (
        _MIN_TIMESTAMP_SECONDS <= value.seconds <= _MAX_TIMESTAMP_SECONDS and 0 <= value.nanos < 1_000_000_000
    )


def _echo(value: str) -> str:
    """A caller's value, quoted, cut to a short prefix."""
    return repr(value[:_ECHO_CHARS]) + ("..." if len(value) > _ECHO_CHARS else "")


def normalized_spec(
    spec: render_pb2.RenderSpec, images: ImagePolicy | None = None
) -> tuple[render_pb2.RenderSpec, Preset]:
    """The spec with its preset's defaults applied; INVALID_ARGUMENT naming every bad field.

    Checks everything but what takes I/O: `checked_spec` also resolves a first frame's host name.
    """
    violations: list[tuple[str, str]] = []
    prompt = spec.prompt.strip()
    if not prompt:
        violations.append(("spec.prompt", "must not be empty"))
    elif len(spec.prompt) > MAX_PROMPT_CHARS:
        violations.append(
            ("spec.prompt", f"must be at most {MAX_PROMPT_CHARS} characters, not {len(spec.prompt)}")
        )
    preset_name = spec.preset or DEFAULT_PRESET
    preset = PRESETS.get(preset_name)
    if preset is None:
        violations.append(
            ("spec.preset", f"unknown preset {_echo(preset_name)}; known: {', '.join(PRESETS)}")
        )
    if spec.shots:
        violations += shot_violations(
            spec.shots, "spec.shots", preset.max_duration_seconds if preset else math.inf, images
        )
        total = shots_duration(spec.shots)
        if spec.duration_seconds and abs(total - spec.duration_seconds) > _SAME_DURATION_SECONDS:
            violations.append(
                (
                    "spec.shots",
                    f"must add up to spec.duration_seconds ({spec.duration_seconds:g} s), not {total:g} s",
                )
            )
    duration = (
        spec.duration_seconds
        or shots_duration(spec.shots)
        or (preset.default_duration_seconds if preset else 0)
    )
    if not math.isfinite(duration) or duration < 0:
        violations.append(
            ("spec.duration_seconds", f"must be a positive number of seconds, not {spec.duration_seconds:g}")
        )
    elif preset and duration > preset.max_duration_seconds:
        violations.append(
            (
                "spec.duration_seconds",
                f"must be at most {preset.max_duration_seconds:g} s for preset {preset.name}, "
                f"not {spec.duration_seconds:g}",
            )
        )
    if spec.aspect_ratio not in render_pb2.AspectRatio.values():
        violations.append(("spec.aspect_ratio", f"unknown aspect ratio {spec.aspect_ratio}"))
    violations += resolution_violations(spec.resolution, "spec.resolution")
    violations += image_violations(spec.first_frame, "spec.first_frame", images)
    violations += reference_image_violations(spec.reference_images, "spec.reference_images", images)
    constraints = spec.constraints
    if not 0 <= constraints.quality_floor <= 1:
        violations.append(("spec.constraints.quality_floor", "must be between 0 and 1"))
    if constraints.preferred_backend not in backend_pb2.Backend.values():
        violations.append(
            ("spec.constraints.preferred_backend", f"unknown backend {constraints.preferred_backend}")
        )
    if len(constraints.preferred_model) > MAX_MODEL_CHARACTERS:
        violations.append(
            ("spec.constraints.preferred_model", f"must be at most {MAX_MODEL_CHARACTERS} characters")
        )
    if constraints.max_cost.amount_micros < 0:
        violations.append(("spec.constraints.max_cost", "must not be negative"))
    if constraints.HasField("deadline") and not _valid_timestamp(constraints.deadline):
        violations.append(
            ("spec.constraints.deadline", "must be a time between the years 1 and 9999 (RFC 3339)")
        )
    if violations:
        raise InvalidArgument(violations)
    assert preset is not None
    normalized = render_pb2.RenderSpec()
    normalized.CopyFrom(spec)
    normalized.preset = preset.name
    normalized.duration_seconds = duration
    normalized.aspect_ratio = spec.aspect_ratio or render_pb2.ASPECT_RATIO_16_9
    normalized.constraints.quality_floor = max(constraints.quality_floor, preset.quality_floor)
    # Inline images carry the media type their bytes hold. Only this copy changes: a request is
    # fingerprinted as sent.
    for image in _images_of(normalized):
        inline_images.normalize_mime_type(image)
    if not spec.seed:
        # Deterministic: the same prompt renders the same video unless the caller picks a seed.
        normalized.seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:6], "big")
    return normalized, preset


def _images_of(spec: render_pb2.RenderSpec) -> list[render_pb2.Image]:
    """The spec's first frame and reference images, and its shots'."""
    images = [spec.first_frame, *spec.reference_images]
    for shot in spec.shots:
        images += [shot.first_frame, *shot.reference_images]
    return images


async def checked_spec(
    spec: render_pb2.RenderSpec, images: ImagePolicy | None = None, resolve: Resolver | None = None
) -> tuple[render_pb2.RenderSpec, Preset]:
    """normalized_spec, and a first frame's https:// host resolved to public addresses only."""
    normalized, preset = normalized_spec(spec, images)
    await check_image_host(normalized.first_frame.uri, _IMAGE_URI_FIELD, resolve)
    await _check_reference_hosts(normalized.reference_images, "spec.reference_images", resolve)
    await check_shot_hosts(normalized.shots, "spec.shots", resolve)
    return normalized, preset


def shot_violations(
    shots: Sequence[render_pb2.Shot],
    field: str,
    max_duration_seconds: float,
    images: ImagePolicy | None = None,
) -> list[tuple[str, str]]:
    """What is wrong with a list of shots (a request's own, or a plan edited in review) without I/O, as
    (field, reason) naming `field[i]`: each shot's prompt, duration, aspect ratio, first frame and
    reference images (held to the rules of a spec's), their count, and their total at most the preset's
    longest video."""
    violations: list[tuple[str, str]] = []
    if len(shots) > MAX_SHOTS:
        violations.append((field, f"must hold at most {MAX_SHOTS} shots, not {len(shots)}"))
    for index, shot in enumerate(shots[:MAX_SHOTS]):
        name = f"{field}[{index}]"
        if not shot.prompt.strip() or len(shot.prompt) > MAX_PROMPT_CHARS:
            violations.append((f"{name}.prompt", f"must hold 1 to {MAX_PROMPT_CHARS} characters"))
        if not (math.isfinite(shot.duration_seconds) and shot.duration_seconds > 0):
            violations.append((f"{name}.duration_seconds", "must be a positive number of seconds"))
        if shot.aspect_ratio not in render_pb2.AspectRatio.values():
            violations.append((f"{name}.aspect_ratio", f"unknown aspect ratio {shot.aspect_ratio}"))
        violations += resolution_violations(shot.resolution, f"{name}.resolution")
        violations += image_violations(shot.first_frame, f"{name}.first_frame", images)
        violations += reference_image_violations(shot.reference_images, f"{name}.reference_images", images)
    total = shots_duration(shots)
    if total > max_duration_seconds + _SAME_DURATION_SECONDS:
        violations.append((field, f"must last at most {max_duration_seconds:g} s in all, not {total:g} s"))
    return violations


def shots_duration(shots: Sequence[render_pb2.Shot]) -> float:
    """The shots' total length, counting only valid durations."""
    return sum(
        shot.duration_seconds
        for shot in shots
        if math.isfinite(shot.duration_seconds) and shot.duration_seconds > 0
    )


async def check_shot_hosts(
    shots: Sequence[render_pb2.Shot], field: str, resolve: Resolver | None = None
) -> None:
    """Each shot's first-frame and reference-image https:// hosts resolved to public addresses only."""
    for index, shot in enumerate(shots):
        await check_image_host(shot.first_frame.uri, f"{field}[{index}].first_frame.uri", resolve)
        await _check_reference_hosts(shot.reference_images, f"{field}[{index}].reference_images", resolve)


async def _check_reference_hosts(
    images: Sequence[render_pb2.Image], field: str, resolve: Resolver | None = None
) -> None:
    for index, image in enumerate(images):
        await check_image_host(image.uri, f"{field}[{index}].uri", resolve)


def image_violations(
    image: render_pb2.Image, field: str, images: ImagePolicy | None = None, what: str = "first frames"
) -> list[tuple[str, str]]:
    """What is wrong with a caller's image (`what` it is, in plural) without I/O, as (field, reason):
    data or uri, not both; inline data at most MAX_FIRST_FRAME_BYTES and an image
    (`aiprod_gateway.images`); a URI the operator allows."""
    violations: list[tuple[str, str]] = []
    if image.data and image.uri:
        violations.append((field, "give data or uri, not both"))
    if len(image.data) > MAX_FIRST_FRAME_BYTES:
        violations.append(
            (f"{field}.data", f"must be at most {MAX_FIRST_FRAME_BYTES} bytes, not {len(image.data)}")
        )
    else:
        violations += inline_images.image_violations(image, field)
    if image.uri:
        violations += image_uri_violations(image.uri, images or _configured_policy(), f"{field}.uri", what)
    return violations


def reference_image_violations(
    references: Sequence[render_pb2.Image], field: str, images: ImagePolicy | None = None
) -> list[tuple[str, str]]:
    """What is wrong with a spec's or a shot's reference images without I/O, as (field, reason) naming
    `field[i]`: at most MAX_REFERENCE_IMAGES, each an image (data or uri) held to a first frame's rules."""
    violations: list[tuple[str, str]] = []
    if len(references) > MAX_REFERENCE_IMAGES:
        violations.append((field, f"must hold at most {MAX_REFERENCE_IMAGES} images, not {len(references)}"))
    for index, image in enumerate(references):
        name = f"{field}[{index}]"
        if not image.data and not image.uri:
            violations.append((name, "give data or uri"))
        violations += image_violations(image, name, images, "reference images")
    return violations


def image_uri_violations(
    uri: str, images: ImagePolicy, field: str, what: str = "first frames"
) -> list[tuple[str, str]]:
    """What is wrong with an image's URI (`what` the image is, in plural) without resolving it, as
    (field, reason)."""
    if len(uri) > MAX_IMAGE_URI_CHARS:
        return [(field, f"must be at most {MAX_IMAGE_URI_CHARS} characters, not {len(uri)}")]
    # Only printable ASCII: parsers disagree on spaces, controls and Unicode look-alikes, and a
    # disagreement between this check and the fetcher is how such checks are bypassed.
    if not uri.isascii() or not uri.isprintable() or " " in uri:
        return [(field, "must be printable ASCII without spaces (percent-encode other characters)")]
    try:
        parts = urlsplit(uri)
        _ = parts.port  # a bad port raises ValueError only when read
    except ValueError:
        return [(field, f"is not a valid URI: {_echo(uri)}")]
    if parts.scheme == "gs":
        return [(field, why) for why in _gs_problems(parts, images, what)]
    if parts.scheme == "https":
        return [(field, why) for why in _https_problems(parts)]
    if parts.scheme == "file":
        if not images.allow_files:
            return [(field, f"file:// {what} are not accepted here; send the image inline or by https://")]
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            return [(field, "must be file:///ABSOLUTE/PATH, on the renderer's own disk")]
        return []
    if parts.scheme == "http":
        return [(field, "must use https://, not http://")]
    return [(field, f"must be a gs://, https:// or file:// URI, not {_echo(uri)}")]


def _gs_problems(parts: SplitResult, images: ImagePolicy, what: str) -> list[str]:
    bucket = parts.netloc
    if not bucket or parts.path in ("", "/"):
        return ["must be gs://BUCKET/OBJECT"]
    if bucket not in images.buckets:
        if not images.buckets:
            return [f"gs:// {what} are not accepted here; send the image inline or by https://"]
        allowed = ", ".join(sorted(images.buckets)[:10])
        return [f"bucket {_echo(bucket)} is not one this gateway takes {what} from ({allowed})"]
    return []


def _https_problems(parts: SplitResult) -> list[str]:
    # Credentials in a URL end up in logs and provider requests; "user@host" also hides the real host
    # from a reader.
    if "@" in parts.netloc:
        return ["must not carry a user name or password"]
    host = (parts.hostname or "").rstrip(".")
    if not host:
        return ["must name a host: https://HOST/PATH"]
    address = _ip_literal(host)
    if address is not None:
        refused = _refused_address(address)
        return (
            [f"host {_echo(host)} is a {refused} address; only public addresses are fetched"]
            if refused
            else []
        )
    if not _HOST_NAME.fullmatch(host):
        return [f"host {_echo(host)} is neither a DNS name nor an IP address"]
    # RFC 6761: these always mean this machine, whatever a resolver says.
    if host == "localhost" or host.endswith(".localhost"):
        return [f"host {_echo(host)} is this machine; only public addresses are fetched"]
    return []


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone ("%eth0") is link-local anyway
    except ValueError:
        return None


def _refused_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why the address is not public (loopback, private, ...); None for a globally routable one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
    for kind, test in (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if test:
            return kind
    if not address.is_global:
        return "non-public"  # shared (carrier-grade NAT) space and the like
    return None


async def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def check_image_host(uri: str, field: str, resolve: Resolver | None = None) -> None:
    """For an https:// URI that passed image_uri_violations: INVALID_ARGUMENT when its host name
    resolves to any address that is not public (a name pointing at 10.0.0.1 or 127.0.0.1 is refused
    as the address itself would be); UNAVAILABLE when it cannot be resolved now."""
    if not uri.startswith("https://"):
        return
    parts = urlsplit(uri)
    host = (parts.hostname or "").rstrip(".")
    if not host or _ip_literal(host) is not None:
        return  # checked without I/O
    try:
        addresses = await asyncio.wait_for(
            (resolve or _getaddrinfo)(host, parts.port or 443), _RESOLVE_TIMEOUT_SECONDS
        )
    except socket.gaierror as error:
        if error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise InvalidArgument([(field, f"host {host} does not resolve")]) from error
        raise _unresolvable(field, host) from error
    except TimeoutError as error:
        raise _unresolvable(field, host) from error
    for address in addresses:
        refused = _refused_address(ipaddress.ip_address(address.split("%", 1)[0]))
        if refused:
            raise InvalidArgument(
                [(field, f"host {host} resolves to a {refused} address; only public addresses are fetched")]
            )
    if not addresses:
        raise InvalidArgument([(field, f"host {host} does not resolve")])


def _unresolvable(field: str, host: str) -> Unavailable:
    return Unavailable(
        f"the host of {field} cannot be resolved now; try again",
        reason=ErrorReason.HOST_UNRESOLVABLE,
        metadata={"field": field, "host": host},
    )


def plan_of(spec: render_pb2.RenderSpec) -> render_pb2.RenderPlan:
    """The default plan: one shot with the whole spec (its first frame too; the spec's reference images
    are given to every shot without its own as it is rendered, not copied into the plan)."""
    shot = render_pb2.Shot(
        prompt=spec.prompt.strip(),
        duration_seconds=spec.duration_seconds,
        aspect_ratio=spec.aspect_ratio,
        seed=spec.seed,
        resolution=spec.resolution,
    )
    if spec.first_frame.data or spec.first_frame.uri:
        shot.first_frame.CopyFrom(spec.first_frame)
    return render_pb2.RenderPlan(shots=[shot])


def request_id(value: str) -> str:
    if value and not _REQUEST_ID.fullmatch(value):
        raise InvalidArgument([("request_id", "must be 1 to 64 characters from A-Z, a-z, 0-9 and . _ : -")])
    return value


def job_id(value: str) -> str:
    if not _JOB_ID.fullmatch(value):
        raise InvalidArgument([("job_id", "must be a job id such as job_0123456789abcdef0123456789abcdef")])
    return value


def fingerprint(spec: render_pb2.RenderSpec) -> str:
    """Identifies a request, to tell a retry from a different request under the same request_id."""
    return hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()


def request_fingerprint(request: gateway_pb2.CreateRenderJobRequest) -> str:
    """Identifies a CreateRenderJob request but for its request_id (its spec, review flag and quote), to
    tell a retry from a different request under the same request_id."""
    if not request.review and not request.quote_id:
        return fingerprint(request.spec)  # as jobs stored before either existed were fingerprinted
    same = gateway_pb2.CreateRenderJobRequest(
        spec=request.spec, review=request.review, quote_id=request.quote_id
    )
    return hashlib.sha256(same.SerializeToString(deterministic=True)).hexdigest()


def list_query(request: gateway_pb2.ListRenderJobsRequest) -> tuple[list[int], int, int | None]:
    """(states, page size, cursor) of a list request."""
    violations = []
    if not 0 <= request.page_size <= MAX_PAGE_SIZE:
        violations.append(("page_size", f"must be between 0 and {MAX_PAGE_SIZE}, not {request.page_size}"))
    states = sorted(set(request.states))
    if any(
        state not in job_pb2.JobState.values() or state == job_pb2.JOB_STATE_UNSPECIFIED for state in states
    ):
        violations.append(("states", "must be known job states"))
    cursor = None
    if request.page_token:
        cursor = _decode_page_token(request.page_token, states)
        if cursor is None:
            violations.append(
                ("page_token", "is not a token from a previous ListRenderJobs with the same states")
            )
    if violations:
        raise InvalidArgument(violations)
    return states, request.page_size or DEFAULT_PAGE_SIZE, cursor


def _filter_key(states: list[int]) -> str:
    return ".".join(map(str, states))


def page_token(cursor: int | None, states: list[int]) -> str:
    if cursor is None:
        return ""
    raw = f"{_PAGE_TOKEN_PREFIX}{cursor}:{_filter_key(states)}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_page_token(token: str, states: list[int]) -> int | None:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    if not raw.startswith(_PAGE_TOKEN_PREFIX):
        return None
    cursor, _, filter_key = raw.removeprefix(_PAGE_TOKEN_PREFIX).partition(":")
    # ASCII digits only (int() would refuse others), within a database's signed 64-bit integer.
    if not (cursor.isascii() and cursor.isdigit()) or filter_key != _filter_key(states):
        return None
    position = int(cursor)
    return position if position <= _MAX_CURSOR else None
