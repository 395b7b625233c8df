"""Typed settings, read once at start-up from environment variables prefixed ``AIPROD_``."""

import contextlib
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import structlog
from pydantic import AfterValidator, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict

from aiprod_kit.tls import TlsSettings

# The documented ports of `aiprod up`; tests set 0 to get free ones.
GATEWAY_PORT = 50051
ROUTER_PORT = 50052
METRICS_PORT = 50053
LOCAL_RENDERER_PORT = 50060
RUNWAY_RENDERER_PORT = 50061
VEO_RENDERER_PORT = 50062
REPLICATE_RENDERER_PORT = 50063
SANDBOX_PORT = 50080


# The most a cap can be in USD: the ledger counts micro-dollars in 62 bits.
_MAX_USD = 2**62 / 1_000_000

# A Cloud Storage bucket name (lower case letters, digits, dots, dashes and underscores).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: those it may run on, fewer under a container's CPU limit (cgroup
    v2's cpu.max, or v1's CFS quota), rounded up. os.cpu_count() counts the node's: a pod limited to one
    CPU on a 32-core node would run 32 CPU-bound steps at once."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return cpus
    try:
        limit = math.ceil(int(quota) / int(period))
    except (ValueError, ZeroDivisionError):
        return cpus  # "max" (v2) or -1 (v1): no limit
    return max(1, min(cpus, limit)) if limit > 0 else cpus


def _bucket_name(value: str) -> str:
    if value and not _BUCKET.fullmatch(value):
        raise ValueError(f"{value[:80]!r} is not a Cloud Storage bucket name (no gs://, no path)")
    return value


# Where finished videos are kept: this Google Cloud Storage bucket when set, else under
# AIPROD_DATA_DIR/videos. Every service that writes or reads videos (the renderers, the gateway's
# stitching) reads the same variable, so that one deployment keeps them in one place.
GcsBucket = Annotated[str, Field(validation_alias="AIPROD_GCS_BUCKET"), AfterValidator(_bucket_name)]


class ConfigurationError(Exception):
    """A setting is wrong: the service cannot start. The message names the variable."""


_Settings = TypeVar("_Settings", bound=BaseSettings)


def load_settings(cls: type[_Settings]) -> _Settings:
    """cls, read from the environment; a wrong value is a ConfigurationError naming each variable and
    what is wrong with it (pydantic's words leave the value out: it may be a secret)."""
    try:
        return cls()
    except ValidationError as error:
        raise ConfigurationError("; ".join(_problem(cls, item) for item in error.errors())) from None


def _problem(cls: type[BaseSettings], error: ErrorDetails) -> str:
    # A validator's own words come as "Value error, <words>"; a check of several fields names them itself.
    said = error["msg"].removeprefix("Value error, ")
    return f"{_variable(cls, str(error['loc'][0]))}: {said}" if error["loc"] else said


def _variable(cls: type[BaseSettings], name: str) -> str:
    """The environment variable of a field (its alias, else the class's prefix and the field's name)."""
    field = cls.model_fields.get(name)
    if field is None:  # already the alias
        return name
    if isinstance(field.validation_alias, str):
        return field.validation_alias
    return f"{cls.model_config.get('env_prefix', '')}{name}".upper()


def load_settings_or_exit(cls: type[_Settings]) -> _Settings:
    """A process's settings: load_settings, a wrong value ending the process (exit_on_configuration_error)."""
    with exit_on_configuration_error():
        return load_settings(cls)


@contextlib.contextmanager
def exit_on_configuration_error() -> Iterator[None]:
    """Around a process's main: a ConfigurationError ends the process with status 2 and one log line
    saying why, not a traceback."""
    try:
        yield
    except ConfigurationError as error:
        structlog.get_logger().error("configuration error", error=str(error))
        sys.exit(2)


