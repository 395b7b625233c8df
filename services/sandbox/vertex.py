"""Veo on Vertex AI under `/vertex`, as `google-genai` 3.x speaks it with a base URL.

`POST /{v1,v1beta1}/projects/{p}/locations/{l}/publishers/google/models/{model}:predictLongRunning`
starts a long-running operation and answers its name; `...:fetchPredictOperation` with
`{"operationName": name}` reads it: no `done` while it waits or runs, then `done: true` with either
`response.videos` (`bytesBase64Encoded`, or `gcsUri` when the request gave a `storageUri`; nothing is
written to Cloud Storage) or `error: {code, message}`. Vertex has no cancel for these operations.
Errors are Google's `{"error": {"code", "message", "status"}}`.

Reference images (`instances[0].referenceImages[]`, each `{"image": {...}, "referenceType"}`) as Vertex
takes them: Veo 3.1 Generate and Fast only (not Lite, not 3.0), at most three "asset" images (the
client sends "ASSET": the type is read without case; "style" images are veo-2.0-generate-exp's alone),
with a prompt, without a first frame, on an 8 s clip; anything else is a 400. How many a create brought
is kept on its task (VeoDetails) and logged with the operation it created.

Billing: an operation done with videos bills the model's price per second (configured `prices` with
audio, `silent_prices` without) x durationSeconds x the videos returned; one done with an error, or
with every video filtered, bills nothing.
"""

import asyncio
import base64
import random
import uuid
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from aiprod_sandbox.config import ProviderConfig
from aiprod_sandbox.inputs import IMAGE_MIME_TYPES, base64_image
from aiprod_sandbox.state import Handler, Sandbox, bearer_token, idempotency_key
from aiprod_sandbox.tasks import Failure, Job, Phase, RenderSpec, video_size

log = structlog.get_logger()

PREFIX = "/vertex"
MODELS = {
    "veo-3.0-generate-001",
    "veo-3.0-fast-generate-001",
    "veo-3.1-generate-001",
    "veo-3.1-fast-generate-001",
    "veo-3.1-lite-generate-001",
    "veo-3.1-generate-preview",
    "veo-3.1-fast-generate-preview",
}
REFERENCE_MODELS = {
    "veo-3.1-generate-001",
    "veo-3.1-fast-generate-001",
    "veo-3.1-generate-preview",
    "veo-3.1-fast-generate-preview",
}
MAX_REFERENCE_IMAGES = 3
REFERENCE_DURATION = 8
DURATIONS = (4, 6, 8)
ASPECT_RATIOS = ("16:9", "9:16")
RESOLUTIONS = {"720p": 720, "1080p": 1080}
MAX_SAMPLES = 4
MAX_SEED = 4294967295
_RESPONSE_TYPE = "type.googleapis.com/cloud.ai.large_models.vision.GenerateVideoResponse"
_RAI_REASON = (
    "Unable to generate videos because the prompt could violate Google's Responsible AI practices. "
    "Try rephrasing the prompt. Support codes: 58061214"
)
_FAILURES = {
    Failure.INTERNAL: {"code": 13, "message": "Internal error encountered."},
    Failure.TIMEOUT: {"code": 4, "message": "Deadline exceeded."},
}
_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_MESSAGES = {
    400: "Request contains an invalid argument.",
    401: "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
    "or other valid authentication credential.",
    403: "Permission 'aiplatform.endpoints.predict' denied on resource (or it may not exist).",
    404: "Requested entity was not found.",
    429: "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model "
    "with base model: veo-3.0-generate. Please submit a quota increase request.",
    500: "Internal error encountered.",
    503: "The service is currently unavailable.",
    504: "The request timed out.",
}


def error(status: int, message: str | None = None) -> web.Response:
    """Google's error body: `{"error": {"code", "message", "status"}}`."""
    body = {
        "code": status,
        "message": message or _MESSAGES.get(status, "Internal error encountered."),
        "status": _STATUSES.get(status, "UNKNOWN"),
    }
    return web.json_response({"error": body}, status=status)


@dataclass(frozen=True)
class VeoDetails:
    operation_name: str
    storage_uri: str | None
    model: str = ""
    # The model's price per second at create time, with or without audio as the request asked.
    micros_per_second: int = 0
    # How many reference images the request brought.
    reference_images: int = 0

    def bill_micros(self, job: Job) -> int:
        # Filtered videos are not returned and not billed; a SAFETY outcome filters every one of them.
        # Vertex has no cancel: only a reset cancels, and it clears the bills.
        if job.phase is not Phase.SUCCEEDED:
            return 0
        return round(self.micros_per_second * job.spec.duration_seconds) * len(job.videos)


class _Invalid(Exception):
    pass


