"""Replicate through the official `replicate` client: one prediction per render, on a configured model.

Replicate hosts many video models, each with its own input names, lengths and prices, so most of what
this adapter sends is configuration:

- AIPROD_REPLICATE_MODEL names the model (`owner/name`); its predictions are created with
  `POST /v1/models/{owner}/{name}/predictions`.
- AIPROD_REPLICATE_INPUT_MAPPING (JSON) maps our fields (prompt, first_frame, duration_seconds,
  aspect_ratio, seed) to the model's input keys; only mapped fields are sent. A first frame goes as a
  data URI (or its http(s) URL); an aspect ratio as "16:9", "9:16" or "1:1"; a duration in whole seconds.
- The durations, aspect ratios and frame facts of a few known models are in MODELS below; any other
  model gets a generic 2-10 s, with every aspect ratio when aspect_ratio is mapped (16:9 alone when not).

Cost: many Replicate video models bill per second of output and others per second of compute
(`metrics.predict_time` times the hardware's price). Without a reliable per-prediction figure from the
API, a render costs AIPROD_REPLICATE_PRICE_PER_SECOND_USD times the requested video duration (the kit's
default), which is exact for models billed per output second, and must be set to the model's price.

Progress: Replicate only reports a state; models that print a progress bar (tqdm's "45%|###| 45/100")
or a percentage in their logs give a progress read from the last one; otherwise a running prediction
reports 0 until it ends: no estimate is invented.
"""

import base64
import contextvars
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydantic
import replicate
from replicate.exceptions import ReplicateError
from replicate.prediction import Prediction

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.capabilities import FRAME_SIZES_720P
from aiprod_kit.money import MICROS_PER_UNIT, usd
from aiprod_kit.rendering.download import download_url
from aiprod_kit.rendering.provider import (
    ErrorKind,
    Provider,
    ProviderError,
    ProviderTask,
    TaskState,
    VideoSource,
    retry_after_seconds,
)
from aiprod_kit.settings import ConfigurationError, ReplicateSettings

try:  # the replicate client parses its resources with pydantic's v1 API
    from pydantic.v1 import ValidationError as _V1ValidationError
except ImportError:  # pragma: no cover - pydantic 1 itself
    _V1ValidationError = pydantic.ValidationError  # type: ignore[misc,assignment]

_VALIDATION_ERRORS = (pydantic.ValidationError, _V1ValidationError)

NOMINAL_QUALITY = 0.75
# Our fields that the input mapping may name.
FIELDS = ("prompt", "first_frame", "duration_seconds", "aspect_ratio", "seed")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_RATIO_NAMES = {
    render_pb2.ASPECT_RATIO_16_9: "16:9",
    render_pb2.ASPECT_RATIO_9_16: "9:16",
    render_pb2.ASPECT_RATIO_1_1: "1:1",
}
# Seeds go as non-negative 32-bit signed integers, which every model with a seed input takes.
_SEED_MODULUS = 2**31 - 1


@dataclass(frozen=True)
class ReplicateModel:
    """What a model renders, when known: its exact lengths, its frame and its frame rate."""

    durations: tuple[int, ...]
    # The aspect ratios it renders, with the frame size of each; None: those the mapping can ask for.
    frames: dict[int, tuple[int, int]] | None
    frame_rate: float


# Known models. minimax/video-01 makes 6 s of 1280x720 at 25 fps, whatever it is asked.
MODELS = {
    "minimax/video-01": ReplicateModel((6,), {render_pb2.ASPECT_RATIO_16_9: (1280, 720)}, 25.0),
}
# Any other model: 2 to 10 s in whole seconds, 720p frames, 24 fps.
GENERIC_MODEL = ReplicateModel(tuple(range(2, 11)), None, 24.0)

_STATES = {
    "starting": TaskState.PENDING,
    "processing": TaskState.RUNNING,
    "succeeded": TaskState.SUCCEEDED,
    "failed": TaskState.FAILED,
    "canceled": TaskState.CANCELLED,
}
# Words of Replicate's (and its models') content-moderation errors, such as MiniMax's
# "The input or output was flagged as sensitive. (E005)" or "NSFW content detected".
_SAFETY = re.compile(r"nsfw|flagged|sensitive|safety|moderation|inappropriate|content polic", re.IGNORECASE)
_ERROR_CODE = re.compile(r"\b(E\d{3,5})\b")
# A log line that starts with a percentage, or says "progress" before one.
_PERCENT = re.compile(r"^\s*(?:progress\W*)?(\d{1,3}(?:\.\d+)?)\s*%", re.IGNORECASE | re.MULTILINE)


