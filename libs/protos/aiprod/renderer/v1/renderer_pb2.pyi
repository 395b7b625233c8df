import datetime

from aiprod.common.v1 import backend_pb2 as _backend_pb2
from aiprod.common.v1 import money_pb2 as _money_pb2
from aiprod.common.v1 import render_pb2 as _render_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RenderState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RENDER_STATE_UNSPECIFIED: _ClassVar[RenderState]
    RENDER_STATE_PENDING: _ClassVar[RenderState]
    RENDER_STATE_RUNNING: _ClassVar[RenderState]
    RENDER_STATE_SUCCEEDED: _ClassVar[RenderState]
    RENDER_STATE_FAILED: _ClassVar[RenderState]
    RENDER_STATE_CANCELLED: _ClassVar[RenderState]
RENDER_STATE_UNSPECIFIED: RenderState
RENDER_STATE_PENDING: RenderState
RENDER_STATE_RUNNING: RenderState
RENDER_STATE_SUCCEEDED: RenderState
RENDER_STATE_FAILED: RenderState
RENDER_STATE_CANCELLED: RenderState

class Capabilities(_message.Message):
    __slots__ = ("backend", "models", "min_duration_seconds", "max_duration_seconds", "allowed_durations_seconds", "aspect_ratios", "resolutions", "image_input", "audio", "price_per_second", "nominal_quality", "max_prompt_characters", "max_image_bytes", "max_reference_images", "offers", "requires_first_frame")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MIN_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_DURATIONS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ASPECT_RATIOS_FIELD_NUMBER: _ClassVar[int]
    RESOLUTIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INPUT_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    PRICE_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    NOMINAL_QUALITY_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REFERENCE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    OFFERS_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_FIRST_FRAME_FIELD_NUMBER: _ClassVar[int]
    backend: _backend_pb2.Backend
    models: _containers.RepeatedScalarFieldContainer[str]
    min_duration_seconds: float
    max_duration_seconds: float
    allowed_durations_seconds: _containers.RepeatedScalarFieldContainer[float]
    aspect_ratios: _containers.RepeatedScalarFieldContainer[_render_pb2.AspectRatio]
    resolutions: _containers.RepeatedScalarFieldContainer[str]
    image_input: bool
    audio: bool
    price_per_second: _money_pb2.Money
    nominal_quality: float
    max_prompt_characters: int
    max_image_bytes: int
    max_reference_images: int
    offers: _containers.RepeatedCompositeFieldContainer[ModelOffer]
    requires_first_frame: bool
    def __init__(self, backend: _Optional[_Union[_backend_pb2.Backend, str]] = ..., models: _Optional[_Iterable[str]] = ..., min_duration_seconds: _Optional[float] = ..., max_duration_seconds: _Optional[float] = ..., allowed_durations_seconds: _Optional[_Iterable[float]] = ..., aspect_ratios: _Optional[_Iterable[_Union[_render_pb2.AspectRatio, str]]] = ..., resolutions: _Optional[_Iterable[str]] = ..., image_input: _Optional[bool] = ..., audio: _Optional[bool] = ..., price_per_second: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., nominal_quality: _Optional[float] = ..., max_prompt_characters: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., max_reference_images: _Optional[int] = ..., offers: _Optional[_Iterable[_Union[ModelOffer, _Mapping]]] = ..., requires_first_frame: _Optional[bool] = ...) -> None: ...

class ModelOffer(_message.Message):
    __slots__ = ("model", "resolution", "price_per_second", "nominal_quality", "min_duration_seconds", "max_duration_seconds", "allowed_durations_seconds", "aspect_ratios", "image_input", "requires_first_frame", "audio", "max_reference_images")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    PRICE_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    NOMINAL_QUALITY_FIELD_NUMBER: _ClassVar[int]
    MIN_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_DURATIONS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ASPECT_RATIOS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INPUT_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_FIRST_FRAME_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    MAX_REFERENCE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    model: str
    resolution: str
    price_per_second: _money_pb2.Money
    nominal_quality: float
    min_duration_seconds: float
    max_duration_seconds: float
    allowed_durations_seconds: _containers.RepeatedScalarFieldContainer[float]
    aspect_ratios: _containers.RepeatedScalarFieldContainer[_render_pb2.AspectRatio]
    image_input: bool
    requires_first_frame: bool
    audio: bool
    max_reference_images: int
    def __init__(self, model: _Optional[str] = ..., resolution: _Optional[str] = ..., price_per_second: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., nominal_quality: _Optional[float] = ..., min_duration_seconds: _Optional[float] = ..., max_duration_seconds: _Optional[float] = ..., allowed_durations_seconds: _Optional[_Iterable[float]] = ..., aspect_ratios: _Optional[_Iterable[_Union[_render_pb2.AspectRatio, str]]] = ..., image_input: _Optional[bool] = ..., requires_first_frame: _Optional[bool] = ..., audio: _Optional[bool] = ..., max_reference_images: _Optional[int] = ...) -> None: ...

class GetCapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCapabilitiesResponse(_message.Message):
    __slots__ = ("capabilities",)
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    capabilities: Capabilities
    def __init__(self, capabilities: _Optional[_Union[Capabilities, _Mapping]] = ...) -> None: ...

class Render(_message.Message):
    __slots__ = ("handle", "state", "progress", "output", "failure", "create_time", "update_time", "charge", "model")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CHARGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    handle: _backend_pb2.RenderHandle
    state: RenderState
    progress: float
    output: _render_pb2.RenderOutput
    failure: _render_pb2.RenderFailure
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    charge: _money_pb2.Money
    model: str
    def __init__(self, handle: _Optional[_Union[_backend_pb2.RenderHandle, _Mapping]] = ..., state: _Optional[_Union[RenderState, str]] = ..., progress: _Optional[float] = ..., output: _Optional[_Union[_render_pb2.RenderOutput, _Mapping]] = ..., failure: _Optional[_Union[_render_pb2.RenderFailure, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., charge: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class StartRenderRequest(_message.Message):
    __slots__ = ("idempotency_key", "shot", "model")
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    SHOT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    shot: _render_pb2.Shot
    model: str
    def __init__(self, idempotency_key: _Optional[str] = ..., shot: _Optional[_Union[_render_pb2.Shot, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class StartRenderResponse(_message.Message):
    __slots__ = ("render",)
    RENDER_FIELD_NUMBER: _ClassVar[int]
    render: Render
    def __init__(self, render: _Optional[_Union[Render, _Mapping]] = ...) -> None: ...

class GetRenderRequest(_message.Message):
    __slots__ = ("task_id", "idempotency_key")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    idempotency_key: str
    def __init__(self, task_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class GetRenderResponse(_message.Message):
    __slots__ = ("render",)
    RENDER_FIELD_NUMBER: _ClassVar[int]
    render: Render
    def __init__(self, render: _Optional[_Union[Render, _Mapping]] = ...) -> None: ...

class WatchRenderRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class WatchRenderResponse(_message.Message):
    __slots__ = ("render",)
    RENDER_FIELD_NUMBER: _ClassVar[int]
    render: Render
    def __init__(self, render: _Optional[_Union[Render, _Mapping]] = ...) -> None: ...

class WatchRendersRequest(_message.Message):
    __slots__ = ("watch", "stop_task_ids")
    WATCH_FIELD_NUMBER: _ClassVar[int]
    STOP_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    watch: _containers.RepeatedCompositeFieldContainer[RenderToWatch]
    stop_task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, watch: _Optional[_Iterable[_Union[RenderToWatch, _Mapping]]] = ..., stop_task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RenderToWatch(_message.Message):
    __slots__ = ("task_id", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, task_id: _Optional[str] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class WatchRendersResponse(_message.Message):
    __slots__ = ("task_id", "render", "error")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    render: Render
    error: WatchError
    def __init__(self, task_id: _Optional[str] = ..., render: _Optional[_Union[Render, _Mapping]] = ..., error: _Optional[_Union[WatchError, _Mapping]] = ...) -> None: ...

class WatchError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class CancelRenderRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class CancelRenderResponse(_message.Message):
    __slots__ = ("render",)
    RENDER_FIELD_NUMBER: _ClassVar[int]
    render: Render
    def __init__(self, render: _Optional[_Union[Render, _Mapping]] = ...) -> None: ...
