import datetime

from aiprod.common.v1 import backend_pb2 as _backend_pb2
from aiprod.common.v1 import event_pb2 as _event_pb2
from aiprod.common.v1 import money_pb2 as _money_pb2
from aiprod.common.v1 import render_pb2 as _render_pb2
from aiprod.renderer.v1 import renderer_pb2 as _renderer_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Exclusion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXCLUSION_UNSPECIFIED: _ClassVar[Exclusion]
    EXCLUSION_NOT_REACHED: _ClassVar[Exclusion]
    EXCLUSION_UNSUPPORTED: _ClassVar[Exclusion]
    EXCLUSION_NOT_SERVING: _ClassVar[Exclusion]
    EXCLUSION_BREAKER_OPEN: _ClassVar[Exclusion]
    EXCLUSION_ALREADY_TRIED: _ClassVar[Exclusion]
    EXCLUSION_UNDER_QUALITY_FLOOR: _ClassVar[Exclusion]
    EXCLUSION_OVER_MAX_COST: _ClassVar[Exclusion]
    EXCLUSION_OVER_BUDGET: _ClassVar[Exclusion]
    EXCLUSION_DEADLINE: _ClassVar[Exclusion]

class BackendHealth(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_HEALTH_UNSPECIFIED: _ClassVar[BackendHealth]
    BACKEND_HEALTH_SERVING: _ClassVar[BackendHealth]
    BACKEND_HEALTH_NOT_SERVING: _ClassVar[BackendHealth]

class BreakerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BREAKER_STATE_UNSPECIFIED: _ClassVar[BreakerState]
    BREAKER_STATE_CLOSED: _ClassVar[BreakerState]
    BREAKER_STATE_OPEN: _ClassVar[BreakerState]
    BREAKER_STATE_HALF_OPEN: _ClassVar[BreakerState]
EXCLUSION_UNSPECIFIED: Exclusion
EXCLUSION_NOT_REACHED: Exclusion
EXCLUSION_UNSUPPORTED: Exclusion
EXCLUSION_NOT_SERVING: Exclusion
EXCLUSION_BREAKER_OPEN: Exclusion
EXCLUSION_ALREADY_TRIED: Exclusion
EXCLUSION_UNDER_QUALITY_FLOOR: Exclusion
EXCLUSION_OVER_MAX_COST: Exclusion
EXCLUSION_OVER_BUDGET: Exclusion
EXCLUSION_DEADLINE: Exclusion
BACKEND_HEALTH_UNSPECIFIED: BackendHealth
BACKEND_HEALTH_SERVING: BackendHealth
BACKEND_HEALTH_NOT_SERVING: BackendHealth
BREAKER_STATE_UNSPECIFIED: BreakerState
BREAKER_STATE_CLOSED: BreakerState
BREAKER_STATE_OPEN: BreakerState
BREAKER_STATE_HALF_OPEN: BreakerState

class PlanRouteRequest(_message.Message):
    __slots__ = ("shot", "constraints", "tenant_id")
    SHOT_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    shot: _render_pb2.Shot
    constraints: _render_pb2.RenderConstraints
    tenant_id: str
    def __init__(self, shot: _Optional[_Union[_render_pb2.Shot, _Mapping]] = ..., constraints: _Optional[_Union[_render_pb2.RenderConstraints, _Mapping]] = ..., tenant_id: _Optional[str] = ...) -> None: ...

class RouteCandidate(_message.Message):
    __slots__ = ("backend", "eligible", "rank", "estimated_cost", "estimated_latency", "reasons", "exclusions", "model", "resolution")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_LATENCY_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    EXCLUSIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    backend: _backend_pb2.Backend
    eligible: bool
    rank: int
    estimated_cost: _money_pb2.Money
    estimated_latency: _duration_pb2.Duration
    reasons: _containers.RepeatedScalarFieldContainer[str]
    exclusions: _containers.RepeatedScalarFieldContainer[Exclusion]
    model: str
    resolution: str
    def __init__(self, backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., eligible: _Optional[bool] = ..., rank: _Optional[int] = ..., estimated_cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., estimated_latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., reasons: _Optional[_Iterable[str]] = ..., exclusions: _Optional[_Iterable[_Union[Exclusion, str]]] = ..., model: _Optional[str] = ..., resolution: _Optional[str] = ...) -> None: ...

class PlanRouteResponse(_message.Message):
    __slots__ = ("candidates",)
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[RouteCandidate]
    def __init__(self, candidates: _Optional[_Iterable[_Union[RouteCandidate, _Mapping]]] = ...) -> None: ...

class ExecuteRenderRequest(_message.Message):
    __slots__ = ("job_id", "shot", "constraints", "idempotency_key", "tenant_id", "guarantee")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHOT_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    GUARANTEE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shot: _render_pb2.Shot
    constraints: _render_pb2.RenderConstraints
    idempotency_key: str
    tenant_id: str
    guarantee: QualityGuarantee
    def __init__(self, job_id: _Optional[str] = ..., shot: _Optional[_Union[_render_pb2.Shot, _Mapping]] = ..., constraints: _Optional[_Union[_render_pb2.RenderConstraints, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., tenant_id: _Optional[str] = ..., guarantee: _Optional[_Union[QualityGuarantee, _Mapping]] = ...) -> None: ...

class QualityGuarantee(_message.Message):
    __slots__ = ("quality_minimum", "account")
    QUALITY_MINIMUM_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    quality_minimum: float
    account: str
    def __init__(self, quality_minimum: _Optional[float] = ..., account: _Optional[str] = ...) -> None: ...

class ExecuteRenderResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: _event_pb2.RenderEvent
    def __init__(self, event: _Optional[_Union[_event_pb2.RenderEvent, _Mapping]] = ...) -> None: ...

class ResumeRenderRequest(_message.Message):
    __slots__ = ("job_id", "handle", "shot", "constraints", "attempt", "tenant_id", "guarantee", "rerender_granted")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    SHOT_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    GUARANTEE_FIELD_NUMBER: _ClassVar[int]
    RERENDER_GRANTED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    handle: _backend_pb2.RenderHandle
    shot: _render_pb2.Shot
    constraints: _render_pb2.RenderConstraints
    attempt: int
    tenant_id: str
    guarantee: QualityGuarantee
    rerender_granted: bool
    def __init__(self, job_id: _Optional[str] = ..., handle: _Optional[_Union[_backend_pb2.RenderHandle, _Mapping]] = ..., shot: _Optional[_Union[_render_pb2.Shot, _Mapping]] = ..., constraints: _Optional[_Union[_render_pb2.RenderConstraints, _Mapping]] = ..., attempt: _Optional[int] = ..., tenant_id: _Optional[str] = ..., guarantee: _Optional[_Union[QualityGuarantee, _Mapping]] = ..., rerender_granted: _Optional[bool] = ...) -> None: ...

class ResumeRenderResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: _event_pb2.RenderEvent
    def __init__(self, event: _Optional[_Union[_event_pb2.RenderEvent, _Mapping]] = ...) -> None: ...

class ExecuteRendersRequest(_message.Message):
    __slots__ = ("render_id", "execute", "resume", "stop", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RENDER_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    render_id: str
    execute: ExecuteRenderRequest
    resume: ResumeRenderRequest
    stop: bool
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, render_id: _Optional[str] = ..., execute: _Optional[_Union[ExecuteRenderRequest, _Mapping]] = ..., resume: _Optional[_Union[ResumeRenderRequest, _Mapping]] = ..., stop: _Optional[bool] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ExecuteRendersResponse(_message.Message):
    __slots__ = ("render_id", "event", "end")
    RENDER_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    render_id: str
    event: _event_pb2.RenderEvent
    end: CallEnd
    def __init__(self, render_id: _Optional[str] = ..., event: _Optional[_Union[_event_pb2.RenderEvent, _Mapping]] = ..., end: _Optional[_Union[CallEnd, _Mapping]] = ...) -> None: ...

class CallEnd(_message.Message):
    __slots__ = ("code", "message", "status_details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    status_details: bytes
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., status_details: _Optional[bytes] = ...) -> None: ...

class CancelRenderRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: _backend_pb2.RenderHandle
    def __init__(self, handle: _Optional[_Union[_backend_pb2.RenderHandle, _Mapping]] = ...) -> None: ...

class CancelRenderResponse(_message.Message):
    __slots__ = ("charge",)
    CHARGE_FIELD_NUMBER: _ClassVar[int]
    charge: _event_pb2.AttemptCharge
    def __init__(self, charge: _Optional[_Union[_event_pb2.AttemptCharge, _Mapping]] = ...) -> None: ...

class ReconcileAttemptRequest(_message.Message):
    __slots__ = ("backend", "idempotency_key", "task_id")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    backend: _backend_pb2.Backend
    idempotency_key: str
    task_id: str
    def __init__(self, backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., idempotency_key: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class ReconcileAttemptResponse(_message.Message):
    __slots__ = ("ended", "charge")
    ENDED_FIELD_NUMBER: _ClassVar[int]
    CHARGE_FIELD_NUMBER: _ClassVar[int]
    ended: bool
    charge: _event_pb2.AttemptCharge
    def __init__(self, ended: _Optional[bool] = ..., charge: _Optional[_Union[_event_pb2.AttemptCharge, _Mapping]] = ...) -> None: ...

class ListBackendsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BackendStatus(_message.Message):
    __slots__ = ("backend", "target", "health", "price_per_second", "nominal_quality", "capabilities", "breaker", "renders", "p50_latency", "p95_latency", "success_rate", "qc_average", "observed_cost_per_second", "replicas")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    PRICE_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    NOMINAL_QUALITY_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    BREAKER_FIELD_NUMBER: _ClassVar[int]
    RENDERS_FIELD_NUMBER: _ClassVar[int]
    P50_LATENCY_FIELD_NUMBER: _ClassVar[int]
    P95_LATENCY_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    QC_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_COST_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    backend: _backend_pb2.Backend
    target: str
    health: BackendHealth
    price_per_second: _money_pb2.Money
    nominal_quality: float
    capabilities: _renderer_pb2.Capabilities
    breaker: BreakerState
    renders: int
    p50_latency: _duration_pb2.Duration
    p95_latency: _duration_pb2.Duration
    success_rate: float
    qc_average: float
    observed_cost_per_second: _money_pb2.Money
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    def __init__(self, backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., target: _Optional[str] = ..., health: _Optional[_Union[BackendHealth, str]] = ..., price_per_second: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., nominal_quality: _Optional[float] = ..., capabilities: _Optional[_Union[_renderer_pb2.Capabilities, _Mapping]] = ..., breaker: _Optional[_Union[BreakerState, str]] = ..., renders: _Optional[int] = ..., p50_latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., p95_latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., success_rate: _Optional[float] = ..., qc_average: _Optional[float] = ..., observed_cost_per_second: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("address", "health")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    address: str
    health: BackendHealth
    def __init__(self, address: _Optional[str] = ..., health: _Optional[_Union[BackendHealth, str]] = ...) -> None: ...

class ListBackendsResponse(_message.Message):
    __slots__ = ("backends",)
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    backends: _containers.RepeatedCompositeFieldContainer[BackendStatus]
    def __init__(self, backends: _Optional[_Iterable[_Union[BackendStatus, _Mapping]]] = ...) -> None: ...
