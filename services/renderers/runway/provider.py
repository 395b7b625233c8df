"""Runway through the official `runwayml` client: text-to-video and image-to-video tasks."""

import base64
from dataclasses import dataclass
from pathlib import Path

import httpx
import runwayml
from runwayml import AsyncRunwayML

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.capabilities import RESOLUTION_QUALITY, with_offers
from aiprod_kit.money import usd
from aiprod_kit.rendering.download import download_url
from aiprod_kit.rendering.provider import (
    ErrorKind,
    Provider,
    ProviderError,
    ProviderTask,
    TaskState,
    VideoSource,
    retry_after_seconds,
    tabled_offers,
)
from aiprod_kit.settings import RunwaySettings

# 1 credit = 0.01 USD.
MICROS_PER_CREDIT = 10_000
RUNWAY_VERSION = "2024-11-06"
# Runway's limits on what a create takes: promptText up to 1000 characters; an image as a data URI up
# to 5 MB (docs.dev.runwayml.com, "Inputs").
MAX_PROMPT_CHARACTERS = 1000
MAX_IMAGE_BYTES = 5 * 1024 * 1024


@dataclass(frozen=True)
class RunwayModel:
    durations: tuple[int, ...]
    aspect_ratios: tuple[int, ...]
    resolutions: tuple[str, ...]
    text_input: bool
    credits_per_second: int
    quality: float


_LANDSCAPE_PORTRAIT = (render_pb2.ASPECT_RATIO_16_9, render_pb2.ASPECT_RATIO_9_16)
# Runway's `ratio` is the frame's width:height, the kit's frame size for the aspect ratio at the
# resolution (1280:720, 720:1280, 960:960; 1920:1080 and 1080:1920 at 1080p, Veo's models only).
MODELS = {
    "gen4.5": RunwayModel(tuple(range(2, 11)), _LANDSCAPE_PORTRAIT, ("720p",), True, 12, 0.95),
    "gen4_turbo": RunwayModel(
        tuple(range(2, 11)), (*_LANDSCAPE_PORTRAIT, render_pb2.ASPECT_RATIO_1_1), ("720p",), False, 5, 0.9
    ),
    "veo3.1": RunwayModel((4, 6, 8), _LANDSCAPE_PORTRAIT, ("720p", "1080p"), True, 40, 0.93),
    "veo3.1_fast": RunwayModel((4, 6, 8), _LANDSCAPE_PORTRAIT, ("720p", "1080p"), True, 15, 0.88),
}
_STATES = {
    "PENDING": TaskState.PENDING,
    # Over the organisation's concurrency limit: queued by Runway, not refused.
    "THROTTLED": TaskState.PENDING,
    "RUNNING": TaskState.RUNNING,
    "SUCCEEDED": TaskState.SUCCEEDED,
    "FAILED": TaskState.FAILED,
    "CANCELLED": TaskState.CANCELLED,
}


def provider_error(error: Exception) -> ProviderError:
    """The kit's reading of a runwayml error."""
    if isinstance(error, runwayml.APITimeoutError):
        return ProviderError(ErrorKind.AMBIGUOUS, "request timed out")
    if isinstance(error, runwayml.APIConnectionError):
        # Refused or reset before an answer: only a refused connection proves nothing was sent.
        refused = isinstance(error.__cause__, httpx.ConnectError)
        return ProviderError(ErrorKind.UNAVAILABLE if refused else ErrorKind.AMBIGUOUS, str(error))
    if isinstance(error, runwayml.APIStatusError):
        status = error.status_code
        message = str(error.message)
        if status in (401, 403):
            return ProviderError(ErrorKind.AUTH, message, status)
        if status == 404:
            return ProviderError(ErrorKind.NOT_FOUND, message, status)
        if status == 429:
            seconds = retry_after_seconds(error.response.headers.get("retry-after"))
            return ProviderError(ErrorKind.RATE_LIMITED, message, status, retry_after=seconds)
        if status in (502, 503, 504):
            return ProviderError(ErrorKind.UNAVAILABLE, message, status)
        if status >= 500 or status in (408, 409):
            return ProviderError(ErrorKind.AMBIGUOUS, message, status)
        return ProviderError(ErrorKind.REFUSED, message, status)
    raise error


