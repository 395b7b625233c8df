"""What a provider adapter implements, in the kit's terms; the kit does the rest (idempotency, one poll
loop, limits, retries, the breaker, health, durable outputs, QC)."""

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from aiprod.common.v1 import render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.capabilities import FRAME_SIZES_720P


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
    data: bytes = b""
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


@dataclass
class ProviderError(Exception):
    kind: ErrorKind
    message: str
    status: int | None = None
    retry_after: float | None = None
    provider_code: str = ""
    details: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        status = f" (HTTP {self.status})" if self.status else ""
        return f"{self.kind.value}{status}: {self.message}"

    @property
    def safe_to_resend(self) -> bool:
        return self.kind in (ErrorKind.RATE_LIMITED, ErrorKind.UNAVAILABLE)


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
        """The frame size the provider delivers for the shot (720p unless a provider says otherwise)."""
        return FRAME_SIZES_720P[shot.aspect_ratio or render_pb2.ASPECT_RATIO_16_9]

    def list_price_micros(self, shot: render_pb2.Shot) -> int:
        """The list price of the shot: price per second times its duration."""
        return round(self.capabilities().price_per_second.amount_micros * shot.duration_seconds)

    @abstractmethod
    def charge_micros(
        self, shot: render_pb2.Shot, task: ProviderTask | None, *, cancelled: bool = False
    ) -> int:
        """What the provider bills for a task that has ended, in micro-USD: this provider's billing
        rules, in one place. task: the task as last seen (None when the provider no longer knows it);
        cancelled: this renderer cancelled it (whatever state it was seen in before)."""
