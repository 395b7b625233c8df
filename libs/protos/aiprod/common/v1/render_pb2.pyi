import datetime

from aiprod.common.v1 import backend_pb2 as _backend_pb2
from aiprod.common.v1 import money_pb2 as _money_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AspectRatio(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ASPECT_RATIO_UNSPECIFIED: _ClassVar[AspectRatio]
    ASPECT_RATIO_16_9: _ClassVar[AspectRatio]
    ASPECT_RATIO_9_16: _ClassVar[AspectRatio]
    ASPECT_RATIO_1_1: _ClassVar[AspectRatio]

class FailureReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_REASON_UNSPECIFIED: _ClassVar[FailureReason]
    FAILURE_REASON_CANCELLED: _ClassVar[FailureReason]
    FAILURE_REASON_INTERNAL: _ClassVar[FailureReason]
    FAILURE_REASON_BUDGET_EXHAUSTED: _ClassVar[FailureReason]
    FAILURE_REASON_NO_BACKEND: _ClassVar[FailureReason]
    FAILURE_REASON_DEADLINE_PASSED: _ClassVar[FailureReason]
    FAILURE_REASON_DEADLINE_UNMEETABLE: _ClassVar[FailureReason]
    FAILURE_REASON_ROUTER_REFUSED: _ClassVar[FailureReason]
    FAILURE_REASON_UNKNOWN_BACKEND: _ClassVar[FailureReason]
    FAILURE_REASON_RENDER_REFUSED: _ClassVar[FailureReason]
    FAILURE_REASON_RENDERER_UNAVAILABLE: _ClassVar[FailureReason]
    FAILURE_REASON_RENDERER_INTERNAL: _ClassVar[FailureReason]
    FAILURE_REASON_RENDER_LOST: _ClassVar[FailureReason]
    FAILURE_REASON_RENDER_UNCERTAIN: _ClassVar[FailureReason]
    FAILURE_REASON_PROVIDER_FAILED: _ClassVar[FailureReason]
    FAILURE_REASON_PROVIDER_REFUSED: _ClassVar[FailureReason]
    FAILURE_REASON_PROVIDER_AUTH: _ClassVar[FailureReason]
    FAILURE_REASON_PROVIDER_RATE_LIMITED: _ClassVar[FailureReason]
    FAILURE_REASON_PROVIDER_UNAVAILABLE: _ClassVar[FailureReason]
    FAILURE_REASON_PROVIDER_UNCERTAIN: _ClassVar[FailureReason]
    FAILURE_REASON_PROVIDER_SAFETY_INPUT: _ClassVar[FailureReason]
    FAILURE_REASON_PROVIDER_SAFETY_OUTPUT: _ClassVar[FailureReason]
    FAILURE_REASON_PROVIDER_BAD_INPUT: _ClassVar[FailureReason]
    FAILURE_REASON_PROVIDER_NO_OUTPUT: _ClassVar[FailureReason]
    FAILURE_REASON_OUTPUT_LOST: _ClassVar[FailureReason]
    FAILURE_REASON_OUTPUT_UNDECODABLE: _ClassVar[FailureReason]
    FAILURE_REASON_OUTPUT_STORE_FAILED: _ClassVar[FailureReason]
    FAILURE_REASON_OUTPUT_CHECK_FAILED: _ClassVar[FailureReason]
    FAILURE_REASON_QC_UNDER_FLOOR: _ClassVar[FailureReason]
ASPECT_RATIO_UNSPECIFIED: AspectRatio
ASPECT_RATIO_16_9: AspectRatio
ASPECT_RATIO_9_16: AspectRatio
ASPECT_RATIO_1_1: AspectRatio
FAILURE_REASON_UNSPECIFIED: FailureReason
FAILURE_REASON_CANCELLED: FailureReason
FAILURE_REASON_INTERNAL: FailureReason
FAILURE_REASON_BUDGET_EXHAUSTED: FailureReason
FAILURE_REASON_NO_BACKEND: FailureReason
FAILURE_REASON_DEADLINE_PASSED: FailureReason
FAILURE_REASON_DEADLINE_UNMEETABLE: FailureReason
FAILURE_REASON_ROUTER_REFUSED: FailureReason
FAILURE_REASON_UNKNOWN_BACKEND: FailureReason
FAILURE_REASON_RENDER_REFUSED: FailureReason
FAILURE_REASON_RENDERER_UNAVAILABLE: FailureReason
FAILURE_REASON_RENDERER_INTERNAL: FailureReason
FAILURE_REASON_RENDER_LOST: FailureReason
FAILURE_REASON_RENDER_UNCERTAIN: FailureReason
FAILURE_REASON_PROVIDER_FAILED: FailureReason
FAILURE_REASON_PROVIDER_REFUSED: FailureReason
FAILURE_REASON_PROVIDER_AUTH: FailureReason
FAILURE_REASON_PROVIDER_RATE_LIMITED: FailureReason
FAILURE_REASON_PROVIDER_UNAVAILABLE: FailureReason
FAILURE_REASON_PROVIDER_UNCERTAIN: FailureReason
FAILURE_REASON_PROVIDER_SAFETY_INPUT: FailureReason
FAILURE_REASON_PROVIDER_SAFETY_OUTPUT: FailureReason
FAILURE_REASON_PROVIDER_BAD_INPUT: FailureReason
FAILURE_REASON_PROVIDER_NO_OUTPUT: FailureReason
FAILURE_REASON_OUTPUT_LOST: FailureReason
FAILURE_REASON_OUTPUT_UNDECODABLE: FailureReason
FAILURE_REASON_OUTPUT_STORE_FAILED: FailureReason
FAILURE_REASON_OUTPUT_CHECK_FAILED: FailureReason
FAILURE_REASON_QC_UNDER_FLOOR: FailureReason

class Image(_message.Message):
    __slots__ = ("data", "mime_type", "uri")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    uri: str
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., uri: _Optional[str] = ...) -> None: ...

