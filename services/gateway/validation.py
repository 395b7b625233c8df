"""Checks of the gateway's requests. Every problem is reported at once, each naming its field."""

import base64
import hashlib
import math
import re

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_kit.errors import InvalidArgument
from aiprod_kit.presets import DEFAULT_PRESET, PRESETS, Preset

MAX_PROMPT_CHARS = 2000
MAX_FIRST_FRAME_BYTES = 10 * 1024 * 1024
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_JOB_ID = re.compile(r"job_[0-9a-f]{32}")
_PAGE_TOKEN_PREFIX = "v1:"


def normalized_spec(spec: render_pb2.RenderSpec) -> tuple[render_pb2.RenderSpec, Preset]:
    """The spec with its preset's defaults applied; INVALID_ARGUMENT naming every bad field."""
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
        violations.append(("spec.preset", f"unknown preset {preset_name!r}; known: {', '.join(PRESETS)}"))
    duration = spec.duration_seconds or (preset.default_duration_seconds if preset else 0)
    if not math.isfinite(duration) or duration < 0 or (preset and duration > preset.max_duration_seconds):
        limit = (
            f"at most {preset.max_duration_seconds:g} s for preset {preset.name}" if preset else "positive"
        )
        violations.append(("spec.duration_seconds", f"must be {limit}, not {spec.duration_seconds:g}"))
    if spec.aspect_ratio not in render_pb2.AspectRatio.values():
        violations.append(("spec.aspect_ratio", f"unknown aspect ratio {spec.aspect_ratio}"))
    if spec.first_frame.data and spec.first_frame.uri:
        violations.append(("spec.first_frame", "give data or uri, not both"))
    if len(spec.first_frame.data) > MAX_FIRST_FRAME_BYTES:
        violations.append(("spec.first_frame.data", f"must be at most {MAX_FIRST_FRAME_BYTES} bytes"))
    constraints = spec.constraints
    if not 0 <= constraints.quality_floor <= 1:
        violations.append(("spec.constraints.quality_floor", "must be between 0 and 1"))
    if constraints.preferred_backend not in backend_pb2.Backend.values():
        violations.append(
            ("spec.constraints.preferred_backend", f"unknown backend {constraints.preferred_backend}")
        )
    if constraints.max_cost.amount_micros < 0:
        violations.append(("spec.constraints.max_cost", "must not be negative"))
    if violations:
        raise InvalidArgument(violations)
    assert preset is not None
    normalized = render_pb2.RenderSpec()
    normalized.CopyFrom(spec)
    normalized.preset = preset.name
    normalized.duration_seconds = duration
    normalized.aspect_ratio = spec.aspect_ratio or render_pb2.ASPECT_RATIO_16_9
    normalized.constraints.quality_floor = max(constraints.quality_floor, preset.quality_floor)
    if not spec.seed:
        # Deterministic: the same prompt renders the same video unless the caller picks a seed.
        normalized.seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:6], "big")
    return normalized, preset


def plan_of(spec: render_pb2.RenderSpec) -> render_pb2.RenderPlan:
    """The default plan: one shot with the whole spec."""
    shot = render_pb2.Shot(
        prompt=spec.prompt.strip(),
        duration_seconds=spec.duration_seconds,
        aspect_ratio=spec.aspect_ratio,
        seed=spec.seed,
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
    if not cursor.isdigit() or filter_key != _filter_key(states):
        return None
    return int(cursor)
