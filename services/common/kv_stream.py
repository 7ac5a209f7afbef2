"""The gRPC KV transport's two ends: a prompt's pages as a `DecodeService.WriteKv` stream.

    prefill worker   send_kv(channel, rid, payload, commit)      chunks of the payload, then
                                                                 the commit record
    decode worker    commit, payload = await receive_kv(stream)  served by `serve_write_kv`

The messages are `WriteKvRequest`s on the wire, but neither end goes through protobuf objects:
a `bytes` field takes no memoryview, so building a message copies its chunk twice and parsing
one copies it twice more. `send_kv` writes each message's few header bytes in front of a slice
of the payload (one copy), and `serve_write_kv` registers `WriteKv` without a deserializer, so
`receive_kv` reads the raw messages and takes each chunk as a memoryview of the message grpc
handed over. The payload is then copied once into the `bytes` the engine gets.
docs/kv_transfer.md has the numbers.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable

import grpc

from services.protos.tandem.worker.v1 import worker_pb2
from shared.errors import InvalidRequest

KV_CHUNK_BYTES = 2 << 20  # payload bytes per WriteKv message (1-8 MiB measure alike; docs/kv_transfer.md)
WRITE_KV_METHOD = "/tandem.worker.v1.DecodeService/WriteKv"

# WriteKvRequest field numbers (proto/tandem/worker/v1/worker.proto), as wire-format keys
_RID, _DATA, _COMMIT = 1, 2, 3
_LEN = 2  # wire type of a length-delimited field

WriteKvBehavior = Callable[
    [AsyncIterable[bytes], grpc.aio.ServicerContext], Awaitable[worker_pb2.WriteKvResponse]
]


async def send_kv(
    channel: grpc.aio.Channel,
    rid: str,
    payload: bytes | bytearray | memoryview,
    commit: bytes,
    chunk_bytes: int = KV_CHUNK_BYTES,
    timeout: float | None = 30.0,
) -> None:
    """Stream `payload` to the decode worker behind `channel`, then `commit`; returns once the
    decode engine was handed both (the call's error, an `AioRpcError`, otherwise)."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    view = memoryview(payload).cast("B")

    async def messages() -> AsyncIterable[bytes]:
        head = _field(_RID, rid.encode())
        for start in range(0, len(view), chunk_bytes):
            chunk = view[start : start + chunk_bytes]
            yield b"".join((head, _key(_DATA), _varint(len(chunk)), chunk))
            head = b""  # the rid goes in the first message only
        yield head + _field(_COMMIT, commit)

    write_kv = channel.stream_unary(
        WRITE_KV_METHOD, request_serializer=None, response_deserializer=worker_pb2.WriteKvResponse.FromString
    )
    await write_kv(messages(), timeout=timeout)


async def receive_kv(messages: AsyncIterable[bytes]) -> tuple[bytes, bytes]:
    """(commit record, payload) from a WriteKv stream's raw messages. InvalidRequest if a message is
    malformed or the stream ends without a commit record."""
    parts: list[memoryview] = []
    commit = b""
    async for message in messages:
        for field, value in _fields(message):
            if field == _DATA:
                parts.append(value)
            elif field == _COMMIT:
                commit = bytes(value)
    if not commit:
        raise InvalidRequest("WriteKv ended without a commit record")
    return commit, b"".join(parts)


def serve_write_kv(server: grpc.aio.Server, behavior: WriteKvBehavior) -> None:
    """Serve `DecodeService.WriteKv` with `behavior`, which gets the raw messages (`bytes`).
    Call it after `add_DecodeServiceServicer_to_server`: the later registration wins."""
    handler = grpc.stream_unary_rpc_method_handler(
        behavior,
        request_deserializer=None,
        response_serializer=worker_pb2.WriteKvResponse.SerializeToString,
    )
    server.add_registered_method_handlers("tandem.worker.v1.DecodeService", {"WriteKv": handler})


def _key(field: int) -> bytes:
    return _varint(field << 3 | _LEN)


def _field(field: int, value: bytes) -> bytes:
    return _key(field) + _varint(len(value)) + value if value else b""


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _fields(message: bytes) -> list[tuple[int, memoryview]]:
    """The length-delimited fields of a protobuf message, as (field number, value) views;
    fields of other wire types are skipped."""
    view = memoryview(message)
    fields = []
    pos, end = 0, len(view)
    while pos < end:
        key, pos = _read_varint(view, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == _LEN:
            size, pos = _read_varint(view, pos)
            if pos + size > end:
                raise InvalidRequest("a WriteKv message is truncated")
            fields.append((field, view[pos : pos + size]))
            pos += size
        elif wire_type == 0:
            _, pos = _read_varint(view, pos)
        elif wire_type in (1, 5):  # fixed 64 / 32 bits
            pos += 8 if wire_type == 1 else 4
        else:
            raise InvalidRequest(f"a WriteKv message has a field of wire type {wire_type}")
    if pos != end:
        raise InvalidRequest("a WriteKv message is truncated")
    return fields


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise InvalidRequest("a WriteKv message has a malformed varint")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
