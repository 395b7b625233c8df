import datetime

from aiprod.common.v1 import backend_pb2 as _backend_pb2
from aiprod.common.v1 import money_pb2 as _money_pb2
from aiprod.common.v1 import render_pb2 as _render_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChargeOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHARGE_OUTCOME_UNSPECIFIED: _ClassVar[ChargeOutcome]
    CHARGE_OUTCOME_COMMIT: _ClassVar[ChargeOutcome]
    CHARGE_OUTCOME_RELEASE: _ClassVar[ChargeOutcome]
    CHARGE_OUTCOME_HOLD: _ClassVar[ChargeOutcome]
CHARGE_OUTCOME_UNSPECIFIED: ChargeOutcome
CHARGE_OUTCOME_COMMIT: ChargeOutcome
CHARGE_OUTCOME_RELEASE: ChargeOutcome
CHARGE_OUTCOME_HOLD: ChargeOutcome

class RouteDecision(_message.Message):
    __slots__ = ("backend", "reason", "estimated_cost", "reservation_key", "reserved", "account", "rerender", "model", "resolution", "budget_note")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_KEY_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    RERENDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    BUDGET_NOTE_FIELD_NUMBER: _ClassVar[int]
    backend: _backend_pb2.Backend
    reason: str
    estimated_cost: _money_pb2.Money
    reservation_key: str
    reserved: _money_pb2.Money
    account: str
    rerender: bool
    model: str
    resolution: str
    budget_note: str
    def __init__(self, backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., reason: _Optional[str] = ..., estimated_cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., reservation_key: _Optional[str] = ..., reserved: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., account: _Optional[str] = ..., rerender: _Optional[bool] = ..., model: _Optional[str] = ..., resolution: _Optional[str] = ..., budget_note: _Optional[str] = ...) -> None: ...

class RenderProgress(_message.Message):
    __slots__ = ("fraction", "message")
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    fraction: float
    message: str
    def __init__(self, fraction: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class Fallback(_message.Message):
    __slots__ = ("from_backend", "to_backend", "cause")
    FROM_BACKEND_FIELD_NUMBER: _ClassVar[int]
    TO_BACKEND_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    from_backend: _backend_pb2.Backend
    to_backend: _backend_pb2.Backend
    cause: _render_pb2.RenderFailure
    def __init__(self, from_backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., to_backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., cause: _Optional[_Union[_render_pb2.RenderFailure, _Mapping]] = ...) -> None: ...

class AttemptCharge(_message.Message):
    __slots__ = ("reservation_key", "backend", "model", "task_id", "outcome", "billed", "failure", "output", "account")
    RESERVATION_KEY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    BILLED_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    reservation_key: str
    backend: _backend_pb2.Backend
    model: str
    task_id: str
    outcome: ChargeOutcome
    billed: _money_pb2.Money
    failure: _render_pb2.RenderFailure
    output: _render_pb2.RenderOutput
    account: str
    def __init__(self, reservation_key: _Optional[str] = ..., backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., model: _Optional[str] = ..., task_id: _Optional[str] = ..., outcome: _Optional[_Union[ChargeOutcome, str]] = ..., billed: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., failure: _Optional[_Union[_render_pb2.RenderFailure, _Mapping]] = ..., output: _Optional[_Union[_render_pb2.RenderOutput, _Mapping]] = ..., account: _Optional[str] = ...) -> None: ...

class RenderEvent(_message.Message):
    __slots__ = ("time", "attempt", "shot", "routed", "submitted", "progress", "qc", "fallback", "succeeded", "failed", "charged")
    TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SHOT_FIELD_NUMBER: _ClassVar[int]
    ROUTED_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    QC_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CHARGED_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    attempt: int
    shot: int
    routed: RouteDecision
    submitted: _backend_pb2.RenderHandle
    progress: RenderProgress
    qc: _render_pb2.QcReport
    fallback: Fallback
    succeeded: _render_pb2.RenderOutput
    failed: _render_pb2.RenderFailure
    charged: AttemptCharge
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt: _Optional[int] = ..., shot: _Optional[int] = ..., routed: _Optional[_Union[RouteDecision, _Mapping]] = ..., submitted: _Optional[_Union[_backend_pb2.RenderHandle, _Mapping]] = ..., progress: _Optional[_Union[RenderProgress, _Mapping]] = ..., qc: _Optional[_Union[_render_pb2.QcReport, _Mapping]] = ..., fallback: _Optional[_Union[Fallback, _Mapping]] = ..., succeeded: _Optional[_Union[_render_pb2.RenderOutput, _Mapping]] = ..., failed: _Optional[_Union[_render_pb2.RenderFailure, _Mapping]] = ..., charged: _Optional[_Union[AttemptCharge, _Mapping]] = ...) -> None: ...
