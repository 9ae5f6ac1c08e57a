# ruff: noqa
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "crc32")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    crc32: int
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class OpenRequest(_message.Message):
    __slots__ = ("client", "spec_json", "grant")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    client: str
    spec_json: str
    grant: bytes
    def __init__(self, client: _Optional[str] = ..., spec_json: _Optional[str] = ..., grant: _Optional[bytes] = ...) -> None: ...

class OpenReply(_message.Message):
    __slots__ = ("session_id", "max_message_bytes", "server_spec_fingerprint")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVER_SPEC_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_message_bytes: int
    server_spec_fingerprint: str
    def __init__(self, session_id: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., server_spec_fingerprint: _Optional[str] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "step", "hidden", "attention_mask", "train")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    hidden: Tensor
    attention_mask: Tensor
    train: bool
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., train: bool = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("session_id", "step", "hidden")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    hidden: Tensor
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("session_id", "step", "grad")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    grad: Tensor
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BackwardReply(_message.Message):
    __slots__ = ("session_id", "step", "grad")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    grad: Tensor
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class CloseRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseReply(_message.Message):
    __slots__ = ("steps", "bytes_up", "bytes_down")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    steps: int
    bytes_up: int
    bytes_down: int
    def __init__(self, steps: _Optional[int] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ...) -> None: ...