class CommonSettings(BaseSettings):
    """Settings every service reads."""

    model_config = SettingsConfigDict(env_prefix="AIPROD_", extra="ignore", frozen=True)

    # Address the service binds to; 0.0.0.0 in a container.
    host: str = "127.0.0.1"
    # Where durable local state lives: the job store and the videos.
    data_dir: Path = Path(".aiprod")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    # Where traces and metrics go (docs/TELEMETRY.md): nowhere; the console for local debugging; "otlp"
    # to an OpenTelemetry Collector (the GKE default; the standard OTEL_EXPORTER_OTLP_* variables say
    # where); "gcp" straight to Cloud Trace and Cloud Monitoring, for set-ups without a collector.
    otel_exporter: Literal["none", "console", "otlp", "gcp"] = "none"
    # For "gcp": the project written to (default: the Application Default Credentials' project), and an
    # emulator's plaintext host:port that takes anonymous writes (tests; never a real endpoint).
    otel_gcp_project: str = ""
    otel_gcp_emulator_host: str = ""
    # How long in-flight calls may run on after SIGTERM before they are cut.
    shutdown_grace_seconds: float = 5.0
    # The gateway's job store and the metrics service's ledger, events and alert states: a PostgreSQL
    # connection URL (postgresql://USER:PASSWORD@HOST:5432/DATABASE), one database shared by every
    # replica; empty: SQLite files under data_dir. A secret: logs and errors name its host and database.
    database_url: SecretStr = SecretStr("")
    # How long start-up waits for PostgreSQL to accept connections (it may come up with the pod).
    database_connect_timeout_seconds: float = 30.0
    # gRPC keepalive on every server and channel: a ping after this long without data, and the peer
    # given up (its calls failed, a long stream included) when the ping is not answered in the timeout.
    # A peer that vanishes without a reset (a node lost, a network partition) so ends its streams
    # instead of leaving a job following a dead one.
    grpc_keepalive_seconds: float = Field(20.0, gt=0)
    grpc_keepalive_timeout_seconds: float = Field(10.0, gt=0)
    # TLS or mutual TLS on every server and channel (AIPROD_TLS_MODE, _CERT_FILE, _KEY_FILE, _CA_FILE,
    # _SERVER_NAME: aiprod_kit/tls.py); plaintext unless set.
    tls: TlsSettings = Field(default_factory=TlsSettings)
    # A second, plaintext port that serves only the standard health service: for probes that cannot
    # speak TLS (the kubelet's gRPC probes) when the service's own port requires it; unset: none.
    health_port: int | None = Field(None, ge=0, le=65535)
    # How long an ended job's records are kept once it ended: the gateway's job with its events and plan
    # revisions, the renderers' keys of its renders; older ones are deleted, a batch at a time, by the
    # service that keeps them. A tenant's usage figures (GetUsage) outlive them, and a request id is
    # forgotten with its job. The renderers keep a key this long after its render began: a job that
    # still asks for a render so long after (its gateways all down that long) may have it sent again,
    # and a held attempt of a job that old stays held rather than be released for want of its key.
    # 0: kept forever.
    job_retention_seconds: float = Field(30 * 86400.0, ge=0)
    # How long the spend ledger keeps a settled (committed or released) reservation once it settled;
    # each day's money by tenant is kept forever, and reservations not settled are never deleted.
    # 0: kept forever.
    ledger_retention_seconds: float = Field(400 * 86400.0, ge=0)
    # How often each service deletes what is past its retention (the first time soon after it starts).
    retention_purge_interval_seconds: float = Field(600.0, gt=0)


