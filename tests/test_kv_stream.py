"""The gRPC KV transport's two ends (`services.common.kv_stream`) over a real loopback server.

`send_kv` writes WriteKvRequest messages by hand and `receive_kv` reads them raw: both must stay
wire-compatible with the protobuf messages, in both directions."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from services.common.errors import grpc_errors
from services.common.kv_stream import receive_kv, send_kv, serve_write_kv
from services.protos.tandem.worker.v1 import worker_pb2, worker_pb2_grpc


class Receiver(worker_pb2_grpc.DecodeServiceServicer):
    """A decode-side WriteKv like the worker's: receive_kv, errors mapped by grpc_errors."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, bytes]] = []

    @grpc_errors
    async def WriteKv(
        self, request_iterator: AsyncIterable[bytes], context: Any
    ) -> worker_pb2.WriteKvResponse:
        self.received.append(await receive_kv(request_iterator))
        return worker_pb2.WriteKvResponse()


class ProtoReceiver(worker_pb2_grpc.DecodeServiceServicer):
    """The generated handler: protobuf parses what send_kv wrote."""

    def __init__(self) -> None:
        self.messages: list[worker_pb2.WriteKvRequest] = []

    async def WriteKv(
        self, request_iterator: AsyncIterator[worker_pb2.WriteKvRequest], context: Any
    ) -> worker_pb2.WriteKvResponse:
        self.messages += [m async for m in request_iterator]
        return worker_pb2.WriteKvResponse()


async def with_server(servicer: Any, raw: bool, body: Callable[[grpc.aio.Channel], Awaitable[None]]) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    worker_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, server)
    if raw:
        serve_write_kv(server, servicer.WriteKv)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await body(channel)
    finally:
        await server.stop(None)


@pytest.mark.parametrize(
    ("size", "chunk"), [(0, 1000), (1, 1000), (4000, 1000), (12345, 1000), (3 << 20, 1 << 20)]
)
def test_payload_and_commit_arrive_intact(size: int, chunk: int) -> None:
    payload, commit = os.urandom(size), b"commit record"
    receiver = Receiver()

    async def body(channel: grpc.aio.Channel) -> None:
        await send_kv(channel, "rid-1", payload, commit, chunk_bytes=chunk)
        await send_kv(channel, "rid-2", memoryview(payload), commit + b"2", chunk_bytes=chunk)

    asyncio.run(with_server(receiver, True, body))
    assert receiver.received == [(commit, payload), (commit + b"2", payload)]


def test_a_stream_without_a_commit_is_refused() -> None:
    async def body(channel: grpc.aio.Channel) -> None:
        stub = worker_pb2_grpc.DecodeServiceStub(channel)

        async def messages() -> AsyncIterator[worker_pb2.WriteKvRequest]:
            yield worker_pb2.WriteKvRequest(rid="r", data=b"pages")

        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.WriteKv(messages())
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "without a commit record" in (e.value.details() or "")

    receiver = Receiver()
    asyncio.run(with_server(receiver, True, body))
    assert receiver.received == []


def test_send_kv_writes_protobuf_messages() -> None:
    payload = os.urandom(2500)
    receiver = ProtoReceiver()

    async def body(channel: grpc.aio.Channel) -> None:
        await send_kv(channel, "rid-é", payload, b"c", chunk_bytes=1000)

    asyncio.run(with_server(receiver, False, body))
    msgs = receiver.messages
    assert [m.rid for m in msgs] == ["rid-é", "", "", ""]  # the rid goes in the first message
    assert b"".join(m.data for m in msgs) == payload and [len(m.data) for m in msgs] == [1000, 1000, 500, 0]
    assert [m.commit for m in msgs] == [b"", b"", b"", b"c"]


def test_receive_kv_reads_protobuf_messages() -> None:
    receiver = Receiver()

    async def body(channel: grpc.aio.Channel) -> None:
        stub = worker_pb2_grpc.DecodeServiceStub(channel)

        async def messages() -> AsyncIterator[worker_pb2.WriteKvRequest]:
            yield worker_pb2.WriteKvRequest(rid="r", data=b"ab")
            yield worker_pb2.WriteKvRequest(rid="r", data=b"cd")
            yield worker_pb2.WriteKvRequest(rid="r", commit=b"c")

        await stub.WriteKv(messages())

    asyncio.run(with_server(receiver, True, body))
    assert receiver.received == [(b"c", b"abcd")]


def test_a_malformed_message_is_refused() -> None:
    async def body(channel: grpc.aio.Channel) -> None:
        write_kv = channel.stream_unary(
            "/tandem.worker.v1.DecodeService/WriteKv",
            request_serializer=None,
            response_deserializer=worker_pb2.WriteKvResponse.FromString,
        )

        async def messages() -> AsyncIterator[bytes]:
            yield b"\x12\x05abc"  # data field claiming 5 bytes, holding 3

        with pytest.raises(grpc.aio.AioRpcError) as e:
            await write_kv(messages())
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(with_server(Receiver(), True, body))
