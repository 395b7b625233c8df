"""Runway's API under `/runway`, as `runwayml` 5.24 speaks it (`X-Runway-Version: 2024-11-06`).

`POST /v1/text_to_video` and `/v1/image_to_video` create a task and answer its id and estimated
cost; `GET /v1/tasks/{id}` reports PENDING, THROTTLED, RUNNING (with progress), SUCCEEDED (output
URLs, minted afresh at each read as Runway's signed URLs are), FAILED (failure, failureCode) or
CANCELLED. `DELETE /v1/tasks/{id}` cancels a task that has not finished, which stays readable as
CANCELLED, and deletes one that has: it then answers 404 and its output URLs stop working.

Cost: the model's credits per second (configured `prices`, `silent_prices` for a Veo model asked
for no audio) times the duration. A SUCCEEDED task costs all of it, a FAILED one nothing, a
CANCELLED one all of it, in whatever state it was cancelled; `cost.credits` says so and the sandbox
bills it (billing.py).
"""

import random
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from aiprod_sandbox.config import ProviderConfig
from aiprod_sandbox.inputs import image_reference
from aiprod_sandbox.outputs import output_url
from aiprod_sandbox.state import Handler, Sandbox, bearer_token, idempotency_key
from aiprod_sandbox.tasks import Failure, Job, Phase, RenderSpec

PREFIX = "/runway"
API_VERSION = "2024-11-06"
MAX_SEED = 4294967295
MAX_PROMPT_UNITS = 1000
# 1 credit = 0.01 USD.
MICROS_PER_CREDIT = 10_000

_GEN4_RATIOS = ("1280:720", "720:1280", "1104:832", "960:960", "832:1104", "1584:672")
_VEO_RATIOS = ("1280:720", "720:1280", "1080:1920", "1920:1080")


@dataclass(frozen=True)
class RunwayModel:
    text_ratios: tuple[str, ...]  # empty: no text-to-video
    image_ratios: tuple[str, ...]
    durations: tuple[int, ...]
    default_duration: int | None  # None: the request must give one
    audio: bool = False  # the Veo models take `audio`, which is priced apart (config's silent_prices)


# Prices are in the configuration (config.py): they change more often than the models.
MODELS = {
    "gen4.5": RunwayModel(("1280:720", "720:1280"), _GEN4_RATIOS, tuple(range(2, 11)), None),
    "gen4_turbo": RunwayModel((), _GEN4_RATIOS, tuple(range(2, 11)), 10),
    "veo3.1": RunwayModel(_VEO_RATIOS, _VEO_RATIOS, (4, 6, 8), 8, audio=True),
    "veo3.1_fast": RunwayModel(_VEO_RATIOS, _VEO_RATIOS, (4, 6, 8), 8, audio=True),
}

_FAILURES = {
    Failure.SAFETY: ("SAFETY.INPUT.TEXT", "The prompt text did not pass content moderation."),
    Failure.INTERNAL: ("INTERNAL", "An unexpected error occurred while generating the output."),
    Failure.TIMEOUT: ("INTERNAL", "The task took too long to complete."),
}
_MESSAGES = {
    400: "Bad request.",
    401: "Authentication failed: the API key is missing or invalid.",
    403: "This API key is not permitted to perform this action.",
    404: "Not found.",
    429: "You have exceeded the rate limit or your daily task quota. Try again later.",
}


def error(status: int, message: str | None = None) -> web.Response:
    """Runway's error body: `{"error": message}`."""
    text = message or _MESSAGES.get(status, "The service is temporarily unavailable.")
    return web.json_response({"error": text}, status=status)


@dataclass(frozen=True)
class RunwayDetails:
    model: str
    # The estimate: credits per second at create time times the duration.
    credits: float

    def cost_credits(self, job: Job) -> float:
        """What the task costs in its state: all of it once SUCCEEDED or CANCELLED, nothing if FAILED."""
        return self.credits if job.phase in (Phase.SUCCEEDED, Phase.CANCELLED) else 0

    def bill_micros(self, job: Job) -> int:
        return round(self.cost_credits(job) * MICROS_PER_CREDIT)