class GatewaySettings(CommonSettings):
    gateway_port: int = GATEWAY_PORT
    router_target: str = f"localhost:{ROUTER_PORT}"
    metrics_target: str = f"localhost:{METRICS_PORT}"
    # How many jobs a gateway replica drives at once. A job waiting on its render holds a coroutine and
    # its streams, no worker (docs/performance.md measures its memory): the renders at once are bounded
    # by each renderer's concurrent tasks and each tenant's tier; this bounds the replica's memory.
    # 0: the replica drives no job (it only accepts them, for another replica to drive).
    dispatch_max_in_flight: int = Field(10_000, ge=0)
    # How many of the jobs' steps that use this replica's CPU (a film's stitching, a shot's last frame
    # for the continuous shot after it) run at once.
    dispatch_concurrency: int = Field(default_factory=usable_cpus, ge=1)
    # How many shots of one job render at once (a long video's shots render side by side, each its own
    # chain of attempts), at most the tenant's tier's concurrent jobs.
    gateway_shot_concurrency: int = Field(4, ge=1)
    # Where the gateway reads a long video's shots and stores their stitched film (GcsBucket).
    gcs_bucket: GcsBucket = ""
    # What becomes of a queued job today's budget cannot pay (the ledger refuses its reservation, or the
    # router finds every backend that could take it over the budget left): `wait` keeps it queued and
    # tries again; `fail` fails it at once with BUDGET_EXHAUSTED.
    gateway_budget_policy: Literal["wait", "fail"] = "wait"
    # How often a waiting job tries again (sooner when a job of this gateway settles and frees money).
    gateway_budget_retry_seconds: float = Field(30.0, gt=0, allow_inf_nan=False)
    # How long a job waits for budget at most, then it fails with BUDGET_EXHAUSTED; 0: no limit (until
    # it is paid or cancelled). A day: budgets are daily, so a job still unpaid after one has outlived
    # a budget reset and is not waiting out a busy day but a cap too small for it; its client hears so.
    gateway_budget_max_wait_seconds: float = Field(86400.0, ge=0, allow_inf_nan=False)
    # How long a replica's claim on a job it drives holds unless renewed (it renews every third of it):
    # the jobs of a replica that died are taken over by another once their claims run out, so within
    # about this long. Shorter: faster take-overs, more writes to the job store.
    gateway_job_lease_seconds: float = Field(30.0, gt=0, allow_inf_nan=False)
    # The Cloud Storage buckets a request's first frame may name (gs://BUCKET/...), comma-separated;
    # empty: no gs:// first frame is accepted. The renderers read them with their own credentials, so
    # an open list would let any caller have a private object rendered.
    gateway_image_buckets: str = ""
    # Whether a first frame may be a file:// path, read by the renderer from its own disk: local
    # development only (`aiprod up`); anywhere else it would hand out the renderer's files.
    gateway_allow_file_images: bool = False
    # The operators' key for AdminService (tenants and API keys); empty: AdminService refuses every call.
    gateway_admin_key: SecretStr = SecretStr("")
    # How long a resolved API key is trusted without a look at the store: a key revoked on another
    # replica stops working within this (at once on the replica that revoked it).
    gateway_key_cache_seconds: float = 5.0
    # Authentication failures a peer (an IP address) may make in a minute before each further one waits,
    # the wait doubling from 0.1 s up to the most: a wrong key in a loop cannot flood the gateway.
    gateway_auth_failures_free: int = Field(5, ge=0)
    gateway_auth_failure_max_delay_seconds: float = Field(2.0, ge=0)
    # Overrides of the SLA tiers' figures, JSON (see aiprod_gateway.tiers).
    gateway_tiers: str = ""
    # The ledger account (tenant id) that pays for the free re-renders a tier's quality minimum grants.
    gateway_sla_account: str = "aiprod-sla"
    # How long a quote binds.
    gateway_quote_ttl_seconds: float = Field(900.0, gt=0, allow_inf_nan=False)
    # How long the router's ranking for one kind of shot serves the quotes of the jobs created meanwhile
    # (each job is quoted at its creation: without it, every create waits for a PlanRoute); 0: asked
    # for every quote. Deadlines are rounded down to 10 s for it, so a cached ranking is never laxer.
    gateway_route_cache_seconds: float = Field(1.0, ge=0)
    # The backend a quote's saving is measured against, as the first version compared with Runway.
    gateway_baseline_backend: str = "runway"
    # Overrides of the presets' price limits in USD per minute of video, JSON such as
    # {"quick_social": 5.0} (see aiprod_kit.presets).
    gateway_preset_prices: str = ""

    @field_validator("gateway_image_buckets")
    @classmethod
    def _bucket_names(cls, value: str) -> str:
        for name in filter(None, (part.strip() for part in value.split(","))):
            _bucket_name(name)
        return value

    @property
    def image_buckets(self) -> frozenset[str]:
        """The buckets of gateway_image_buckets, as a set."""
        return frozenset(filter(None, (part.strip() for part in self.gateway_image_buckets.split(","))))