@dataclass(frozen=True)
class _Create:
    """What a predictLongRunning body asks for."""

    spec: RenderSpec
    storage_uri: str | None
    audio: bool
    reference_images: int


class VertexApi:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def routes(self) -> list[web.RouteDef]:
        def endpoint(operation: str, handler: Handler) -> Handler:
            return self._sandbox.endpoint("veo", operation, error, self._check_token, handler)

        methods = {
            "predictLongRunning": endpoint("create", self._predict_long_running),
            "fetchPredictOperation": endpoint("get", self._fetch_predict_operation),
        }

        async def dispatch(request: web.Request) -> web.StreamResponse:
            # The method follows the model after a colon, in the same path segment.
            _, _, method = request.match_info["target"].rpartition(":")
            handler = methods.get(method)
            return await handler(request) if handler else error(404, f"Method {method!r} not found.")

        path = (
            "/{version:v1|v1beta1}/projects/{project}/locations/{location}/publishers/google/models/{target}"
        )
        return [web.post(f"{PREFIX}{path}", dispatch)]

    def _check_token(self, request: web.Request) -> web.Response | None:
        token = bearer_token(request)
        if token is None:
            return error(
                401,
                "Request is missing required authentication credential. Expected OAuth 2 access token, "
                "login cookie or other valid authentication credential.",
            )
        return None if token in self._sandbox.accepted_keys else error(401)

    async def _predict_long_running(self, request: web.Request) -> web.Response:
        info = request.match_info
        model = info["target"].rpartition(":")[0]
        resource = f"projects/{info['project']}/locations/{info['location']}/publishers/google/models/{model}"
        if model not in MODELS:
            return error(404, f"Publisher Model `{resource}` not found.")
        try:
            body = await request.json()
            asked = _validate(body, model)
        except ValueError:
            return error(400, "Invalid JSON payload received.")
        except _Invalid as invalid:
            return error(400, str(invalid))
        operation_id = str(uuid.uuid4())
        details = VeoDetails(
            f"{resource}/operations/{operation_id}",
            asked.storage_uri,
            model,
            _micros_per_second(self._sandbox.config.of("veo"), model, asked.audio),
            asked.reference_images,
        )
        key = idempotency_key(request)
        self._sandbox.tasks.submit("veo", operation_id, asked.spec, key, details)
        self._sandbox.counters.created("veo", key, operation_id)
        log.info(
            "operation_created",
            provider="veo",
            task_id=operation_id,
            model=model,
            reference_images=asked.reference_images,
        )
        return web.json_response({"name": details.operation_name})

    async def _fetch_predict_operation(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "Invalid JSON payload received.")
        name = body.get("operationName") if isinstance(body, dict) else None
        if not isinstance(name, str):
            return error(400, "operationName is required.")
        job = self._sandbox.tasks.get("veo", name.rpartition("/")[2])
        if job is None or not isinstance(job.details, VeoDetails) or job.details.operation_name != name:
            return error(404, f"Operation {name} not found.")
        self._sandbox.counters.task_get("veo", job.id)
        return web.json_response(await _operation_json(job, job.details))


async def _operation_json(job: Job, details: VeoDetails) -> dict[str, Any]:
    operation: dict[str, Any] = {"name": details.operation_name}
    if not job.terminal:
        return operation
    operation["done"] = True
    if job.phase is Phase.SUCCEEDED:
        operation["response"] = {
            "@type": _RESPONSE_TYPE,
            "raiMediaFilteredCount": 0,
            "videos": await _videos(job),
        }
    elif job.failure is Failure.SAFETY:
        operation["response"] = {
            "@type": _RESPONSE_TYPE,
            "raiMediaFilteredCount": job.spec.samples,
            "raiMediaFilteredReasons": [_RAI_REASON],
        }
    else:
        operation["error"] = _FAILURES.get(job.failure or Failure.INTERNAL, _FAILURES[Failure.INTERNAL])
    return operation


async def _videos(job: Job) -> list[dict[str, str]]:
    details = job.details
    assert isinstance(details, VeoDetails)
    if details.storage_uri is not None:
        prefix = f"{details.storage_uri.rstrip('/')}/{job.id}"
        return [
            {"gcsUri": f"{prefix}/sample_{n}.mp4", "mimeType": "video/mp4"} for n in range(len(job.videos))
        ]
    contents = await asyncio.gather(*(asyncio.to_thread(path.read_bytes) for path in job.videos))
    return [
        {"bytesBase64Encoded": base64.b64encode(data).decode(), "mimeType": "video/mp4"} for data in contents
    ]


def _micros_per_second(config: ProviderConfig, model: str, audio: bool) -> int:
    return round(config.price(model, audio=audio) * 1_000_000)


