"""What a provider adapter implements, in the kit's terms; the kit does the rest (idempotency, one poll
loop, limits, retries, the breaker, health, durable outputs, QC)."""

import email.utils
import enum
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiprod.common.v1 import render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.capabilities import find_offer, frame_size, offers
from aiprod_kit.settings import ConfigurationError, ProviderSettings


class TaskState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class VideoSource:
    """Where a provider put an output: exactly one of url, data or gcs_uri."""

    url: str = ""
    # The video itself, when the provider answers with it (Veo). Emptied once copied to disk: an output
    # may wait a while for its turn at QC, and thousands waiting must not each hold their video here.
    data: bytearray = field(default_factory=bytearray)
    gcs_uri: str = ""


@dataclass(frozen=True)
class ProviderTask:
    """A provider task as last seen."""

    state: TaskState
    progress: float = 0.0
    outputs: tuple[VideoSource, ...] = ()
    # The provider's own failure code and message, such as Runway's "SAFETY.INPUT.TEXT".
    failure_code: str = ""
    failure_message: str = ""
    # What the provider says the task cost, in micro-USD, when it says so.
    cost_micros: int | None = None


class ErrorKind(enum.Enum):
    # The provider refused the request as it is (400-class): no retry can help.
    REFUSED = "refused"
    # Credentials missing or rejected (401/403).
    AUTH = "auth"
    # Rate limited (429): retry after a while, honouring Retry-After.
    RATE_LIMITED = "rate_limited"
    # The provider did not take the request (502/503/504, connection refused): safe to send again.
    UNAVAILABLE = "unavailable"
    # The request may or may not have been acted on (timeout after sending, dropped connection, 500):
    # sending a create again could pay twice.
    AMBIGUOUS = "ambiguous"
    # The task does not exist at the provider.
    NOT_FOUND = "not_found"


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds, from either of its forms (seconds, or an HTTP date)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


@dataclass
class ProviderError(Exception):
    kind: ErrorKind
    message: str
    status: int | None = None
    retry_after: float | None = None
    provider_code: str = ""
    details: dict[str, str] = field(default_factory=dict)
    # Timed out while this process was too busy to hear the answer: not the provider's failure.
    overloaded: bool = False

    def __str__(self) -> str:
        status = f" (HTTP {self.status})" if self.status else ""
        return f"{self.kind.value}{status}: {self.message}"

    @property
    def safe_to_resend(self) -> bool:
        return self.kind in (ErrorKind.RATE_LIMITED, ErrorKind.UNAVAILABLE)


def tabled_offers(
    settings: ProviderSettings, variable_prefix: str, resolutions: Mapping[str, tuple[str, ...]]
) -> list[tuple[str, str]]:
    """The (model, resolution) offers the settings name, checked against a provider's table of models
    and the resolutions each renders; ConfigurationError naming the variable for one it lacks."""
    offered = settings.offered()
    for index, (model, resolution) in enumerate(offered):
        variable = f"{variable_prefix}MODEL" if index == 0 else f"{variable_prefix}OFFERS"
        if model not in resolutions:
            raise ConfigurationError(f"{variable}: unknown model {model!r}; known: {', '.join(resolutions)}")
        if resolution not in resolutions[model]:
            raise ConfigurationError(
                f"{variable}: {model} renders {', '.join(resolutions[model])}, not {resolution!r}"
            )
    return offered


class Provider(ABC):
    """One provider's API, mapped onto tasks. Every method raises ProviderError for provider failures."""

    # The backend this provider renders for, and the name used in logs and metric labels.
    backend: int
    name: str
    # The frame rate its videos come at, for QC.
    frame_rate: float = 24.0

    @abstractmethod
    def capabilities(self) -> renderer_pb2.Capabilities: ...

    @abstractmethod
    def missing_configuration(self) -> list[str]:
        """The settings (environment variables) that are missing, such as ["RUNWAYML_API_SECRET"]."""

    @abstractmethod
    async def create(self, shot: render_pb2.Shot, model: str, idempotency_key: str) -> str:
        """Creates the task; returns its id at the provider. Sends idempotency_key as the
        Idempotency-Key header. Must not retry by itself: the kit decides what is safe to resend."""

    @abstractmethod
    async def get(self, task_id: str) -> ProviderTask: ...

    @abstractmethod
    async def cancel(self, task_id: str) -> bool:
        """Cancels the task; False when the provider has no cancel (the task runs to its end)."""

    @abstractmethod
    async def probe(self) -> None:
        """A cheap authenticated call, to check credentials and reachability."""

    @abstractmethod
    async def download(self, source: VideoSource, destination: Path) -> None:
        """Writes the output to destination (a local temporary file)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Closes the provider's clients."""

    def frame_size(self, shot: render_pb2.Shot) -> tuple[int, int]:
        """The frame size the provider delivers for the shot: its aspect ratio at its resolution (720p
        unless the shot names another), unless a provider says otherwise."""
        return frame_size(shot)

    def offer(self, model: str, resolution: str) -> renderer_pb2.ModelOffer:
        """The offer a render of model (empty: the default) at resolution (empty: the model's first)
        uses; the default offer for one this backend does not have (StartRender refuses those)."""
        capabilities = self.capabilities()
        default = offers(capabilities)[0]
        return find_offer(capabilities, model or default.model, resolution) or default

    def list_price_micros(self, shot: render_pb2.Shot, model: str = "") -> int:
        """The list price of the shot with model (empty: the default) at the shot's resolution: the
        offer's price per second times the shot's duration."""
        price = self.offer(model, shot.resolution).price_per_second.amount_micros
        return round(price * shot.duration_seconds)

    @abstractmethod
    def charge_micros(
        self, shot: render_pb2.Shot, task: ProviderTask | None, *, model: str = "", cancelled: bool = False
    ) -> int:
        """What the provider bills for a task that has ended, in micro-USD: this provider's billing
        rules, in one place. task: the task as last seen (None when the provider no longer knows it);
        model: the model the task used (empty: the default); cancelled: this renderer cancelled it
        (whatever state it was seen in before)."""