class RouterSettings(CommonSettings):
    router_port: int = ROUTER_PORT
    # The renderers, as comma-separated backend=target pairs.
    renderers: str = f"local=localhost:{LOCAL_RENDERER_PORT}"
    metrics_target: str = f"localhost:{METRICS_PORT}"
    # Attempts per render, first one included, across backends.
    router_max_attempts: int = 3
    # The router's breaker per backend: consecutive failures, or a failure ratio over a window of
    # recent renders, open it for the cooldown; then one trial render decides.
    router_breaker_failures: int = 3
    router_breaker_failure_ratio: float = 0.5
    router_breaker_window: int = 10
    router_breaker_cooldown_seconds: float = 30.0
    # Whether a render refused for input safety tries another backend (off: the prompt is the problem).
    router_fallback_on_safety: bool = False
    # How long to wait for a vanished renderer to come back before giving its render up as uncertain.
    router_reattach_seconds: float = 30.0
    # From this much of today's budget left, the best quality ranks first (the first version used 35);
    # 0: always the cheapest render that meets the floor.
    router_quality_first_budget_usd: float = 0.0


class MetricsSettings(CommonSettings):
    metrics_port: int = METRICS_PORT
    # The day's cap on every tenant's spend together, in USD; 0 means no cap. 90 USD is the product's
    # historical daily budget.
    metrics_daily_cap_usd: float = Field(90.0, ge=0, le=_MAX_USD)
    # Each tenant's own daily cap, in USD; 0 means the global cap (a tenant may use all of it). Every
    # reservation must fit under both.
    metrics_tenant_daily_cap_usd: float = Field(0.0, ge=0, le=_MAX_USD)
    # The tenant of requests that name none.
    metrics_default_tenant: str = "default"
    # Budget days are calendar days in this IANA time zone.
    metrics_budget_time_zone: str = "UTC"
    # Shares of the cap used (spent + reserved) from which a budget's level is NOTIFY, then ECONOMY;
    # it is EXHAUSTED at the cap itself.
    metrics_notify_threshold: float = Field(0.7, gt=0, le=1)
    metrics_economy_threshold: float = Field(0.9, le=1)
    # How long a reservation lasts unsettled before it expires. Expiry frees nothing: the attempt may have
    # been billed, so its money counts as spent (uncertain) until a late commit or release reconciles it.
    metrics_reservation_ttl_seconds: float = Field(3600.0, gt=0, allow_inf_nan=False)
    # How often overdue reservations are looked for.
    metrics_expiry_sweep_seconds: float = Field(5.0, gt=0, allow_inf_nan=False)
    # Alert policies: evaluated this often (and whenever alerts are listed).
    metrics_alert_interval_seconds: float = Field(15.0, gt=0, allow_inf_nan=False)
    # daily_spend_warning / daily_spend_critical: today's committed spend of everyone over these, USD.
    metrics_alert_spend_warning_usd: float = 90.0
    metrics_alert_spend_critical_usd: float = 100.0
    # mean_quality_low: the mean QC score of the jobs that succeeded in the window under this.
    metrics_alert_quality_min: float = 0.6
    metrics_alert_quality_window_seconds: float = Field(600.0, gt=0, allow_inf_nan=False)
    # job_latency_p95_high: the p95 duration of the jobs that ended in the window over this, seconds.
    metrics_alert_latency_p95_max_seconds: float = 900.0
    metrics_alert_latency_window_seconds: float = Field(600.0, gt=0, allow_inf_nan=False)
    # backend_errors_high: a backend's errors (failed jobs, attempts given up) in the window over this.
    metrics_alert_backend_errors_max: int = 5
    metrics_alert_backend_errors_window_seconds: float = Field(3600.0, gt=0, allow_inf_nan=False)
    # SLOs over the last days (events are kept a day longer, 8 days at least): job_latency, the share of
    # jobs ending in under the bound; job_quality, the share of succeeded jobs scoring at least the minimum.
    metrics_slo_window_days: int = Field(7, ge=1)
    metrics_slo_latency_goal: float = Field(0.95, gt=0, lt=1)
    metrics_slo_latency_max_seconds: float = 900.0
    metrics_slo_quality_goal: float = Field(0.9, gt=0, lt=1)
    metrics_slo_quality_min: float = 0.6

    @model_validator(mode="after")
    def _levels_in_order(self) -> "MetricsSettings":
        if self.metrics_economy_threshold < self.metrics_notify_threshold:
            raise ValueError(
                f"AIPROD_METRICS_ECONOMY_THRESHOLD ({self.metrics_economy_threshold}) must not be under "
                f"AIPROD_METRICS_NOTIFY_THRESHOLD ({self.metrics_notify_threshold})"
            )
        return self