class RenderConstraints(_message.Message):
    __slots__ = ("max_cost", "quality_floor", "preferred_backend", "deadline", "preferred_model")
    MAX_COST_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FLOOR_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_MODEL_FIELD_NUMBER: _ClassVar[int]
    max_cost: _money_pb2.Money
    quality_floor: float
    preferred_backend: _backend_pb2.Backend
    deadline: _timestamp_pb2.Timestamp
    preferred_model: str
    def __init__(self, max_cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., quality_floor: _Optional[float] = ..., preferred_backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., preferred_model: _Optional[str] = ...) -> None: ...

class RenderSpec(_message.Message):
    __slots__ = ("prompt", "first_frame", "preset", "duration_seconds", "aspect_ratio", "constraints", "seed", "shots", "reference_images", "resolution")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ASPECT_RATIO_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    first_frame: Image
    preset: str
    duration_seconds: float
    aspect_ratio: AspectRatio
    constraints: RenderConstraints
    seed: int
    shots: _containers.RepeatedCompositeFieldContainer[Shot]
    reference_images: _containers.RepeatedCompositeFieldContainer[Image]
    resolution: str
    def __init__(self, prompt: _Optional[str] = ..., first_frame: _Optional[_Union[Image, _Mapping]] = ..., preset: _Optional[str] = ..., duration_seconds: _Optional[float] = ..., aspect_ratio: _Optional[_Union[AspectRatio, str]] = ..., constraints: _Optional[_Union[RenderConstraints, _Mapping]] = ..., seed: _Optional[int] = ..., shots: _Optional[_Iterable[_Union[Shot, _Mapping]]] = ..., reference_images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., resolution: _Optional[str] = ...) -> None: ...

class Shot(_message.Message):
    __slots__ = ("prompt", "duration_seconds", "aspect_ratio", "seed", "first_frame", "continuous", "reference_images", "resolution")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ASPECT_RATIO_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_FIELD_NUMBER: _ClassVar[int]
    CONTINUOUS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    duration_seconds: float
    aspect_ratio: AspectRatio
    seed: int
    first_frame: Image
    continuous: bool
    reference_images: _containers.RepeatedCompositeFieldContainer[Image]
    resolution: str
    def __init__(self, prompt: _Optional[str] = ..., duration_seconds: _Optional[float] = ..., aspect_ratio: _Optional[_Union[AspectRatio, str]] = ..., seed: _Optional[int] = ..., first_frame: _Optional[_Union[Image, _Mapping]] = ..., continuous: _Optional[bool] = ..., reference_images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., resolution: _Optional[str] = ...) -> None: ...

class RenderPlan(_message.Message):
    __slots__ = ("shots",)
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    shots: _containers.RepeatedCompositeFieldContainer[Shot]
    def __init__(self, shots: _Optional[_Iterable[_Union[Shot, _Mapping]]] = ...) -> None: ...

class QcCheck(_message.Message):
    __slots__ = ("name", "score", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    score: float
    detail: str
    def __init__(self, name: _Optional[str] = ..., score: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class QcReport(_message.Message):
    __slots__ = ("score", "checks")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    score: float
    checks: _containers.RepeatedCompositeFieldContainer[QcCheck]
    def __init__(self, score: _Optional[float] = ..., checks: _Optional[_Iterable[_Union[QcCheck, _Mapping]]] = ...) -> None: ...

class VideoArtifact(_message.Message):
    __slots__ = ("uri", "sha256", "size_bytes", "mime_type", "duration_seconds", "width", "height", "frame_rate", "frame_count")
    URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAME_RATE_FIELD_NUMBER: _ClassVar[int]
    FRAME_COUNT_FIELD_NUMBER: _ClassVar[int]
    uri: str
    sha256: str
    size_bytes: int
    mime_type: str
    duration_seconds: float
    width: int
    height: int
    frame_rate: float
    frame_count: int
    def __init__(self, uri: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., mime_type: _Optional[str] = ..., duration_seconds: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frame_rate: _Optional[float] = ..., frame_count: _Optional[int] = ...) -> None: ...

class RenderOutput(_message.Message):
    __slots__ = ("backend", "video", "qc", "cost")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    QC_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    backend: _backend_pb2.Backend
    video: VideoArtifact
    qc: QcReport
    cost: _money_pb2.Money
    def __init__(self, backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., video: _Optional[_Union[VideoArtifact, _Mapping]] = ..., qc: _Optional[_Union[QcReport, _Mapping]] = ..., cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ...) -> None: ...

class RenderFailure(_message.Message):
    __slots__ = ("reason", "message", "retryable", "provider_code")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_CODE_FIELD_NUMBER: _ClassVar[int]
    reason: FailureReason
    message: str
    retryable: bool
    provider_code: str
    def __init__(self, reason: _Optional[_Union[FailureReason, str]] = ..., message: _Optional[str] = ..., retryable: _Optional[bool] = ..., provider_code: _Optional[str] = ...) -> None: ...
