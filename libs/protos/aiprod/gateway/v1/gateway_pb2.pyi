import datetime

from aiprod.common.v1 import backend_pb2 as _backend_pb2
from aiprod.common.v1 import event_pb2 as _event_pb2
from aiprod.common.v1 import job_pb2 as _job_pb2
from aiprod.common.v1 import money_pb2 as _money_pb2
from aiprod.common.v1 import render_pb2 as _render_pb2
from aiprod.gateway.v1 import admin_pb2 as _admin_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_LOW: _ClassVar[Priority]
    PRIORITY_MEDIUM: _ClassVar[Priority]
    PRIORITY_HIGH: _ClassVar[Priority]

class Pipeline(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIPELINE_UNSPECIFIED: _ClassVar[Pipeline]
    PIPELINE_FAST: _ClassVar[Pipeline]
    PIPELINE_FULL: _ClassVar[Pipeline]
PRIORITY_UNSPECIFIED: Priority
PRIORITY_LOW: Priority
PRIORITY_MEDIUM: Priority
PRIORITY_HIGH: Priority
PIPELINE_UNSPECIFIED: Pipeline
PIPELINE_FAST: Pipeline
PIPELINE_FULL: Pipeline

class RenderJob(_message.Message):
    __slots__ = ("job_id", "request_id", "state", "spec", "plan", "create_time", "update_time", "result", "error", "last_sequence", "progress", "backend", "handle", "attempt", "reserved", "budget_wait_start_time", "attempts", "cost", "tenant_id", "plan_version", "quote", "priority", "company_cost", "tier", "shots")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_WAIT_START_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    COMPANY_COST_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    request_id: str
    state: _job_pb2.JobState
    spec: _render_pb2.RenderSpec
    plan: _render_pb2.RenderPlan
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    result: _render_pb2.RenderOutput
    error: _render_pb2.RenderFailure
    last_sequence: int
    progress: float
    backend: _backend_pb2.Backend
    handle: _backend_pb2.RenderHandle
    attempt: int
    reserved: _money_pb2.Money
    budget_wait_start_time: _timestamp_pb2.Timestamp
    attempts: _containers.RepeatedCompositeFieldContainer[RenderAttempt]
    cost: _money_pb2.Money
    tenant_id: str
    plan_version: int
    quote: Quote
    priority: Priority
    company_cost: _money_pb2.Money
    tier: _admin_pb2.SlaTier
    shots: _containers.RepeatedCompositeFieldContainer[ShotStatus]
    def __init__(self, job_id: _Optional[str] = ..., request_id: _Optional[str] = ..., state: _Optional[_Union[_job_pb2.JobState, str]] = ..., spec: _Optional[_Union[_render_pb2.RenderSpec, _Mapping]] = ..., plan: _Optional[_Union[_render_pb2.RenderPlan, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., result: _Optional[_Union[_render_pb2.RenderOutput, _Mapping]] = ..., error: _Optional[_Union[_render_pb2.RenderFailure, _Mapping]] = ..., last_sequence: _Optional[int] = ..., progress: _Optional[float] = ..., backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., handle: _Optional[_Union[_backend_pb2.RenderHandle, _Mapping]] = ..., attempt: _Optional[int] = ..., reserved: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., budget_wait_start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[_Iterable[_Union[RenderAttempt, _Mapping]]] = ..., cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., tenant_id: _Optional[str] = ..., plan_version: _Optional[int] = ..., quote: _Optional[_Union[Quote, _Mapping]] = ..., priority: _Optional[_Union[Priority, str]] = ..., company_cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., tier: _Optional[_Union[_admin_pb2.SlaTier, str]] = ..., shots: _Optional[_Iterable[_Union[ShotStatus, _Mapping]]] = ...) -> None: ...

class ShotStatus(_message.Message):
    __slots__ = ("index", "state", "backend", "attempt", "handle", "progress", "cost", "output", "error", "render_key")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RENDER_KEY_FIELD_NUMBER: _ClassVar[int]
    index: int
    state: _job_pb2.JobState
    backend: _backend_pb2.Backend
    attempt: int
    handle: _backend_pb2.RenderHandle
    progress: float
    cost: _money_pb2.Money
    output: _render_pb2.RenderOutput
    error: _render_pb2.RenderFailure
    render_key: str
    def __init__(self, index: _Optional[int] = ..., state: _Optional[_Union[_job_pb2.JobState, str]] = ..., backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., attempt: _Optional[int] = ..., handle: _Optional[_Union[_backend_pb2.RenderHandle, _Mapping]] = ..., progress: _Optional[float] = ..., cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., output: _Optional[_Union[_render_pb2.RenderOutput, _Mapping]] = ..., error: _Optional[_Union[_render_pb2.RenderFailure, _Mapping]] = ..., render_key: _Optional[str] = ...) -> None: ...

class RenderAttempt(_message.Message):
    __slots__ = ("attempt", "backend", "reservation_key", "reserved", "handle", "charge", "settled", "shot")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_KEY_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    CHARGE_FIELD_NUMBER: _ClassVar[int]
    SETTLED_FIELD_NUMBER: _ClassVar[int]
    SHOT_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    backend: _backend_pb2.Backend
    reservation_key: str
    reserved: _money_pb2.Money
    handle: _backend_pb2.RenderHandle
    charge: _event_pb2.AttemptCharge
    settled: bool
    shot: int
    def __init__(self, attempt: _Optional[int] = ..., backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., reservation_key: _Optional[str] = ..., reserved: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., handle: _Optional[_Union[_backend_pb2.RenderHandle, _Mapping]] = ..., charge: _Optional[_Union[_event_pb2.AttemptCharge, _Mapping]] = ..., settled: _Optional[bool] = ..., shot: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "sequence", "create_time", "state", "render", "message", "previous_state", "plan_updated", "quoted", "approved", "cancelled")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_STATE_FIELD_NUMBER: _ClassVar[int]
    PLAN_UPDATED_FIELD_NUMBER: _ClassVar[int]
    QUOTED_FIELD_NUMBER: _ClassVar[int]
    APPROVED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    sequence: int
    create_time: _timestamp_pb2.Timestamp
    state: _job_pb2.JobState
    render: _event_pb2.RenderEvent
    message: str
    previous_state: _job_pb2.JobState
    plan_updated: PlanRevision
    quoted: Quote
    approved: Approval
    cancelled: Cancellation
    def __init__(self, job_id: _Optional[str] = ..., sequence: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[_job_pb2.JobState, str]] = ..., render: _Optional[_Union[_event_pb2.RenderEvent, _Mapping]] = ..., message: _Optional[str] = ..., previous_state: _Optional[_Union[_job_pb2.JobState, str]] = ..., plan_updated: _Optional[_Union[PlanRevision, _Mapping]] = ..., quoted: _Optional[_Union[Quote, _Mapping]] = ..., approved: _Optional[_Union[Approval, _Mapping]] = ..., cancelled: _Optional[_Union[Cancellation, _Mapping]] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("plan_version", "approver")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    APPROVER_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    approver: str
    def __init__(self, plan_version: _Optional[int] = ..., approver: _Optional[str] = ...) -> None: ...

class Cancellation(_message.Message):
    __slots__ = ("reason", "cancelled_by")
    REASON_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_BY_FIELD_NUMBER: _ClassVar[int]
    reason: str
    cancelled_by: str
    def __init__(self, reason: _Optional[str] = ..., cancelled_by: _Optional[str] = ...) -> None: ...

class PlanRevision(_message.Message):
    __slots__ = ("plan_version", "create_time", "author", "plan", "changes", "quote")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    create_time: _timestamp_pb2.Timestamp
    author: str
    plan: _render_pb2.RenderPlan
    changes: _containers.RepeatedScalarFieldContainer[str]
    quote: Quote
    def __init__(self, plan_version: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., author: _Optional[str] = ..., plan: _Optional[_Union[_render_pb2.RenderPlan, _Mapping]] = ..., changes: _Optional[_Iterable[str]] = ..., quote: _Optional[_Union[Quote, _Mapping]] = ...) -> None: ...

class CreateRenderJobRequest(_message.Message):
    __slots__ = ("request_id", "spec", "quote_id", "review")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    QUOTE_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    spec: _render_pb2.RenderSpec
    quote_id: str
    review: bool
    def __init__(self, request_id: _Optional[str] = ..., spec: _Optional[_Union[_render_pb2.RenderSpec, _Mapping]] = ..., quote_id: _Optional[str] = ..., review: _Optional[bool] = ...) -> None: ...

class CreateRenderJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: RenderJob
    def __init__(self, job: _Optional[_Union[RenderJob, _Mapping]] = ...) -> None: ...

class GetRenderJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetRenderJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: RenderJob
    def __init__(self, job: _Optional[_Union[RenderJob, _Mapping]] = ...) -> None: ...

class ListRenderJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[_job_pb2.JobState]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[_job_pb2.JobState, str]]] = ...) -> None: ...

class ListRenderJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[RenderJob]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[RenderJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelRenderJobRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelRenderJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: RenderJob
    def __init__(self, job: _Optional[_Union[RenderJob, _Mapping]] = ...) -> None: ...

class WatchRenderJobRequest(_message.Message):
    __slots__ = ("job_id", "after_sequence")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_sequence: int
    def __init__(self, job_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class WatchRenderJobResponse(_message.Message):
    __slots__ = ("job", "event")
    JOB_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    job: RenderJob
    event: JobEvent
    def __init__(self, job: _Optional[_Union[RenderJob, _Mapping]] = ..., event: _Optional[_Union[JobEvent, _Mapping]] = ...) -> None: ...

class QuoteRenderRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: _render_pb2.RenderSpec
    def __init__(self, spec: _Optional[_Union[_render_pb2.RenderSpec, _Mapping]] = ...) -> None: ...

class Quote(_message.Message):
    __slots__ = ("estimated_cost", "max_cost", "baseline_cost", "savings", "backend", "quote_id", "expire_time", "price", "estimates", "baseline_backend", "create_time", "cheapest_cost", "model", "resolution")
    ESTIMATED_COST_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_FIELD_NUMBER: _ClassVar[int]
    BASELINE_COST_FIELD_NUMBER: _ClassVar[int]
    SAVINGS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    QUOTE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATES_FIELD_NUMBER: _ClassVar[int]
    BASELINE_BACKEND_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CHEAPEST_COST_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    estimated_cost: _money_pb2.Money
    max_cost: _money_pb2.Money
    baseline_cost: _money_pb2.Money
    savings: _money_pb2.Money
    backend: _backend_pb2.Backend
    quote_id: str
    expire_time: _timestamp_pb2.Timestamp
    price: _money_pb2.Money
    estimates: _containers.RepeatedCompositeFieldContainer[BackendEstimate]
    baseline_backend: _backend_pb2.Backend
    create_time: _timestamp_pb2.Timestamp
    cheapest_cost: _money_pb2.Money
    model: str
    resolution: str
    def __init__(self, estimated_cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., max_cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., baseline_cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., savings: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., quote_id: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., price: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., estimates: _Optional[_Iterable[_Union[BackendEstimate, _Mapping]]] = ..., baseline_backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cheapest_cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., model: _Optional[str] = ..., resolution: _Optional[str] = ...) -> None: ...

class BackendEstimate(_message.Message):
    __slots__ = ("backend", "estimated_cost", "qualifies", "reasons", "rank", "estimated_latency", "model", "resolution")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_FIELD_NUMBER: _ClassVar[int]
    QUALIFIES_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_LATENCY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    backend: _backend_pb2.Backend
    estimated_cost: _money_pb2.Money
    qualifies: bool
    reasons: _containers.RepeatedScalarFieldContainer[str]
    rank: int
    estimated_latency: _duration_pb2.Duration
    model: str
    resolution: str
    def __init__(self, backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., estimated_cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., qualifies: _Optional[bool] = ..., reasons: _Optional[_Iterable[str]] = ..., rank: _Optional[int] = ..., estimated_latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., model: _Optional[str] = ..., resolution: _Optional[str] = ...) -> None: ...

class QuoteRenderResponse(_message.Message):
    __slots__ = ("quote",)
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    quote: Quote
    def __init__(self, quote: _Optional[_Union[Quote, _Mapping]] = ...) -> None: ...

class ListPresetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Preset(_message.Message):
    __slots__ = ("name", "description", "quality_floor", "max_duration_seconds", "default_duration_seconds", "max_price_per_minute", "requires_approval", "priority", "pipeline")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FLOOR_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_PRICE_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_APPROVAL_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    quality_floor: float
    max_duration_seconds: float
    default_duration_seconds: float
    max_price_per_minute: _money_pb2.Money
    requires_approval: bool
    priority: Priority
    pipeline: Pipeline
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., quality_floor: _Optional[float] = ..., max_duration_seconds: _Optional[float] = ..., default_duration_seconds: _Optional[float] = ..., max_price_per_minute: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., requires_approval: _Optional[bool] = ..., priority: _Optional[_Union[Priority, str]] = ..., pipeline: _Optional[_Union[Pipeline, str]] = ...) -> None: ...

class ListPresetsResponse(_message.Message):
    __slots__ = ("presets",)
    PRESETS_FIELD_NUMBER: _ClassVar[int]
    presets: _containers.RepeatedCompositeFieldContainer[Preset]
    def __init__(self, presets: _Optional[_Iterable[_Union[Preset, _Mapping]]] = ...) -> None: ...

class ApproveRenderJobRequest(_message.Message):
    __slots__ = ("job_id", "plan_version")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    plan_version: int
    def __init__(self, job_id: _Optional[str] = ..., plan_version: _Optional[int] = ...) -> None: ...

class ApproveRenderJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: RenderJob
    def __init__(self, job: _Optional[_Union[RenderJob, _Mapping]] = ...) -> None: ...

class UpdateRenderManifestRequest(_message.Message):
    __slots__ = ("job_id", "plan", "update_mask", "plan_version")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    plan: _render_pb2.RenderPlan
    update_mask: _field_mask_pb2.FieldMask
    plan_version: int
    def __init__(self, job_id: _Optional[str] = ..., plan: _Optional[_Union[_render_pb2.RenderPlan, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., plan_version: _Optional[int] = ...) -> None: ...

class UpdateRenderManifestResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: RenderJob
    def __init__(self, job: _Optional[_Union[RenderJob, _Mapping]] = ...) -> None: ...

class ListRenderRevisionsRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListRenderRevisionsResponse(_message.Message):
    __slots__ = ("revisions",)
    REVISIONS_FIELD_NUMBER: _ClassVar[int]
    revisions: _containers.RepeatedCompositeFieldContainer[PlanRevision]
    def __init__(self, revisions: _Optional[_Iterable[_Union[PlanRevision, _Mapping]]] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("first_day", "last_day")
    FIRST_DAY_FIELD_NUMBER: _ClassVar[int]
    LAST_DAY_FIELD_NUMBER: _ClassVar[int]
    first_day: str
    last_day: str
    def __init__(self, first_day: _Optional[str] = ..., last_day: _Optional[str] = ...) -> None: ...

class JobStateCount(_message.Message):
    __slots__ = ("state", "count")
    STATE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    state: _job_pb2.JobState
    count: int
    def __init__(self, state: _Optional[_Union[_job_pb2.JobState, str]] = ..., count: _Optional[int] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("jobs", "spend_today", "tenant_id", "tier", "approval_rate", "spend_in_range", "reserved", "budget_left", "daily_budget", "quoted_total", "actual_total", "first_day", "last_day")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    SPEND_TODAY_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_RATE_FIELD_NUMBER: _ClassVar[int]
    SPEND_IN_RANGE_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_LEFT_FIELD_NUMBER: _ClassVar[int]
    DAILY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    QUOTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FIRST_DAY_FIELD_NUMBER: _ClassVar[int]
    LAST_DAY_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobStateCount]
    spend_today: _money_pb2.Money
    tenant_id: str
    tier: _admin_pb2.SlaTier
    approval_rate: float
    spend_in_range: _money_pb2.Money
    reserved: _money_pb2.Money
    budget_left: _money_pb2.Money
    daily_budget: _money_pb2.Money
    quoted_total: _money_pb2.Money
    actual_total: _money_pb2.Money
    first_day: str
    last_day: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobStateCount, _Mapping]]] = ..., spend_today: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., tenant_id: _Optional[str] = ..., tier: _Optional[_Union[_admin_pb2.SlaTier, str]] = ..., approval_rate: _Optional[float] = ..., spend_in_range: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., reserved: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., budget_left: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., daily_budget: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., quoted_total: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., actual_total: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., first_day: _Optional[str] = ..., last_day: _Optional[str] = ...) -> None: ...