class _Invalid(Exception):
    def __init__(self, issues: list[dict[str, Any]]) -> None:
        super().__init__("invalid body")
        self.issues = issues


def _timestamp(job: Job) -> str:
    return job.created_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RunwayApi:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def routes(self) -> list[web.RouteDef]:
        def endpoint(operation: str, handler: Handler) -> Handler:
            return self._sandbox.endpoint("runway", operation, error, self._check_headers, handler)

        return [
            web.post(f"{PREFIX}/v1/text_to_video", endpoint("create", self._text_to_video)),
            web.post(f"{PREFIX}/v1/image_to_video", endpoint("create", self._image_to_video)),
            web.get(f"{PREFIX}/v1/tasks/{{task_id}}", endpoint("get", self._get)),
            web.delete(f"{PREFIX}/v1/tasks/{{task_id}}", endpoint("cancel", self._delete)),
            web.get(f"{PREFIX}/v1/organization", endpoint("account", self._organization)),
        ]

    def _check_headers(self, request: web.Request) -> web.Response | None:
        if bearer_token(request) not in self._sandbox.accepted_keys:
            return error(401)
        if request.headers.get("X-Runway-Version") != API_VERSION:
            return error(400, f"The X-Runway-Version header is missing or invalid; use {API_VERSION}.")
        return None

    async def _organization(self, request: web.Request) -> web.Response:
        """The organization's tier and credits: what clients read to check their key."""
        models = {"gen4.5": {"maxConcurrentGenerations": 4, "maxDailyGenerations": 1000}}
        return web.json_response(
            {
                "creditBalance": 100_000,
                "tier": {"maxMonthlyCreditSpend": 1_000_000, "models": models},
                "usage": {"models": {"gen4.5": {"dailyGenerations": 0}}},
            }
        )

    async def _text_to_video(self, request: web.Request) -> web.Response:
        return await self._create(request, with_image=False)

    async def _image_to_video(self, request: web.Request) -> web.Response:
        return await self._create(request, with_image=True)

    async def _create(self, request: web.Request, *, with_image: bool) -> web.Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise _Invalid([{"path": [], "message": "Expected an object"}])
            details, spec = _validate(body, self._sandbox.config.of("runway"), with_image=with_image)
        except ValueError:
            return error(400, "The request body is not valid JSON.")
        except _Invalid as invalid:
            return web.json_response(
                {"error": "Validation of body failed", "issues": invalid.issues}, status=400
            )
        key = idempotency_key(request)
        job = self._sandbox.tasks.submit("runway", str(uuid.uuid4()), spec, key, details)
        self._sandbox.counters.created("runway", key, job.id)
        return web.json_response({"id": job.id, "estimatedCost": {"credits": details.credits}})

    def _find(self, request: web.Request) -> Job | None:
        return self._sandbox.tasks.get("runway", request.match_info["task_id"])

    async def _get(self, request: web.Request) -> web.Response:
        job = self._find(request)
        if job is None:
            return error(404, "Task not found.")
        self._sandbox.counters.task_get("runway", job.id)
        return web.json_response(self._task_json(request, job))

    async def _delete(self, request: web.Request) -> web.Response:
        job = self._find(request)
        if job is None:
            return error(404, "Task not found.")
        self._sandbox.counters.task_cancel("runway", job.id)
        if not self._sandbox.tasks.cancel(job):
            self._sandbox.outputs.revoke(job.videos)
            self._sandbox.tasks.forget(job)
        return web.Response(status=204)

    def _task_json(self, request: web.Request, job: Job) -> dict[str, Any]:
        details = job.details
        assert isinstance(details, RunwayDetails)
        task: dict[str, Any] = {"id": job.id, "createdAt": _timestamp(job), "status": job.phase.name}
        match job.phase:
            case Phase.PENDING | Phase.THROTTLED:
                task["estimatedCost"] = {"credits": details.credits}
            case Phase.RUNNING:
                task.update(estimatedCost={"credits": details.credits}, progress=job.progress)
            case Phase.SUCCEEDED:
                ttl = self._sandbox.config.of("runway").output_ttl_seconds
                tokens = [self._sandbox.outputs.publish(path, "runway", ttl) for path in job.videos]
                task.update(
                    cost={"credits": details.cost_credits(job)},
                    output=[output_url(request, t) for t in tokens],
                )
            case Phase.FAILED:
                assert job.failure is not None
                code, message = _FAILURES[job.failure]
                task.update(cost={"credits": details.cost_credits(job)}, failure=message, failureCode=code)
            case Phase.CANCELLED:
                task["cost"] = {"credits": details.cost_credits(job)}
        return task


