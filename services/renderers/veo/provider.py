"""Veo on Vertex AI through `google-genai` (the only client that reaches Veo's long-running predict calls).

- create: `models.generate_videos` (`:predictLongRunning`); the task id is the operation's full name.
- get: `operations.get` on an operation rebuilt from that name (`:fetchPredictOperation`).
- Vertex has no cancel: `cancel` says so and the kit stops following the task.
- Outputs come back inline (base64 in the operation) unless a storage URI was asked for; both are read.
- Reference images (`GenerateVideosConfig.reference_images`, "asset" images of a person, character or
  product) go with a shot where Vertex takes them: a Veo 3.1 model, up to three, an 8 s clip, no first
  frame. Elsewhere they are dropped and the shot renders from its prompt alone, as the contract says of a
  backend that takes none: they guide how the video looks, they are not part of it, so the clip is still
  the one asked for (a first frame is part of it, and wins). More images than the model takes is a
  request error, refused before anything is sent.
- Vertex reports no progress and no cost: progress is the operation metadata's when it has one, else 0;
  the cost is the list price of the requested seconds (with or without audio).

The client's own retries are off (including google-genai's implicit resend after a dropped aiohttp
connection, which would otherwise send a create twice): the kit decides what is safe to send again.
"""

import asyncio
import json
import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import google.auth
import google.auth.credentials
import httpx
import structlog
from google.auth import exceptions as auth_exceptions
from google.genai import Client, errors, types
from google.oauth2.credentials import Credentials as TokenCredentials

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.capabilities import DEFAULT_RESOLUTION, RESOLUTION_QUALITY, with_offers
from aiprod_kit.money import usd_from_units
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
from aiprod_kit.settings import ConfigurationError, VeoSettings

try:  # google-genai talks aiohttp when it is installed (it is: a dependency), else httpx.
    import aiohttp
except ImportError:  # pragma: no cover
    aiohttp = None  # type: ignore[assignment]

log = structlog.get_logger()

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
# The operation fetched by the probe: a well-formed name that never exists, so that an authenticated
# Vertex answers 404 (a rejected token answers 401/403 first).
PROBE_OPERATION_ID = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class VeoModel:
    durations: tuple[int, ...]
    resolutions: tuple[str, ...]
    # List prices in USD per second of video, with and without generated audio.
    usd_per_second_audio: float
    usd_per_second_silent: float
    quality: float
    # How many "asset" reference images a render takes (Veo 3.1: three); 0: none.
    max_reference_images: int = 0


_ASPECT_RATIOS = {render_pb2.ASPECT_RATIO_16_9: "16:9", render_pb2.ASPECT_RATIO_9_16: "9:16"}
# Vertex AI list prices at the time of writing (cloud.google.com/vertex-ai/generative-ai/pricing).
MODELS = {
    "veo-3.0-generate-001": VeoModel((4, 6, 8), ("720p", "1080p"), 0.40, 0.20, 0.92),
    "veo-3.0-fast-generate-001": VeoModel((4, 6, 8), ("720p", "1080p"), 0.15, 0.10, 0.86),
    "veo-3.1-generate-preview": VeoModel((4, 6, 8), ("720p", "1080p"), 0.40, 0.20, 0.93, 3),
    "veo-3.1-fast-generate-preview": VeoModel((4, 6, 8), ("720p", "1080p"), 0.15, 0.10, 0.88, 3),
    "veo-3.1-generate-001": VeoModel((4, 6, 8), ("720p", "1080p"), 0.40, 0.20, 0.93, 3),
    "veo-3.1-fast-generate-001": VeoModel((4, 6, 8), ("720p", "1080p"), 0.15, 0.10, 0.88, 3),
    # Lite: one price with or without audio; the cheapest Veo, for drafts and social clips.
    "veo-3.1-lite-generate-001": VeoModel((4, 6, 8), ("720p", "1080p"), 0.05, 0.05, 0.8),
}
# Veo's prompt takes up to 1024 tokens: about 4000 characters of English. An inline image rides in the
# request, which Vertex AI caps at about 20 MB (base64 makes it a third larger).
MAX_PROMPT_CHARACTERS = 4000
MAX_IMAGE_BYTES = 15 * 1024 * 1024
# Vertex takes reference images on clips of this length only.
REFERENCE_CLIP_SECONDS = 8