class RunwayProvider(Provider):
    backend = backend_pb2.BACKEND_RUNWAY
    name = "runway"

    def __init__(self, settings: RunwaySettings) -> None:
        offered = tabled_offers(
            settings, "AIPROD_RUNWAY_", {name: model.resolutions for name, model in MODELS.items()}
        )
        self._settings = settings
        self._capabilities = with_offers(
            self.backend,
            [_offer(model, resolution) for model, resolution in offered],
            max_prompt_characters=MAX_PROMPT_CHARACTERS,
            max_image_bytes=MAX_IMAGE_BYTES,
        )
        # The kit decides what may be sent again: the client's own retries (POST included) are off.
        self._client = AsyncRunwayML(
            api_key=settings.api_secret.get_secret_value() or "missing",
            base_url=settings.base_url,
            timeout=settings.request_timeout_seconds,
            max_retries=0,
            default_headers={"X-Runway-Version": RUNWAY_VERSION},
        )
        self._downloads = httpx.AsyncClient(timeout=settings.request_timeout_seconds)

    def missing_configuration(self) -> list[str]:
        return [] if self._settings.api_secret.get_secret_value() else ["RUNWAYML_API_SECRET"]

    def capabilities(self) -> renderer_pb2.Capabilities:
        return self._capabilities

    def charge_micros(
        self, shot: render_pb2.Shot, task: ProviderTask | None, *, model: str = "", cancelled: bool = False
    ) -> int:
        """Runway's billing, in credits of 0.01 USD:

        - SUCCEEDED: the task's `cost.credits` when it reports them, else the list price * duration;
        - FAILED, whatever its failureCode (safety refusals included): 0, Runway refunds failed tasks;
        - CANCELLED (a DELETE this renderer sent, in any state, or a cancel seen at Runway): the full
          estimate, list price * the shot's duration: credits are taken at creation and a cancel does
          not refund them;
        - a task Runway no longer knows: the full estimate, the worst case.
        """
        if cancelled or task is None or task.state == TaskState.CANCELLED:
            return self.list_price_micros(shot, model)
        if task.state == TaskState.SUCCEEDED:
            return task.cost_micros if task.cost_micros is not None else self.list_price_micros(shot, model)
        return 0

    async def create(self, shot: render_pb2.Shot, model: str, idempotency_key: str) -> str:
        common = {
            "model": model,
            "prompt_text": shot.prompt,
            "ratio": "{}:{}".format(*self.frame_size(shot)),
            "duration": round(shot.duration_seconds),
            "seed": shot.seed % 4_294_967_295,
            "extra_headers": {"Idempotency-Key": idempotency_key},
        }
        try:
            if shot.first_frame.data or shot.first_frame.uri:
                created = await self._client.image_to_video.create(
                    prompt_image=_image(shot.first_frame), **common
                )
            elif not MODELS[model].text_input:
                raise ProviderError(ErrorKind.REFUSED, f"{model} needs a first frame")
            else:
                created = await self._client.text_to_video.create(**common)
        except runwayml.APIError as error:
            raise provider_error(error) from error
        return created.id

    async def get(self, task_id: str) -> ProviderTask:
        try:
            task = await self._client.tasks.retrieve(task_id)
        except runwayml.APIError as error:
            raise provider_error(error) from error
        cost = getattr(task, "cost", None)
        return ProviderTask(
            state=_STATES[task.status],
            progress=float(getattr(task, "progress", 0.0) or 0.0),
            outputs=tuple(VideoSource(url=url) for url in getattr(task, "output", None) or ()),
            failure_code=getattr(task, "failure_code", None) or "",
            failure_message=getattr(task, "failure", None) or "",
            cost_micros=round(cost.credits * MICROS_PER_CREDIT) if cost is not None else None,
        )

    async def cancel(self, task_id: str) -> bool:
        try:
            await self._client.tasks.delete(task_id)
        except runwayml.APIError as error:
            raise provider_error(error) from error
        return True

    async def probe(self) -> None:
        try:
            await self._client.organization.retrieve()
        except runwayml.APIError as error:
            raise provider_error(error) from error

    async def download(self, source: VideoSource, destination: Path) -> None:
        await download_url(self._downloads, source.url, destination)

    async def aclose(self) -> None:
        await self._client.close()
        await self._downloads.aclose()


def _offer(name: str, resolution: str) -> renderer_pb2.ModelOffer:
    model = MODELS[name]
    return renderer_pb2.ModelOffer(
        model=name,
        resolution=resolution,
        price_per_second=usd(model.credits_per_second * MICROS_PER_CREDIT),
        nominal_quality=round(model.quality + RESOLUTION_QUALITY[resolution], 4),
        min_duration_seconds=min(model.durations),
        max_duration_seconds=max(model.durations),
        allowed_durations_seconds=model.durations,
        aspect_ratios=model.aspect_ratios,
        image_input=True,
        requires_first_frame=not model.text_input,
        audio=False,
    )


def _image(image: render_pb2.Image) -> str:
    if image.uri:
        return image.uri
    return f"data:{image.mime_type or 'image/png'};base64,{base64.b64encode(image.data).decode()}"
