from services.protos.tandem.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_TRANSPORT_UNSPECIFIED: _ClassVar[KvTransport]
    KV_TRANSPORT_NIXL: _ClassVar[KvTransport]
    KV_TRANSPORT_GRPC: _ClassVar[KvTransport]
KV_TRANSPORT_UNSPECIFIED: KvTransport
KV_TRANSPORT_NIXL: KvTransport
KV_TRANSPORT_GRPC: KvTransport

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("role", "model", "max_context_len", "vocab_size", "page_size", "kv_layout", "kv_transport", "tp_size")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    role: _common_pb2.WorkerRole
    model: str
    max_context_len: int
    vocab_size: int
    page_size: int
    kv_layout: str
    kv_transport: KvTransport
    tp_size: int
    def __init__(self, role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., model: _Optional[str] = ..., max_context_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., page_size: _Optional[int] = ..., kv_layout: _Optional[str] = ..., kv_transport: _Optional[_Union[KvTransport, str]] = ..., tp_size: _Optional[int] = ...) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLoadResponse(_message.Message):
    __slots__ = ("running_requests", "waiting_requests", "kv_free_tokens", "kv_evictable_tokens", "kv_used_tokens", "kv_total_tokens", "counters")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_FREE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_EVICTABLE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_USED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    running_requests: int
    waiting_requests: int
    kv_free_tokens: int
    kv_evictable_tokens: int
    kv_used_tokens: int
    kv_total_tokens: int
    counters: _containers.ScalarMap[str, int]
    def __init__(self, running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., kv_free_tokens: _Optional[int] = ..., kv_evictable_tokens: _Optional[int] = ..., kv_used_tokens: _Optional[int] = ..., kv_total_tokens: _Optional[int] = ..., counters: _Optional[_Mapping[str, int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("rid", "token_ids", "sampling_params", "return_logprob", "top_logprobs_num", "kv_lease_ms", "stall_timeout_ms")
    RID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_NUM_FIELD_NUMBER: _ClassVar[int]
    KV_LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    STALL_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    rid: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _common_pb2.SamplingParams
    return_logprob: bool
    top_logprobs_num: int
    kv_lease_ms: int
    stall_timeout_ms: int
    def __init__(self, rid: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., return_logprob: _Optional[bool] = ..., top_logprobs_num: _Optional[int] = ..., kv_lease_ms: _Optional[int] = ..., stall_timeout_ms: _Optional[int] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("rid", "inputs", "options")
    RID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    rid: str
    inputs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenIds]
    options: _common_pb2.EmbedOptions
    def __init__(self, rid: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[_common_pb2.TokenIds, _Mapping]]] = ..., options: _Optional[_Union[_common_pb2.EmbedOptions, _Mapping]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings",)
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[_common_pb2.Embedding]
    def __init__(self, embeddings: _Optional[_Iterable[_Union[_common_pb2.Embedding, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("reservation", "output", "keepalive")
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    reservation: Reservation
    output: _common_pb2.Output
    keepalive: Keepalive
    def __init__(self, reservation: _Optional[_Union[Reservation, _Mapping]] = ..., output: _Optional[_Union[_common_pb2.Output, _Mapping]] = ..., keepalive: _Optional[_Union[Keepalive, _Mapping]] = ...) -> None: ...

class GenerateManyRequest(_message.Message):
    __slots__ = ("open", "cancel")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    open: OpenStream
    cancel: int
    def __init__(self, open: _Optional[_Union[OpenStream, _Mapping]] = ..., cancel: _Optional[int] = ...) -> None: ...

class OpenStream(_message.Message):
    __slots__ = ("stream_id", "request", "metadata", "timeout_ms")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    request: GenerateRequest
    metadata: _containers.RepeatedCompositeFieldContainer[_common_pb2.MetadataEntry]
    timeout_ms: int
    def __init__(self, stream_id: _Optional[int] = ..., request: _Optional[_Union[GenerateRequest, _Mapping]] = ..., metadata: _Optional[_Iterable[_Union[_common_pb2.MetadataEntry, _Mapping]]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class GenerateManyResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[StreamEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[StreamEvent, _Mapping]]] = ...) -> None: ...

class StreamEvent(_message.Message):
    __slots__ = ("stream_id", "response", "end")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    response: GenerateResponse
    end: _common_pb2.StreamEnd
    def __init__(self, stream_id: _Optional[int] = ..., response: _Optional[_Union[GenerateResponse, _Mapping]] = ..., end: _Optional[_Union[_common_pb2.StreamEnd, _Mapping]] = ...) -> None: ...

class Keepalive(_message.Message):
    __slots__ = ("phase",)
    PHASE_FIELD_NUMBER: _ClassVar[int]
    phase: str
    def __init__(self, phase: _Optional[str] = ...) -> None: ...

class Reservation(_message.Message):
    __slots__ = ("rid", "agent_name", "page_ids", "page_size", "kv_layout", "kv_transport", "tp_size")
    RID_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    rid: str
    agent_name: str
    page_ids: _containers.RepeatedScalarFieldContainer[int]
    page_size: int
    kv_layout: str
    kv_transport: KvTransport
    tp_size: int
    def __init__(self, rid: _Optional[str] = ..., agent_name: _Optional[str] = ..., page_ids: _Optional[_Iterable[int]] = ..., page_size: _Optional[int] = ..., kv_layout: _Optional[str] = ..., kv_transport: _Optional[_Union[KvTransport, str]] = ..., tp_size: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request", "reservation", "decode_address")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    DECODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    request: GenerateRequest
    reservation: Reservation
    decode_address: str
    def __init__(self, request: _Optional[_Union[GenerateRequest, _Mapping]] = ..., reservation: _Optional[_Union[Reservation, _Mapping]] = ..., decode_address: _Optional[str] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("prompt_tokens", "cached_tokens", "first_token_id", "kv_bytes")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    cached_tokens: int
    first_token_id: int
    kv_bytes: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., first_token_id: _Optional[int] = ..., kv_bytes: _Optional[int] = ...) -> None: ...

class GetTransferMetadataRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTransferMetadataResponse(_message.Message):
    __slots__ = ("agent_name", "metadata")
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    agent_name: str
    metadata: bytes
    def __init__(self, agent_name: _Optional[str] = ..., metadata: _Optional[bytes] = ...) -> None: ...

class WriteKvRequest(_message.Message):
    __slots__ = ("rid", "data", "commit")
    RID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    rid: str
    data: bytes
    commit: bytes
    def __init__(self, rid: _Optional[str] = ..., data: _Optional[bytes] = ..., commit: _Optional[bytes] = ...) -> None: ...

class WriteKvResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReserveKvRequest(_message.Message):
    __slots__ = ("rid",)
    RID_FIELD_NUMBER: _ClassVar[int]
    rid: str
    def __init__(self, rid: _Optional[str] = ...) -> None: ...

class ReserveKvResponse(_message.Message):
    __slots__ = ("page_ids",)
    PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    page_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, page_ids: _Optional[_Iterable[int]] = ...) -> None: ...
