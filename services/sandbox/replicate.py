"""Replicate's API under `/replicate`, as the `replicate` client 1.0.7 speaks it.

`POST /v1/models/{owner}/{name}/predictions` (or `POST /v1/predictions` with a `version`) creates a
prediction; `GET /v1/predictions/{id}` reads it: `starting` while it waits, `processing` with
tqdm-style progress lines in `logs` (the client's `Prediction.progress`), then `succeeded` with the
output URL (or a one-element list) and `metrics.predict_time`, `failed` with `error`, or `canceled`.
`POST /v1/predictions/{id}/cancel` cancels; `GET /v1/predictions` lists. `Prefer: wait[=n]` holds the
create up to n seconds (60 by default) for the prediction to finish, `Cancel-After` cancels it after a
duration. Webhooks are accepted and never called. Errors are RFC 7807 problem details, except the
429, whose body is only `detail` and `status` as Replicate's is.

Billing: a succeeded prediction bills the model's price per output second (configured `prices`, else
`default_price`) x the duration its input asked for; a failed or canceled one bills nothing.
"""

import base64
import hashlib
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web

from aiprod_sandbox.inputs import image_reference
from aiprod_sandbox.outputs import output_url
from aiprod_sandbox.state import Handler, Sandbox, bearer_token, idempotency_key
from aiprod_sandbox.tasks import ASPECT_RATIOS, Failure, Job, Phase, RenderSpec, video_size

PREFIX = "/replicate"
RESOLUTIONS = {"480p": 480, "720p": 720, "1080p": 1080}
DEFAULT_DURATION_SECONDS = 5
MAX_DURATION_SECONDS = 60
IMAGE_INPUTS = ("image", "start_image", "first_frame_image")
MAX_WAIT_SECONDS = 60
_PROGRESS_STEPS = 50
_VERSION_ID = re.compile(r"[0-9a-f]{64}")
_MODEL = re.compile(r"[\w.-]+/[\w.-]+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_STATUSES = {
    Phase.PENDING: "starting",
    Phase.THROTTLED: "starting",
    Phase.RUNNING: "processing",
    Phase.SUCCEEDED: "succeeded",
    Phase.FAILED: "failed",
    Phase.CANCELLED: "canceled",
}
_FAILURES = {
    Failure.SAFETY: "NSFW content detected. Try running it again, or try a different prompt.",
    Failure.INTERNAL: "Prediction failed: the model raised an internal error.",
    Failure.TIMEOUT: "Prediction timed out: it ran longer than the maximum run time.",
}
_TITLES = {
    400: "Bad request",
    401: "Unauthenticated",
    403: "Forbidden",
    404: "Not found",
    422: "Input validation failed",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Gateway timeout",
}
_DETAILS = {
    401: "You did not pass a valid authentication token",
    403: "You do not have permission to perform this action.",
    404: "The requested resource could not be found.",
}


def error(status: int, message: str | None = None, **extra: Any) -> web.Response:
    """An RFC 7807 problem; a 429 is Replicate's bare `{"detail", "status"}`."""
    if status == 429:
        body: dict[str, Any] = {"detail": message or "Request was throttled. Expected available in 1 second."}
    else:
        title = _TITLES.get(status, "Error")
        body = {"type": "about:blank", "title": title, "detail": message or _DETAILS.get(status, title)}
    body.update(status=status, **extra)
    return web.json_response(body, status=status, content_type="application/problem+json")


def version_id(model: str) -> str:
    """The version a model's predictions report: stable, so that it can be sent back as `version`."""
    return hashlib.sha256(model.encode()).hexdigest()


def _prediction_id() -> str:
    return base64.b32encode(os.urandom(16)).decode().rstrip("=").lower()