def _validate(body: Any, model: str) -> _Create:
    """What a predictLongRunning body for `model` asks for, or _Invalid."""
    instances = body.get("instances") if isinstance(body, dict) else None
    if not isinstance(instances, list) or len(instances) != 1 or not isinstance(instances[0], dict):
        raise _Invalid("instances must hold exactly one instance.")
    instance = instances[0]
    image = instance.get("image")
    if image is not None:
        _check_image(image, "instances[0].image")
    prompt = instance.get("prompt", "")
    if not isinstance(prompt, str) or (image is None and not prompt.strip()):
        raise _Invalid("instances[0].prompt is required for text-to-video.")
    references = _reference_images(instance, model)

    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise _Invalid("parameters must be an object.")
    duration = parameters.get("durationSeconds", 8)
    if duration not in DURATIONS or isinstance(duration, bool):
        raise _Invalid(f"Unsupported durationSeconds {duration!r}; supported: 4, 6 and 8 seconds.")
    aspect_ratio = parameters.get("aspectRatio", "16:9")
    if aspect_ratio not in ASPECT_RATIOS:
        raise _Invalid(f"Unsupported aspectRatio {aspect_ratio!r}; supported: 16:9 and 9:16.")
    resolution = parameters.get("resolution", "720p")
    if resolution not in RESOLUTIONS:
        raise _Invalid(f"Unsupported resolution {resolution!r}; supported: 720p and 1080p.")
    samples = parameters.get("sampleCount", 1)
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
        raise _Invalid(f"sampleCount must be from 1 to {MAX_SAMPLES}.")
    seed = parameters.get("seed", random.randint(0, MAX_SEED))
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise _Invalid(f"seed must be from 0 to {MAX_SEED}.")
    # Vertex requires generateAudio for Veo 3 models; without it, bill as the audio the model makes.
    audio = parameters.get("generateAudio", True)
    if not isinstance(audio, bool):
        raise _Invalid("generateAudio must be a boolean.")
    storage_uri = parameters.get("storageUri")
    if storage_uri is not None and (not isinstance(storage_uri, str) or not storage_uri.startswith("gs://")):
        raise _Invalid("storageUri must be a gs:// URI.")

    if references and duration != REFERENCE_DURATION:
        raise _Invalid(
            f"Unsupported durationSeconds {duration!r} with referenceImages; supported: "
            f"{REFERENCE_DURATION} seconds."
        )

    width, height = video_size(aspect_ratio, RESOLUTIONS[resolution])
    spec = RenderSpec(prompt, seed, duration, width, height, samples)
    return _Create(spec, storage_uri, audio, references)


def _reference_images(instance: dict[str, Any], model: str) -> int:
    """How many reference images the instance holds (checked as Vertex checks them; its prompt already is),
    or _Invalid."""
    references = instance.get("referenceImages")
    if references is None:
        return 0
    if not isinstance(references, list):
        raise _Invalid("instances[0].referenceImages must be a list.")
    if not references:
        return 0
    if model not in REFERENCE_MODELS:
        raise _Invalid(f"referenceImages is not supported by {model}.")
    if len(references) > MAX_REFERENCE_IMAGES:
        raise _Invalid(
            f"instances[0].referenceImages holds {len(references)} images; at most "
            f"{MAX_REFERENCE_IMAGES} asset images are supported."
        )
    if instance.get("image") is not None:
        raise _Invalid("instances[0].image is not supported with referenceImages.")
    for index, reference in enumerate(references):
        field = f"instances[0].referenceImages[{index}]"
        if not isinstance(reference, dict):
            raise _Invalid(f"{field} must be an object.")
        kind = reference.get("referenceType")
        kind = kind.lower() if isinstance(kind, str) else kind
        if kind == "style":
            raise _Invalid(f"{field}.referenceType style is not supported by {model}; use asset.")
        if kind != "asset":
            raise _Invalid(f"{field}.referenceType must be asset or style, not {kind!r}.")
        _check_image(reference.get("image"), f"{field}.image")
    return len(references)


def _check_image(image: Any, field: str) -> None:
    if not isinstance(image, dict):
        raise _Invalid(f"{field} must be an object.")
    if image.get("mimeType") not in IMAGE_MIME_TYPES:
        raise _Invalid(f"{field}.mimeType must be one of {', '.join(IMAGE_MIME_TYPES)}.")
    encoded, uri = image.get("bytesBase64Encoded"), image.get("gcsUri")
    if (encoded is None) == (uri is None):
        raise _Invalid(f"{field} needs exactly one of bytesBase64Encoded and gcsUri.")
    if encoded is not None and not (isinstance(encoded, str) and base64_image(encoded)):
        raise _Invalid(f"{field}.bytesBase64Encoded is not a valid image.")
    if uri is not None and not (isinstance(uri, str) and uri.startswith("gs://")):
        raise _Invalid(f"{field}.gcsUri must be a gs:// URI.")