def _validate(
    body: dict[str, Any], config: ProviderConfig, *, with_image: bool
) -> tuple[RunwayDetails, RenderSpec]:
    """The task a create body asks for, or _Invalid with every issue found."""
    issues: list[dict[str, Any]] = []

    def issue(path: str, message: str) -> None:
        issues.append({"path": [path], "message": message})

    name = body.get("model")
    model = MODELS.get(name) if isinstance(name, str) else None
    ratios = (model.image_ratios if with_image else model.text_ratios) if model else ()
    if model is None or not ratios:
        known = [m for m, spec in MODELS.items() if (spec.image_ratios if with_image else spec.text_ratios)]
        raise _Invalid([{"path": ["model"], "message": f"Invalid model; expected one of {', '.join(known)}"}])

    prompt = body.get("promptText")
    text_required = not with_image or name == "gen4.5"
    if prompt is None and not text_required:
        prompt = ""
    elif not isinstance(prompt, str) or not prompt.strip():
        issue("promptText", "Required: a non-empty string")
    elif len(prompt.encode("utf-16-le")) // 2 > MAX_PROMPT_UNITS:
        issue("promptText", f"Must be at most {MAX_PROMPT_UNITS} characters")

    if with_image and not _valid_prompt_image(body.get("promptImage")):
        issue("promptImage", "Expected an HTTPS URL, a Runway upload URI or a base64 image data URI")

    ratio = body.get("ratio")
    if ratio not in ratios:
        issue("ratio", f"Invalid enum value; expected one of {', '.join(ratios)}")

    duration = body.get("duration", model.default_duration)
    if duration is None:
        issue("duration", "Required")
    elif isinstance(duration, bool) or not isinstance(duration, int) or duration not in model.durations:
        issue("duration", f"Must be one of {', '.join(map(str, model.durations))}")

    seed = body.get("seed", random.randint(0, MAX_SEED))
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        issue("seed", f"Must be an integer from 0 to {MAX_SEED}")

    audio = body.get("audio", True)
    if not model.audio and "audio" in body:
        issue("audio", "Not supported by this model")
    elif not isinstance(audio, bool):
        issue("audio", "Expected a boolean")

    if body.get("outputFormat", "mp4") != "mp4":
        issue("outputFormat", "The sandbox renders mp4 only")

    if issues:
        raise _Invalid(issues)
    width, height = (int(side) for side in ratio.split(":"))
    spec = RenderSpec(prompt=prompt, seed=seed, duration_seconds=duration, width=width, height=height)
    return RunwayDetails(model=name, credits=config.price(name, audio=audio) * duration), spec


def _valid_prompt_image(value: Any) -> bool:
    if isinstance(value, list):
        return (
            len(value) == 1
            and isinstance(value[0], dict)
            and value[0].get("position") == "first"
            and (_valid_prompt_image(value[0].get("uri")))
        )
    return isinstance(value, str) and (value.startswith("runway://") or image_reference(value))