@dataclass
class _Exchange:
    """One call's request and response facts, shared with the httpx event hooks of this task."""

    idempotency_key: str = ""
    retry_after: float | None = None


_exchange: contextvars.ContextVar[_Exchange | None] = contextvars.ContextVar(
    "replicate_exchange", default=None
)


async def _on_request(request: httpx.Request) -> None:
    exchange = _exchange.get()
    if exchange is not None and exchange.idempotency_key and request.method == "POST":
        request.headers["Idempotency-Key"] = exchange.idempotency_key


async def _on_response(response: httpx.Response) -> None:
    exchange = _exchange.get()
    if exchange is not None and response.status_code == 429:
        exchange.retry_after = retry_after_seconds(response.headers.get("retry-after"))


def provider_error(error: Exception, exchange: _Exchange | None = None) -> ProviderError:
    """The kit's reading of an error of the replicate client (or of httpx beneath it)."""
    if isinstance(error, ReplicateError):
        status = error.status or 0
        message = error.detail or error.title or f"HTTP {status}"
        if status in (401, 403):
            return ProviderError(ErrorKind.AUTH, message, status)
        if status == 404:
            return ProviderError(ErrorKind.NOT_FOUND, message, status)
        if status == 429:
            retry_after = exchange.retry_after if exchange else None
            return ProviderError(ErrorKind.RATE_LIMITED, message, status, retry_after=retry_after)
        if status in (502, 503, 504):
            return ProviderError(ErrorKind.UNAVAILABLE, message, status)
        if status >= 500 or status in (408, 409):
            return ProviderError(ErrorKind.AMBIGUOUS, message, status)
        return ProviderError(ErrorKind.REFUSED, message, status)
    # Nothing left this side: safe to send again.
    if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return ProviderError(ErrorKind.UNAVAILABLE, f"no connection to Replicate: {error!r}")
    # Sent, and no (whole) answer: it may have been acted on.
    if isinstance(error, httpx.TimeoutException):
        return ProviderError(ErrorKind.AMBIGUOUS, f"Replicate did not answer in time: {error!r}")
    if isinstance(error, httpx.TransportError):
        return ProviderError(ErrorKind.AMBIGUOUS, f"the connection to Replicate broke: {error!r}")
    if isinstance(error, ValueError):  # an answer that is not the JSON it should be
        return ProviderError(ErrorKind.AMBIGUOUS, f"Replicate's answer could not be read: {error}")
    raise error


def _input_mapping(text: str) -> dict[str, str]:
    try:
        mapping = json.loads(text)
    except ValueError as error:
        raise ConfigurationError(f"AIPROD_REPLICATE_INPUT_MAPPING: not JSON: {error}") from None
    if not isinstance(mapping, dict):
        raise ConfigurationError("AIPROD_REPLICATE_INPUT_MAPPING: must be a JSON object")
    unknown = sorted(set(mapping) - set(FIELDS))
    if unknown:
        raise ConfigurationError(
            f"AIPROD_REPLICATE_INPUT_MAPPING: unknown fields {', '.join(unknown)}; known: {', '.join(FIELDS)}"
        )
    bad = sorted(field for field, key in mapping.items() if not isinstance(key, str) or not key.strip())
    if bad:
        raise ConfigurationError(
            f"AIPROD_REPLICATE_INPUT_MAPPING: the model's input key for {', '.join(bad)} must be a non-empty string"
        )
    if "prompt" not in mapping:
        raise ConfigurationError(
            "AIPROD_REPLICATE_INPUT_MAPPING: must map prompt to the model's prompt input"
        )
    keys = list(mapping.values())
    if len(set(keys)) != len(keys):
        raise ConfigurationError("AIPROD_REPLICATE_INPUT_MAPPING: two fields map to the same input key")
    return mapping


