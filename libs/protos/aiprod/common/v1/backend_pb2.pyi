from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_UNSPECIFIED: _ClassVar[Backend]
    BACKEND_LOCAL: _ClassVar[Backend]
    BACKEND_RUNWAY: _ClassVar[Backend]
    BACKEND_VEO: _ClassVar[Backend]
    BACKEND_REPLICATE: _ClassVar[Backend]
BACKEND_UNSPECIFIED: Backend
BACKEND_LOCAL: Backend
BACKEND_RUNWAY: Backend
BACKEND_VEO: Backend
BACKEND_REPLICATE: Backend

class RenderHandle(_message.Message):
    __slots__ = ("backend", "task_id", "idempotency_key")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    backend: Backend
    task_id: str
    idempotency_key: str
    def __init__(self, backend: _Optional[_Union[Backend, str]] = ..., task_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...