# google.rpc.Code names, for the failure codes of failed operations.
_RPC_CODES = {
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}
# How Vertex words a Responsible AI refusal ("... violate Google's Responsible AI practices ...",
# "... usage guidelines ...", "sensitive words", "filtered").
_SAFETY_WORDS = re.compile(
    r"responsible ai|usage guidelines|safety|sensitive|violat|harmful|\brai\b|filtered|celebrity|"
    r"child|prohibited",
    re.IGNORECASE,
)
# A refusal of what was sent (prompt or image) rather than of what was generated.
_INPUT_WORDS = re.compile(r"\bprompt\b|\binput\b|sensitive words", re.IGNORECASE)
# "... Support codes: 58061214, 17301594"
_SUPPORT_CODES = re.compile(r"support codes?:\s*(\d+)", re.IGNORECASE)


def _retry_after(error: errors.APIError) -> float | None:
    headers = getattr(error.response, "headers", None)
    return retry_after_seconds(headers.get("retry-after") if headers is not None else None)


def provider_error(error: BaseException) -> ProviderError:
    """The kit's reading of what google-genai (or its transport, or google-auth) raised."""
    if isinstance(error, ProviderError):
        return error
    if isinstance(error, errors.APIError):
        status = int(error.code) if isinstance(error.code, int) else None
        code = str(error.status or "")
        message = str(error.message or error)
        if status in (401, 403):
            return ProviderError(ErrorKind.AUTH, message, status, provider_code=code)
        if status == 404:
            return ProviderError(ErrorKind.NOT_FOUND, message, status, provider_code=code)
        if status == 429:
            return ProviderError(
                ErrorKind.RATE_LIMITED, message, status, retry_after=_retry_after(error), provider_code=code
            )
        if status in (502, 503, 504):
            return ProviderError(ErrorKind.UNAVAILABLE, message, status, provider_code=code)
        if status is None or status >= 500 or status in (408, 409):
            return ProviderError(ErrorKind.AMBIGUOUS, message, status, provider_code=code)
        return ProviderError(ErrorKind.REFUSED, message, status, provider_code=code)
    if isinstance(error, auth_exceptions.RefreshError):
        # Application Default Credentials that can no longer get a token (revoked, expired key).
        return ProviderError(ErrorKind.AUTH, f"the Google credentials were refused: {error}")
    if isinstance(error, auth_exceptions.TransportError):
        # The token could not be fetched: nothing was sent to Vertex.
        return ProviderError(ErrorKind.UNAVAILABLE, f"no access token: {error}")
    if aiohttp is not None:
        # No connection, or none in time: the request never left.
        if isinstance(error, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            return ProviderError(ErrorKind.UNAVAILABLE, f"Vertex AI is unreachable: {error}")
        if isinstance(error, TimeoutError):
            return ProviderError(ErrorKind.AMBIGUOUS, "Vertex AI did not answer in time")
        if isinstance(error, aiohttp.ClientError):
            # Reset or closed after the request went out: it may have been acted on.
            return ProviderError(ErrorKind.AMBIGUOUS, f"the connection to Vertex AI broke: {error!r}")
    if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
        return ProviderError(ErrorKind.UNAVAILABLE, f"Vertex AI is unreachable: {error}")
    if isinstance(error, httpx.TimeoutException | TimeoutError):
        return ProviderError(ErrorKind.AMBIGUOUS, "Vertex AI did not answer in time")
    if isinstance(error, httpx.TransportError):
        return ProviderError(ErrorKind.AMBIGUOUS, f"the connection to Vertex AI broke: {error!r}")
    if isinstance(error, ValueError | errors.UnknownApiResponseError | json.JSONDecodeError):
        # An answer that could not be read: whatever it said may have happened.
        return ProviderError(ErrorKind.AMBIGUOUS, f"unreadable answer from Vertex AI: {error}")
    # Anything else (the client's RuntimeError when no token comes, a bug): the request may have gone.
    log.warning("unexpected error from google-genai", exc_info=error)
    return ProviderError(ErrorKind.AMBIGUOUS, f"unexpected error from the Vertex AI client: {error!r}")


def _credentials(settings: VeoSettings) -> tuple[google.auth.credentials.Credentials | None, str]:
    """The bearer token when one is given, else Application Default Credentials; (None, why) if none."""
    token = settings.access_token.get_secret_value()
    if token:
        return TokenCredentials(token=token), ""
    try:
        credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
    except auth_exceptions.DefaultCredentialsError as error:
        return None, str(error)
    return credentials, ""


class VeoProvider(Provider):
    backend = backend_pb2.BACKEND_VEO
    name = "veo"
    frame_rate = 24.0

    def __init__(self, settings: VeoSettings) -> None:
        offered = tabled_offers(
            settings, "AIPROD_VEO_", {name: model.resolutions for name, model in MODELS.items()}
        )
        if not settings.project:
            raise ConfigurationError(
                "GOOGLE_CLOUD_PROJECT: the Google Cloud project for Vertex AI is not set"
            )
        if not settings.location:
            raise ConfigurationError("GOOGLE_CLOUD_LOCATION: the Vertex AI region is empty")
        self._settings = settings
        self._capabilities = with_offers(
            self.backend,
            [self._offer(model, resolution) for model, resolution in offered],
            max_prompt_characters=MAX_PROMPT_CHARACTERS,
            max_image_bytes=MAX_IMAGE_BYTES,
        )
        self._credentials, why = _credentials(settings)
        self._client: Client | None = None
        self._downloads = httpx.AsyncClient(timeout=settings.request_timeout_seconds, follow_redirects=True)
        if self._credentials is None:
            log.error("no Google credentials", backend=self.name, error=why)
            return
        timeout_ms = max(1, round(settings.request_timeout_seconds * 1000))
        self._client = Client(
            vertexai=True,
            project=settings.project,
            location=settings.location,
            credentials=self._credentials,
            http_options=types.HttpOptions(
                base_url=settings.base_url or None,
                timeout=timeout_ms,
                # One attempt, and (because retry options are set) no implicit resend after a broken
                # aiohttp connection either.
                retry_options=types.HttpRetryOptions(attempts=1),
            ),
        )

    # Description ------------------------------------------------------------------------------

    def missing_configuration(self) -> list[str]:
        return [] if self._credentials is not None else ["GOOGLE_APPLICATION_CREDENTIALS"]

    def _offer(self, name: str, resolution: str) -> renderer_pb2.ModelOffer:
        model = MODELS[name]
        audio = self._settings.generate_audio
        return renderer_pb2.ModelOffer(
            model=name,
            resolution=resolution,
            # Vertex prices 720p and 1080p alike.
            price_per_second=usd_from_units(
                model.usd_per_second_audio if audio else model.usd_per_second_silent
            ),
            nominal_quality=round(model.quality + RESOLUTION_QUALITY[resolution], 4),
            min_duration_seconds=min(model.durations),
            max_duration_seconds=max(model.durations),
            allowed_durations_seconds=model.durations,
            aspect_ratios=list(_ASPECT_RATIOS),
            image_input=True,
            audio=audio,
            max_reference_images=model.max_reference_images,
        )

    def capabilities(self) -> renderer_pb2.Capabilities:
        return self._capabilities

    def charge_micros(
        self, shot: render_pb2.Shot, task: ProviderTask | None, *, model: str = "", cancelled: bool = False
    ) -> int:
        """Vertex AI's billing of Veo, per second of video delivered:

        - done with videos: price per second * duration * the number of videos;
        - done with an error, or every video held back by the Responsible AI filters
          (raiMediaFilteredCount): 0;
        - cancelled: Vertex has no cancel, the operation runs on and bills if it succeeds, so the
          charge is the full list price of the one video asked for (the worst case);
        - an operation Vertex no longer knows: the full list price, the worst case.
        """
        if cancelled or task is None:
            return self.list_price_micros(shot, model)
        if task.state == TaskState.SUCCEEDED:
            return self.list_price_micros(shot, model) * len(task.outputs)
        return 0

    # Calls --------------------------------------------------------------------------------------

    def _vertex(self) -> Client:
        if self._client is None:
            raise ProviderError(ErrorKind.AUTH, "no Google credentials: set GOOGLE_APPLICATION_CREDENTIALS")
        return self._client

    async def create(self, shot: render_pb2.Shot, model: str, idempotency_key: str) -> str:
        client = self._vertex()
        # Read before anything is sent: an image that cannot be had fails here, safely.
        image = await self._image(shot.first_frame) if _has_image(shot.first_frame) else None
        references = await self._reference_images(shot, model)
        config = types.GenerateVideosConfig(
            number_of_videos=1,
            duration_seconds=round(shot.duration_seconds),
            aspect_ratio=_ASPECT_RATIOS[shot.aspect_ratio or render_pb2.ASPECT_RATIO_16_9],
            resolution=shot.resolution or DEFAULT_RESOLUTION,
            generate_audio=self._settings.generate_audio,
            # Vertex takes a uint32 seed.
            seed=shot.seed % 2**32,
            reference_images=references,
            http_options=types.HttpOptions(headers={"Idempotency-Key": idempotency_key}),
        )
        try:
            operation = await client.aio.models.generate_videos(
                model=model, source=types.GenerateVideosSource(prompt=shot.prompt, image=image), config=config
            )
        except Exception as error:
            raise provider_error(error) from error
        if not operation.name:
            # Vertex took the request (200) but named no operation: it may be rendering, unfollowable.
            raise ProviderError(ErrorKind.AMBIGUOUS, "Vertex AI answered without an operation name")
        return operation.name

    async def get(self, task_id: str) -> ProviderTask:
        client = self._vertex()
        if "/operations/" not in task_id:
            raise ProviderError(ErrorKind.NOT_FOUND, f"{task_id!r} is not a Vertex AI operation name")
        try:
            operation = await client.aio.operations.get(types.GenerateVideosOperation(name=task_id))
        except Exception as error:
            raise provider_error(error) from error
        return task_of(operation)

    async def cancel(self, task_id: str) -> bool:
        # Vertex AI has no cancel for Veo operations: the render runs (and is billed) to its end.
        return False

    async def probe(self) -> None:
        """Fetches an operation that does not exist: 404 (or 400) means reachable and authenticated."""
        name = (
            f"projects/{self._settings.project}/locations/{self._settings.location}/publishers/google/"
            f"models/{self._settings.model}/operations/{PROBE_OPERATION_ID}"
        )
        try:
            await self.get(name)
        except ProviderError as error:
            if error.kind in (ErrorKind.NOT_FOUND, ErrorKind.REFUSED):
                return
            raise

    async def download(self, source: VideoSource, destination: Path) -> None:
        if source.data:
            await asyncio.to_thread(destination.write_bytes, source.data)
        elif source.gcs_uri:
            await asyncio.to_thread(self._download_gcs, source.gcs_uri, destination)
        elif source.url:
            await download_url(self._downloads, source.url, destination)
        else:
            raise ProviderError(ErrorKind.REFUSED, "the operation named no video")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aio.aclose()
        await self._downloads.aclose()

    # Helpers ------------------------------------------------------------------------------------

    def _download_gcs(self, uri: str, destination: Path) -> None:
        """Blocking: copies gs://bucket/object to destination with the renderer's own credentials."""
        from google.api_core import exceptions as api_exceptions
        from google.cloud import storage

        bucket, _, name = uri.removeprefix("gs://").partition("/")
        try:
            client = storage.Client(project=self._settings.project, credentials=self._credentials)
            client.bucket(bucket).blob(name).download_to_filename(
                str(destination), timeout=self._settings.request_timeout_seconds
            )
        except api_exceptions.NotFound as error:
            raise ProviderError(ErrorKind.REFUSED, f"the output {uri} is gone", 404) from error
        except (api_exceptions.Forbidden, api_exceptions.Unauthorized) as error:
            raise ProviderError(ErrorKind.AUTH, f"the output {uri} may not be read: {error}") from error
        except Exception as error:
            raise ProviderError(
                ErrorKind.UNAVAILABLE, f"the output {uri} could not be fetched: {error}"
            ) from error

    async def _reference_images(
        self, shot: render_pb2.Shot, model: str
    ) -> list[types.VideoGenerationReferenceImage] | None:
        """The shot's reference images as Vertex takes them, or None where it takes none (module docstring)."""
        count = len(shot.reference_images)
        if not count:
            return None
        most = MODELS[model].max_reference_images
        if count > most > 0:
            raise ProviderError(
                ErrorKind.REFUSED,
                f"{model} takes at most {most} reference images, not {count}",
            )
        if not most:
            dropped = f"{model} takes no reference images"
        elif _has_image(shot.first_frame):
            dropped = "Vertex takes no reference images beside a first frame"
        elif round(shot.duration_seconds) != REFERENCE_CLIP_SECONDS:
            dropped = f"Vertex takes reference images on {REFERENCE_CLIP_SECONDS} s clips only"
        else:
            return [
                types.VideoGenerationReferenceImage(
                    image=await self._image(image, f"reference image {index + 1}"),
                    reference_type=types.VideoGenerationReferenceType.ASSET,
                )
                for index, image in enumerate(shot.reference_images)
            ]
        log.info("reference_images_dropped", backend=self.name, count=count, why=dropped)
        return None

    async def _image(self, image: render_pb2.Image, what: str = "the first frame") -> types.Image:
        """An image (`what` names it in errors) as Vertex takes it: inline bytes, or a gs:// URI it reads
        itself."""
        if image.data:
            return types.Image(image_bytes=image.data, mime_type=image.mime_type or _sniff(image.data))
        uri = image.uri
        if uri.startswith("gs://"):
            return types.Image(gcs_uri=uri, mime_type=image.mime_type or _guess(uri))
        if uri.startswith("file://"):
            path = Path(unquote(urlparse(uri).path))
            try:
                data = await asyncio.to_thread(path.read_bytes)
            except OSError as error:
                raise ProviderError(ErrorKind.REFUSED, f"{what} {uri} cannot be read: {error}") from error
        elif uri.startswith(("https://", "http://")):
            try:
                response = await self._downloads.get(uri)
            except httpx.HTTPError as error:
                raise ProviderError(
                    ErrorKind.UNAVAILABLE, f"{what} {uri} could not be fetched: {error}"
                ) from error
            if response.status_code >= 400:
                kind = ErrorKind.UNAVAILABLE if response.status_code >= 500 else ErrorKind.REFUSED
                raise ProviderError(kind, f"{what} {uri} answered {response.status_code}")
            data = response.content
        else:
            raise ProviderError(ErrorKind.REFUSED, f"{what} {uri!r} is not a gs://, https:// or file:// URI")
        return types.Image(image_bytes=data, mime_type=image.mime_type or _sniff(data) or _guess(uri))


def task_of(operation: types.GenerateVideosOperation) -> ProviderTask:
    """A Vertex operation as a task."""
    if not operation.done:
        return ProviderTask(state=TaskState.RUNNING, progress=_progress(operation.metadata))
    if operation.error:
        code = operation.error.get("code")
        message = str(operation.error.get("message") or "")
        status = _RPC_CODES.get(code, str(code)) if isinstance(code, int) else str(code or "UNKNOWN")
        failure_code = _safety_code(message) if code in (3, 9) and _SAFETY_WORDS.search(message) else status
        return ProviderTask(state=TaskState.FAILED, failure_code=failure_code, failure_message=message)
    response = operation.response or operation.result
    videos = [item.video for item in (response.generated_videos or []) if item.video] if response else []
    outputs = tuple(source for source in map(_source, videos) if source is not None)
    if outputs:
        return ProviderTask(state=TaskState.SUCCEEDED, progress=1.0, outputs=outputs)
    if response is not None and (response.rai_media_filtered_count or response.rai_media_filtered_reasons):
        reasons = "; ".join(response.rai_media_filtered_reasons or []) or "filtered by Responsible AI"
        return ProviderTask(
            state=TaskState.FAILED, failure_code=_safety_code(reasons), failure_message=reasons
        )
    # Done without a video or a reason: the kit reports PROVIDER_NO_OUTPUT.
    return ProviderTask(state=TaskState.SUCCEEDED, progress=1.0)


def _safety_code(reason: str) -> str:
    """SAFETY.INPUT when Vertex blames the prompt or the input image, else SAFETY.OUTPUT (what it generated
    was held back); with Vertex's first support code, which names the filter's category, appended."""
    where = "INPUT" if _INPUT_WORDS.search(reason) else "OUTPUT"
    support = _SUPPORT_CODES.search(reason)
    return f"SAFETY.{where}.{support.group(1)}" if support else f"SAFETY.{where}"


def _source(video: types.Video) -> VideoSource | None:
    if video.video_bytes:
        return VideoSource(data=bytearray(video.video_bytes))
    if video.uri and video.uri.startswith("gs://"):
        return VideoSource(gcs_uri=video.uri)
    if video.uri:
        return VideoSource(url=video.uri)
    return None


def _progress(metadata: dict | None) -> float:
    """The operation's own progress when its metadata has one; Vertex's Veo operations usually do not,
    and no estimate is made up."""
    for key in ("progressPercent", "progress_percent", "progressPercentage"):
        value = (metadata or {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return min(max(float(value) / 100.0, 0.0), 0.99)
    return 0.0


def _has_image(image: render_pb2.Image) -> bool:
    return bool(image.data or image.uri)


def _sniff(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return ""


def _guess(uri: str) -> str:
    return mimetypes.guess_type(urlparse(uri).path)[0] or "image/png"