def _timestamp(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def parse_duration(text: str) -> float | None:
    """Seconds in a Cancel-After value such as "30s", "5m" or "1h30m" (a bare number is seconds)."""
    text = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


@dataclass
class ReplicateDetails:
    model: str
    version: str
    input: dict[str, Any]
    # The model's price per output second at create time.
    micros_per_second: int = 0
    # Output tokens, minted once: Replicate's file URLs do not change until the files are deleted.
    output_tokens: list[str] = field(default_factory=list)

    def bill_micros(self, job: Job) -> int:
        if job.phase is not Phase.SUCCEEDED:
            return 0
        # The spec's duration is the input's `duration` (the default when the input has none).
        return round(self.micros_per_second * job.spec.duration_seconds)


class _Invalid(Exception):
    def __init__(self, fields: list[dict[str, str]]) -> None:
        super().__init__("invalid input")
        self.fields = fields


class ReplicateApi:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def routes(self) -> list[web.RouteDef]:
        def endpoint(operation: str, handler: Handler) -> Handler:
            return self._sandbox.endpoint("replicate", operation, error, self._check_token, handler)

        return [
            web.post(
                f"{PREFIX}/v1/models/{{owner}}/{{name}}/predictions",
                endpoint("create", self._create_for_model),
            ),
            web.post(f"{PREFIX}/v1/predictions", endpoint("create", self._create_for_version)),
            web.get(f"{PREFIX}/v1/predictions", endpoint("get", self._list)),
            web.get(f"{PREFIX}/v1/predictions/{{prediction_id}}", endpoint("get", self._get)),
            web.post(f"{PREFIX}/v1/predictions/{{prediction_id}}/cancel", endpoint("cancel", self._cancel)),
            web.get(f"{PREFIX}/v1/account", endpoint("account", self._account)),
        ]

    async def _account(self, request: web.Request) -> web.Response:
        """The token's account: what clients read to check their token."""
        return web.json_response(
            {"type": "organization", "username": "sandbox", "name": "Sandbox", "github_url": None}
        )

    def _check_token(self, request: web.Request) -> web.Response | None:
        token = bearer_token(request, ("Bearer", "Token"))
        if token is None:
            return error(401, "You did not pass an authentication token")
        return None if token in self._sandbox.accepted_keys else error(401)

    def _model_exists(self, model: str) -> bool:
        models = self._sandbox.config.of("replicate").models
        return models is None or model in models

    async def _create_for_model(self, request: web.Request) -> web.Response:
        model = f"{request.match_info['owner']}/{request.match_info['name']}"
        if not self._model_exists(model):
            return error(404)
        return await self._create(request, model, version_id(model))

    async def _create_for_version(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "The request body is not valid JSON.")
        version = body.get("version") if isinstance(body, dict) else None
        if not isinstance(version, str):
            return error(422, "version is required", invalid_fields=[_field("version", "required")])
        resolved = self._resolve_version(version)
        if resolved is None:
            return error(
                422, "Invalid version or not permitted", invalid_fields=[_field("version", "invalid")]
            )
        return await self._create(request, *resolved)

    def _resolve_version(self, version: str) -> tuple[str, str] | None:
        """(model, version id) that a `version` field names: owner/name[:id] or an id; None if none."""
        if "/" not in version:
            # A bare version id is known only if this sandbox reported it for a model.
            models = {*(self._sandbox.config.of("replicate").models or ())}
            models.update(
                details.model for job in self._sandbox.tasks.jobs("replicate") if (details := _details(job))
            )
            model = next((m for m in models if version_id(m) == version), None)
            return (model, version) if model else None
        model, _, version_hash = version.partition(":")
        version_hash = version_hash or version_id(model)
        if (
            not _MODEL.fullmatch(model)
            or not _VERSION_ID.fullmatch(version_hash)
            or not self._model_exists(model)
        ):
            return None
        return model, version_hash

    async def _create(self, request: web.Request, model: str, version: str) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "The request body is not valid JSON.")
        inputs = body.get("input") if isinstance(body, dict) else None
        if not isinstance(inputs, dict):
            return error(422, "input is required", invalid_fields=[_field("input", "required")])
        wait = _wait_seconds(request.headers.get("Prefer", ""))
        cancel_after = request.headers.get("Cancel-After")
        cancel_seconds = parse_duration(cancel_after) if cancel_after is not None else None
        if cancel_after is not None and cancel_seconds is None:
            return error(400, f"Invalid Cancel-After header: {cancel_after!r}")
        try:
            spec = _validate(inputs)
        except _Invalid as invalid:
            detail = "".join(f"- input.{f['field']}: {f['description']}\n" for f in invalid.fields)
            return error(422, detail, invalid_fields=invalid.fields)

        key = idempotency_key(request)
        price = self._sandbox.config.of("replicate").price(model)
        details = ReplicateDetails(model, version, inputs, round(price * 1_000_000))
        job = self._sandbox.tasks.submit("replicate", _prediction_id(), spec, key, details)
        self._sandbox.counters.created("replicate", key, job.id)
        if cancel_seconds is not None:
            self._sandbox.tasks.cancel_later(job, cancel_seconds)
        if wait:
            await job.wait_done(wait)
        return web.json_response(self._prediction_json(request, job), status=201)

    def _find(self, request: web.Request) -> Job | None:
        return self._sandbox.tasks.get("replicate", request.match_info["prediction_id"])

    async def _get(self, request: web.Request) -> web.Response:
        job = self._find(request)
        if job is None:
            return error(404)
        self._sandbox.counters.task_get("replicate", job.id)
        return web.json_response(self._prediction_json(request, job))

    async def _cancel(self, request: web.Request) -> web.Response:
        job = self._find(request)
        if job is None:
            return error(404)
        self._sandbox.counters.task_cancel("replicate", job.id)
        self._sandbox.tasks.cancel(job)
        return web.json_response(self._prediction_json(request, job))

    async def _list(self, request: web.Request) -> web.Response:
        jobs = sorted(self._sandbox.tasks.jobs("replicate"), key=lambda job: job.created_at, reverse=True)
        results = [self._prediction_json(request, job) for job in jobs]
        return web.json_response({"previous": None, "next": None, "results": results})

    def _prediction_json(self, request: web.Request, job: Job) -> dict[str, Any]:
        details = _details(job)
        assert details is not None
        base = f"{request.url.origin()}{PREFIX}/v1/predictions/{job.id}"
        prediction: dict[str, Any] = {
            "id": job.id,
            "model": details.model,
            "version": details.version,
            "input": details.input,
            "logs": _logs(job),
            "output": None,
            "data_removed": False,
            "error": _FAILURES[job.failure] if job.failure else None,
            "status": _STATUSES[job.phase],
            "created_at": _timestamp(job.created_at),
            "started_at": _timestamp(job.started_at),
            "completed_at": _timestamp(job.completed_at),
            "urls": {"get": base, "cancel": f"{base}/cancel"},
            "metrics": {},
        }
        if job.started_at is not None and job.completed_at is not None:
            prediction["metrics"] = {
                "predict_time": round((job.completed_at - job.started_at).total_seconds(), 3),
                "total_time": round((job.completed_at - job.created_at).total_seconds(), 3),
            }
        if job.phase is Phase.SUCCEEDED:
            urls = [output_url(request, token) for token in self._output_tokens(job, details)]
            prediction["output"] = urls if job.config.output_as_list else urls[0]
        return prediction

    def _output_tokens(self, job: Job, details: ReplicateDetails) -> list[str]:
        if not details.output_tokens:
            ttl = self._sandbox.config.of("replicate").output_ttl_seconds - job.seconds_since_completion
            details.output_tokens = [
                self._sandbox.outputs.publish(path, "replicate", ttl) for path in job.videos
            ]
        return details.output_tokens


