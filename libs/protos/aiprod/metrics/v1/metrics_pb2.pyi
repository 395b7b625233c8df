import datetime

from aiprod.common.v1 import backend_pb2 as _backend_pb2
from aiprod.common.v1 import job_pb2 as _job_pb2
from aiprod.common.v1 import money_pb2 as _money_pb2
from aiprod.common.v1 import render_pb2 as _render_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BudgetLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_LEVEL_UNSPECIFIED: _ClassVar[BudgetLevel]
    BUDGET_LEVEL_OK: _ClassVar[BudgetLevel]
    BUDGET_LEVEL_NOTIFY: _ClassVar[BudgetLevel]
    BUDGET_LEVEL_ECONOMY: _ClassVar[BudgetLevel]
    BUDGET_LEVEL_EXHAUSTED: _ClassVar[BudgetLevel]
BUDGET_LEVEL_UNSPECIFIED: BudgetLevel
BUDGET_LEVEL_OK: BudgetLevel
BUDGET_LEVEL_NOTIFY: BudgetLevel
BUDGET_LEVEL_ECONOMY: BudgetLevel
BUDGET_LEVEL_EXHAUSTED: BudgetLevel

class JobEventRecord(_message.Message):
    __slots__ = ("job_id", "state", "backend", "preset", "time", "qc_score", "job_duration", "cost", "failure_reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    QC_SCORE_FIELD_NUMBER: _ClassVar[int]
    JOB_DURATION_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: _job_pb2.JobState
    backend: _backend_pb2.Backend
    preset: str
    time: _timestamp_pb2.Timestamp
    qc_score: float
    job_duration: _duration_pb2.Duration
    cost: _money_pb2.Money
    failure_reason: _render_pb2.FailureReason
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[_job_pb2.JobState, str]] = ..., backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., preset: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., qc_score: _Optional[float] = ..., job_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., failure_reason: _Optional[_Union[_render_pb2.FailureReason, str]] = ...) -> None: ...

class RecordJobEventRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[JobEventRecord]
    def __init__(self, events: _Optional[_Iterable[_Union[JobEventRecord, _Mapping]]] = ...) -> None: ...

class RecordJobEventResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetJobStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JobStat(_message.Message):
    __slots__ = ("backend", "state", "count")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    backend: _backend_pb2.Backend
    state: _job_pb2.JobState
    count: int
    def __init__(self, backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., state: _Optional[_Union[_job_pb2.JobState, str]] = ..., count: _Optional[int] = ...) -> None: ...