class ReplicateProvider(Provider):
    backend = backend_pb2.BACKEND_REPLICATE
    name = "replicate"

    def __init__(
        self, settings: ReplicateSettings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        """transport: what the replicate client sends through (tests give a fake one)."""
        if not _MODEL_NAME.fullmatch(settings.model):
            raise ConfigurationError(
                f"AIPROD_REPLICATE_MODEL: {settings.model!r} is not a model name of the form owner/name"
            )
        self._settings = settings
        self._mapping = _input_mapping(settings.input_mapping)
        self._model = MODELS.get(settings.model, GENERIC_MODEL)
        self.frame_rate = self._model.frame_rate
        if self._model.frames is not None:
            self._frames = self._model.frames
        elif "aspect_ratio" in self._mapping:
            self._frames = dict(FRAME_SIZES_720P)
        else:  # the model's default shape, whatever we would like
            self._frames = {render_pb2.ASPECT_RATIO_16_9: FRAME_SIZES_720P[render_pb2.ASPECT_RATIO_16_9]}
        # The client retries GETs on 429/503/504 by itself, never a POST: the kit decides what a create
        # may be sent again. The Idempotency-Key header goes on through a request hook.
        # The client takes no httpx client of ours, but our transport, so that aclose can close it.
        self._transport = transport or httpx.AsyncHTTPTransport()
        self._client = replicate.Client(
            api_token=settings.api_token.get_secret_value() or None,
            base_url=settings.base_url,
            timeout=httpx.Timeout(settings.request_timeout_seconds),
            transport=self._transport,
            event_hooks={"request": [_on_request], "response": [_on_response]},
        )
        self._downloads = httpx.AsyncClient(timeout=settings.request_timeout_seconds, follow_redirects=True)

    def missing_configuration(self) -> list[str]:
        return [] if self._settings.api_token.get_secret_value() else ["REPLICATE_API_TOKEN"]

    def capabilities(self) -> renderer_pb2.Capabilities:
        durations = self._model.durations
        return renderer_pb2.Capabilities(
            backend=self.backend,
            models=[self._settings.model],
            min_duration_seconds=min(durations),
            max_duration_seconds=max(durations),
            allowed_durations_seconds=durations,
            aspect_ratios=list(self._frames),
            resolutions=["720p"],
            image_input="first_frame" in self._mapping,
            audio=False,
            price_per_second=usd(round(self._settings.price_per_second_usd * MICROS_PER_UNIT)),
            nominal_quality=NOMINAL_QUALITY,
            max_prompt_characters=self._settings.max_prompt_characters,
            max_image_bytes=self._settings.max_image_bytes,
        )

    def charge_micros(
        self, shot: render_pb2.Shot, task: ProviderTask | None, *, model: str = "", cancelled: bool = False
    ) -> int:
        """Replicate's billing of a model priced per second of output (the configured price):

        - succeeded: price per second * the output's duration (the shot's: the model renders the
          durations its capabilities allow);
        - failed or canceled (by this renderer or at Replicate): 0;
        - a prediction Replicate no longer knows: the list price, the worst case.
        """
        if task is None and not cancelled:
            return self.list_price_micros(shot)
        if not cancelled and task is not None and task.state == TaskState.SUCCEEDED:
            return self.list_price_micros(shot)
        return 0

    def frame_size(self, shot: render_pb2.Shot) -> tuple[int, int]:
        return self._frames[shot.aspect_ratio or render_pb2.ASPECT_RATIO_16_9]

    def model_input(self, shot: render_pb2.Shot) -> dict[str, Any]:
        """The prediction's input: the mapped fields of the shot, under the model's names."""
        values: dict[str, Any] = {
            "prompt": shot.prompt,
            "duration_seconds": round(shot.duration_seconds),
            "aspect_ratio": _RATIO_NAMES[shot.aspect_ratio or render_pb2.ASPECT_RATIO_16_9],
            "seed": shot.seed % _SEED_MODULUS,
        }
        if shot.first_frame.data or shot.first_frame.uri:
            if "first_frame" not in self._mapping:
                raise ProviderError(ErrorKind.REFUSED, f"{self._settings.model} takes no first frame")
            values["first_frame"] = _image(shot.first_frame)
        return {key: values[field] for field, key in self._mapping.items() if field in values}

    async def create(self, shot: render_pb2.Shot, model: str, idempotency_key: str) -> str:
        model_input = self.model_input(shot)
        exchange = _Exchange(idempotency_key=idempotency_key)
        token = _exchange.set(exchange)
        try:
            prediction = await self._client.predictions.async_create(model=model, input=model_input)
        except (ReplicateError, httpx.HTTPError, ValueError) as error:
            # A created prediction whose answer could not be read (ValueError) is ambiguous too.
            raise provider_error(error, exchange) from error
        finally:
            _exchange.reset(token)
        return prediction.id

    async def get(self, task_id: str) -> ProviderTask:
        exchange = _Exchange()
        token = _exchange.set(exchange)
        try:
            prediction = await self._client.predictions.async_get(task_id)
        except _VALIDATION_ERRORS as error:
            if any(issue["loc"][:1] == ("status",) for issue in error.errors()):
                # A status client 1.0.7 does not know: the API's "aborted" (ended before it started).
                return ProviderTask(
                    TaskState.FAILED, failure_code="ABORTED", failure_message=f"prediction ended: {error}"
                )
            raise provider_error(error, exchange) from error
        except (ReplicateError, httpx.HTTPError, ValueError) as error:
            raise provider_error(error, exchange) from error
        finally:
            _exchange.reset(token)
        return task_of(prediction)

    async def cancel(self, task_id: str) -> bool:
        exchange = _Exchange()
        token = _exchange.set(exchange)
        try:
            await self._client.predictions.async_cancel(task_id)
        except (ReplicateError, httpx.HTTPError, ValueError) as error:
            raise provider_error(error, exchange) from error
        finally:
            _exchange.reset(token)
        return True

    async def probe(self) -> None:
        exchange = _Exchange()
        token = _exchange.set(exchange)
        try:
            await self._client.accounts.async_current()
        except (ReplicateError, httpx.HTTPError, ValueError) as error:
            raise provider_error(error, exchange) from error
        finally:
            _exchange.reset(token)

    async def download(self, source: VideoSource, destination: Path) -> None:
        await download_url(self._downloads, source.url, destination)

    async def aclose(self) -> None:
        await self._transport.aclose()
        await self._downloads.aclose()


def task_of(prediction: Prediction) -> ProviderTask:
    """A prediction in the kit's terms."""
    state = _STATES[prediction.status]
    if state == TaskState.SUCCEEDED:
        return ProviderTask(
            state, 1.0, outputs=tuple(VideoSource(url=url) for url in output_urls(prediction.output))
        )
    if state == TaskState.FAILED:
        message = str(prediction.error or "") or "the prediction failed"
        return ProviderTask(state, failure_code=failure_code(message), failure_message=message)
    if state == TaskState.RUNNING:
        return ProviderTask(state, progress_of(prediction))
    return ProviderTask(state)


def output_urls(output: object) -> list[str]:
    """The URLs in a prediction's output: a URL, a list of them, or an object of named ones."""
    if isinstance(output, str):
        return [output] if output else []
    if isinstance(output, list | tuple):
        return [url for item in output for url in output_urls(item)]
    if isinstance(output, dict):
        urls = [url for value in output.values() for url in output_urls(value)]
        # A video first, before any poster image or the like.
        return sorted(urls, key=lambda url: not url.split("?")[0].lower().endswith((".mp4", ".mov", ".webm")))
    return []


def failure_code(message: str) -> str:
    """A code the kit classifies: content-moderation refusals are SAFETY.INPUT unless only the output
    is named (SAFETY.OUTPUT); otherwise the model's own code (MiniMax's "E005"...) when it gives one."""
    if _SAFETY.search(message):
        lowered = message.lower()
        if "output" in lowered and not re.search(r"input|prompt|image", lowered):
            return "SAFETY.OUTPUT"
        return "SAFETY.INPUT"
    code = _ERROR_CODE.search(message)
    return code.group(1) if code else ""


def progress_of(prediction: Prediction) -> float:
    """The last progress in the logs (tqdm's bar, else a line starting with a percentage or with
    "progress"); 0 when the logs give none.
    Below 1 while running: 1 means finished."""
    logs = prediction.logs or ""
    parsed = Prediction.Progress.parse(logs) if logs else None
    if parsed is not None:
        fraction = parsed.percentage  # already a fraction, despite the name
    else:
        found = _PERCENT.findall(logs)
        fraction = float(found[-1]) / 100 if found else 0.0
    return min(max(fraction, 0.0), 0.99)


def _image(image: render_pb2.Image) -> str:
    if image.uri:
        if not image.uri.startswith(("https://", "http://", "data:")):
            raise ProviderError(
                ErrorKind.REFUSED,
                "Replicate takes a first frame inline or at an http(s) URL, not " + image.uri,
            )
        return image.uri
    return f"data:{image.mime_type or 'image/png'};base64,{base64.b64encode(image.data).decode()}"