def _details(job: Job) -> ReplicateDetails | None:
    return job.details if isinstance(job.details, ReplicateDetails) else None


def _field(name: str, description: str) -> dict[str, str]:
    return {"type": name, "field": name, "description": description}


def _wait_seconds(prefer: str) -> float:
    """Seconds a `Prefer: wait` or `Prefer: wait=n` header asks the create to wait; 0 without one."""
    match = re.fullmatch(r"\s*wait(?:=(\d+))?\s*", prefer)
    if match is None:
        return 0.0
    return min(float(match.group(1) or MAX_WAIT_SECONDS), MAX_WAIT_SECONDS)


def _logs(job: Job) -> str:
    """Log lines in tqdm's format, which the client parses into Prediction.progress."""
    if job.started_at is None:
        return ""
    progress = job.progress if job.phase is not Phase.CANCELLED else 0.0
    step = int(progress * _PROGRESS_STEPS)
    bar = "█" * (step * 10 // _PROGRESS_STEPS)
    lines = ["Generating video...", f"{int(progress * 100):3d}%|{bar:<10}| {step}/{_PROGRESS_STEPS}"]
    if job.phase is Phase.SUCCEEDED:
        lines.append("Video saved.")
    return "\n".join(lines) + "\n"


def _validate(inputs: dict[str, Any]) -> RenderSpec:
    """The render a video model's input asks for, or _Invalid naming every bad field."""
    invalid: list[dict[str, str]] = []
    prompt = inputs.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        invalid.append(_field("prompt", "prompt is required"))
    duration = inputs.get("duration", DEFAULT_DURATION_SECONDS)
    if isinstance(duration, bool) or not isinstance(duration, int | float) or not 0 < duration <= 60:
        invalid.append(_field("duration", f"Must be greater than 0 and at most {MAX_DURATION_SECONDS}"))
    aspect_ratio = inputs.get("aspect_ratio", "16:9")
    if aspect_ratio not in ASPECT_RATIOS:
        invalid.append(_field("aspect_ratio", f"Must be one of {', '.join(ASPECT_RATIOS)}"))
    resolution = inputs.get("resolution", "720p")
    if resolution not in RESOLUTIONS:
        invalid.append(_field("resolution", f"Must be one of {', '.join(RESOLUTIONS)}"))
    seed = inputs.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        invalid.append(_field("seed", "Must be a non-negative integer"))
    for name in IMAGE_INPUTS:
        if name in inputs and not image_reference(inputs[name]):
            invalid.append(_field(name, "Must be a URL or an image data URI"))
    if invalid:
        raise _Invalid(invalid)
    width, height = video_size(aspect_ratio, RESOLUTIONS[resolution])
    return RenderSpec(prompt, seed, duration, width, height)