class LocalRendererSettings(CommonSettings):
    local_renderer_port: int = LOCAL_RENDERER_PORT
    # Frames encoded per second of wall time at most; 0 means as fast as the machine goes.
    # Demos and fault tests slow a render down with it so that there is time to watch or kill it.
    local_render_pace_fps: float = 0.0
    # How many renders run at once.
    local_render_concurrency: int = 2
    # Where outputs go (GcsBucket): a bucket, as the provider renderers', so that the gateway can stitch
    # them and callers can fetch them.
    gcs_bucket: GcsBucket = ""


class ProviderSettings(BaseSettings):
    """Settings of one provider renderer, read under its own prefix (AIPROD_RUNWAY_, ...).

    Credentials keep the provider clients' own variable names (RUNWAYML_API_SECRET, ...), declared by
    each provider's subclass.
    """

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    port: int
    # The default model, offered at 720p.
    model: str
    # More offers beside it, each a route candidate with its own price, quality and limits: a comma list
    # of model or model@resolution, such as "gen4_turbo,veo3.1@1080p" (720p when no resolution is
    # given). Only the providers whose models are tabled take it (Runway and Veo).
    offers: str = ""
    # The shortest wait between two polls of one task: no more often than the provider asks. The wait
    # grows by half at each poll, up to max_poll_seconds (sooner when the task's progress says it ends
    # sooner): a render's end is seen within about that long, in a dozen requests for a minute's render.
    poll_seconds: float
    max_poll_seconds: float = Field(15.0, gt=0)
    requests_per_minute: int = 60
    # HTTP requests to the provider at once; the others wait their turn before their timeout starts.
    # Under the provider clients' pools (100 connections): a request cancelled while it waits for a
    # pooled connection can leak it for good (encode/httpcore#1093), so none is ever made to wait there.
    max_concurrent_requests: int = Field(32, ge=1, le=90)
    max_concurrent_tasks: int = 4
    # How long StartRender waits for one of the concurrent task slots before saying RESOURCE_EXHAUSTED
    # (AT_CAPACITY: nothing started; the router asks again, and the job waits its turn).
    slot_wait_seconds: float = 30.0
    request_timeout_seconds: float = 30.0
    # How long a create may take, its retries of what the provider did not act on included; cut there,
    # its outcome is unknown (PROVIDER_UNCERTAIN). Another replica asked for the same key meanwhile
    # waits this long for the create's task id before it reports the key uncertain too.
    create_deadline_seconds: float = 120.0
    # Copying an output can take longer than an API call: the whole copy, retries of rate limits and
    # transient errors included, within this (output URLs live an hour or more).
    download_timeout_seconds: float = 300.0
    # Outputs decoded for QC at once (the others wait their turn): the CPUs this process may use. More
    # at once is no faster (each decode keeps a core busy) and holds a decoder's frames each.
    qc_concurrency: int = Field(default_factory=usable_cpus, ge=1)
    # Consecutive provider failures that open the breaker, and how long it stays open before a probe.
    breaker_failures: int = 5
    breaker_cooldown_seconds: float = 30.0
    # Where outputs go (GcsBucket).
    gcs_bucket: GcsBucket = ""

    def offered(self) -> list[tuple[str, str]]:
        """(model, resolution) of every offer, the default model at 720p first, each once."""
        offered = [(self.model, "720p")]
        for item in filter(None, (part.strip() for part in self.offers.split(","))):
            model, _, resolution = item.partition("@")
            offer = (model.strip(), resolution.strip() or "720p")
            if offer not in offered:
                offered.append(offer)
        return offered