class GetJobStatsResponse(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: _containers.RepeatedCompositeFieldContainer[JobStat]
    def __init__(self, stats: _Optional[_Iterable[_Union[JobStat, _Mapping]]] = ...) -> None: ...

class Reservation(_message.Message):
    __slots__ = ("reservation_key", "tenant_id", "amount", "expire_time", "backend", "job_id")
    RESERVATION_KEY_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_key: str
    tenant_id: str
    amount: _money_pb2.Money
    expire_time: _timestamp_pb2.Timestamp
    backend: _backend_pb2.Backend
    job_id: str
    def __init__(self, reservation_key: _Optional[str] = ..., tenant_id: _Optional[str] = ..., amount: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., job_id: _Optional[str] = ...) -> None: ...

class ReserveBudgetRequest(_message.Message):
    __slots__ = ("reservation_key", "tenant_id", "amount", "job_id", "backend")
    RESERVATION_KEY_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    reservation_key: str
    tenant_id: str
    amount: _money_pb2.Money
    job_id: str
    backend: _backend_pb2.Backend
    def __init__(self, reservation_key: _Optional[str] = ..., tenant_id: _Optional[str] = ..., amount: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., job_id: _Optional[str] = ..., backend: _Optional[_Union[_backend_pb2.Backend, str]] = ...) -> None: ...

class ReserveBudgetResponse(_message.Message):
    __slots__ = ("reservation", "existing", "budget", "global_budget")
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    EXISTING_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BUDGET_FIELD_NUMBER: _ClassVar[int]
    reservation: Reservation
    existing: bool
    budget: Budget
    global_budget: Budget
    def __init__(self, reservation: _Optional[_Union[Reservation, _Mapping]] = ..., existing: _Optional[bool] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., global_budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class CommitSpendRequest(_message.Message):
    __slots__ = ("reservation_key", "actual")
    RESERVATION_KEY_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_FIELD_NUMBER: _ClassVar[int]
    reservation_key: str
    actual: _money_pb2.Money
    def __init__(self, reservation_key: _Optional[str] = ..., actual: _Optional[_Union[_money_pb2.Money, _Mapping]] = ...) -> None: ...

class CommitSpendResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseBudgetRequest(_message.Message):
    __slots__ = ("reservation_key",)
    RESERVATION_KEY_FIELD_NUMBER: _ClassVar[int]
    reservation_key: str
    def __init__(self, reservation_key: _Optional[str] = ...) -> None: ...

class ReleaseBudgetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetBudgetRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("tenant_id", "day", "cap", "spent", "reserved", "remaining", "level", "used_fraction", "expired_reservations", "uncertain")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    DAY_FIELD_NUMBER: _ClassVar[int]
    CAP_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    USED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    UNCERTAIN_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    day: str
    cap: _money_pb2.Money
    spent: _money_pb2.Money
    reserved: _money_pb2.Money
    remaining: _money_pb2.Money
    level: BudgetLevel
    used_fraction: float
    expired_reservations: int
    uncertain: _money_pb2.Money
    def __init__(self, tenant_id: _Optional[str] = ..., day: _Optional[str] = ..., cap: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., spent: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., reserved: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., remaining: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., level: _Optional[_Union[BudgetLevel, str]] = ..., used_fraction: _Optional[float] = ..., expired_reservations: _Optional[int] = ..., uncertain: _Optional[_Union[_money_pb2.Money, _Mapping]] = ...) -> None: ...

class GetBudgetResponse(_message.Message):
    __slots__ = ("budget", "global_budget")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: Budget
    global_budget: Budget
    def __init__(self, budget: _Optional[_Union[Budget, _Mapping]] = ..., global_budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class SetTenantBudgetRequest(_message.Message):
    __slots__ = ("tenant_id", "daily_cap")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    DAILY_CAP_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    daily_cap: _money_pb2.Money
    def __init__(self, tenant_id: _Optional[str] = ..., daily_cap: _Optional[_Union[_money_pb2.Money, _Mapping]] = ...) -> None: ...

class SetTenantBudgetResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: Budget
    def __init__(self, budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class GetSpendRequest(_message.Message):
    __slots__ = ("tenant_id", "first_day", "last_day")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_DAY_FIELD_NUMBER: _ClassVar[int]
    LAST_DAY_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    first_day: str
    last_day: str
    def __init__(self, tenant_id: _Optional[str] = ..., first_day: _Optional[str] = ..., last_day: _Optional[str] = ...) -> None: ...

class GetSpendResponse(_message.Message):
    __slots__ = ("spent", "reserved")
    SPENT_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    spent: _money_pb2.Money
    reserved: _money_pb2.Money
    def __init__(self, spent: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., reserved: _Optional[_Union[_money_pb2.Money, _Mapping]] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Alert(_message.Message):
    __slots__ = ("policy", "firing", "since_time", "value", "threshold", "severity", "backend")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    FIRING_FIELD_NUMBER: _ClassVar[int]
    SINCE_TIME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    policy: str
    firing: bool
    since_time: _timestamp_pb2.Timestamp
    value: float
    threshold: float
    severity: str
    backend: _backend_pb2.Backend
    def __init__(self, policy: _Optional[str] = ..., firing: _Optional[bool] = ..., since_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., severity: _Optional[str] = ..., backend: _Optional[_Union[_backend_pb2.Backend, str]] = ...) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("alerts",)
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    def __init__(self, alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ...) -> None: ...

class GetSloReportRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SloStatus(_message.Message):
    __slots__ = ("name", "goal", "attainment", "error_budget_remaining", "window_days")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GOAL_FIELD_NUMBER: _ClassVar[int]
    ATTAINMENT_FIELD_NUMBER: _ClassVar[int]
    ERROR_BUDGET_REMAINING_FIELD_NUMBER: _ClassVar[int]
    WINDOW_DAYS_FIELD_NUMBER: _ClassVar[int]
    name: str
    goal: float
    attainment: float
    error_budget_remaining: float
    window_days: int
    def __init__(self, name: _Optional[str] = ..., goal: _Optional[float] = ..., attainment: _Optional[float] = ..., error_budget_remaining: _Optional[float] = ..., window_days: _Optional[int] = ...) -> None: ...

class GetSloReportResponse(_message.Message):
    __slots__ = ("slos",)
    SLOS_FIELD_NUMBER: _ClassVar[int]
    slos: _containers.RepeatedCompositeFieldContainer[SloStatus]
    def __init__(self, slos: _Optional[_Iterable[_Union[SloStatus, _Mapping]]] = ...) -> None: ...