class RunwaySettings(ProviderSettings):
    model_config = SettingsConfigDict(env_prefix="AIPROD_RUNWAY_", extra="ignore", frozen=True)

    port: int = RUNWAY_RENDERER_PORT
    model: str = "gen4.5"
    poll_seconds: float = 5.0
    api_secret: SecretStr = Field(SecretStr(""), validation_alias="RUNWAYML_API_SECRET")
    base_url: str = Field("https://api.dev.runwayml.com", validation_alias="RUNWAYML_BASE_URL")


class VeoSettings(ProviderSettings):
    model_config = SettingsConfigDict(env_prefix="AIPROD_VEO_", extra="ignore", frozen=True)

    port: int = VEO_RENDERER_PORT
    model: str = "veo-3.0-generate-001"
    poll_seconds: float = 10.0
    requests_per_minute: int = 10
    project: str = Field("", validation_alias="GOOGLE_CLOUD_PROJECT")
    location: str = Field("us-central1", validation_alias="GOOGLE_CLOUD_LOCATION")
    # Vertex AI's endpoint; empty means the client's default. The sandbox sets its own.
    base_url: str = ""
    # A bearer token to use instead of Application Default Credentials (the sandbox, tests).
    access_token: SecretStr = SecretStr("")
    generate_audio: bool = False


class ReplicateSettings(ProviderSettings):
    model_config = SettingsConfigDict(env_prefix="AIPROD_REPLICATE_", extra="ignore", frozen=True)

    port: int = REPLICATE_RENDERER_PORT
    model: str = "minimax/video-01"
    poll_seconds: float = 2.0
    api_token: SecretStr = Field(SecretStr(""), validation_alias="REPLICATE_API_TOKEN")
    base_url: str = Field("https://api.replicate.com", validation_alias="REPLICATE_BASE_URL")
    # The model's price per second of video in USD (Replicate prices vary per model).
    price_per_second_usd: float = Field(0.05, ge=0, allow_inf_nan=False)
    # The model's longest prompt in characters and largest first frame in bytes; 0: not known.
    max_prompt_characters: int = 0
    max_image_bytes: int = 0
    # How the model's input is named: JSON mapping our fields to the model's input keys.
    input_mapping: str = (
        '{"prompt": "prompt", "first_frame": "first_frame_image", "duration_seconds": "duration"}'
    )

    @field_validator("offers")
    @classmethod
    def _one_model(cls, value: str) -> str:
        if value.strip():
            raise ValueError("Replicate renders one model (AIPROD_REPLICATE_MODEL); it takes no other offers")
        return value
