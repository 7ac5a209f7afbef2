"""GenerateMany's server side (`Session`, services/common/multiplex.py) over real gRPC on
loopback: batches, ends, errors, cancellation, deadlines, half-close and protocol violations,
with scripted generations."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import pytest

from services.common.decoding import add_servicer
from services.common.errors import ServiceError
from services.common.multiplex import MAX_BATCH_EVENTS, GenerateServicer, Session, drain_sessions
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.router.v1 import router_pb2, router_pb2_grpc
from shared.errors import InvalidRequest


class _Servicer(GenerateServicer, router_pb2_grpc.RouterServiceServicer):
    """Generations scripted by the request's text: "tokens:N" N increments (one per loop turn,
    "slow" 20 ms apart), "invalid" INVALID_ARGUMENT naming a field, "busy" RESOURCE_EXHAUSTED after
    one increment, "forever" an increment every 10 ms until cancelled, "burst" all at once (no
    await between them), "big" each increment's text 2 KiB long."""

    def __init__(self) -> None:
        self.running: set[int] = set()  # request ids whose generation has not ended
        self.cancelled: list[int] = []
        self.metadata: dict[int, dict[str, str]] = {}

    batch_type = router_pb2.GenerateManyResponse

    async def _serve(
        self, request: router_pb2.GenerateRequest, metadata: Sequence[tuple[str, str]]
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        rid = request.request_id
        self.metadata[rid] = dict(metadata)
        self.running.add(rid)
        try:
            text = request.text
            if text == "invalid":
                raise InvalidRequest("temperature must be >= 0", param="temperature")
            found = re.search(r"tokens:(\d+)", text)
            count = int(found.group(1)) if found else 10**9
            for i in range(count):
                if text == "busy" and i == 1:
                    raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
                output = common_pb2.Output(
                    token_ids=[i], text=f"t{i}" + ("x" * 2048 if "big" in text else "")
                )
                if i == count - 1:
                    output.finish.reason = common_pb2.FINISH_REASON_LENGTH
                yield router_pb2.GenerateResponse(request_id=rid, output=output)
                if "burst" in text:
                    continue
                await asyncio.sleep(0.02 if "slow" in text else 0.01 if text in ("forever", "busy") else 0)
        except asyncio.CancelledError:
            self.cancelled.append(rid)
            raise
        finally:
            self.running.discard(rid)


async def _serve() -> tuple[grpc.aio.Server, _Servicer, str]:
    server = grpc.aio.server()
    servicer = _Servicer()
    add_servicer(server, router_pb2_grpc.add_RouterServiceServicer_to_server, servicer)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, f"127.0.0.1:{port}"


def _open(sid: int, text: str, timeout_ms: int = 0, **metadata: str) -> router_pb2.GenerateManyRequest:
    stream = router_pb2.OpenStream(
        stream_id=sid, request=router_pb2.GenerateRequest(request_id=sid, text=text), timeout_ms=timeout_ms
    )
    for key, value in metadata.items():
        stream.metadata.add(key=key, value=value)
    return router_pb2.GenerateManyRequest(open=stream)


class _Client:
    """One GenerateMany call: send actions, read batches."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address)
        self.outgoing: asyncio.Queue[router_pb2.GenerateManyRequest | None] = asyncio.Queue()
        self.call = router_pb2_grpc.RouterServiceStub(self.channel).GenerateMany(self._requests())
        self.batches: list[router_pb2.GenerateManyResponse] = []

    async def _requests(self) -> AsyncIterator[router_pb2.GenerateManyRequest]:
        while (message := await self.outgoing.get()) is not None:
            yield message

    def send(self, *messages: router_pb2.GenerateManyRequest | None) -> None:
        for message in messages:
            self.outgoing.put_nowait(message)

    async def until_ended(self, sids: set[int]) -> dict[int, list[router_pb2.StreamEvent]]:
        """Every event of `sids` until each ended (the batches kept in `self.batches`)."""
        events: dict[int, list[router_pb2.StreamEvent]] = {sid: [] for sid in sids}
        while any(not e or not e[-1].HasField("end") for e in events.values()):
            batch = await self.call.read()
            assert batch is not grpc.aio.EOF, "the call ended before every stream did"
            self.batches.append(batch)
            for event in batch.events:
                events.setdefault(event.stream_id, []).append(event)
        return events

    async def close(self) -> None:
        await self.channel.close()


async def _eventually(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait until `condition()` holds or `seconds` passed (the assertion after it then fails)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)


def _run(test: Any) -> None:
    async def main() -> None:
        server, servicer, address = await _serve()
        client = _Client(address)
        try:
            async with asyncio.timeout(30):  # a stream that never ends fails the test, not the run
                await test(client, servicer)
        finally:
            await client.close()
            await server.stop(None)

    asyncio.run(main())


def test_streams_interleave_in_order_and_end_ok() -> None:
    async def test(client: _Client, servicer: _Servicer) -> None:
        traced = _open(2, "tokens:3", traceparent="00-abc", **{"x-request-id": "r2"})
        client.send(_open(1, "tokens:5"), traced)
        events = await client.until_ended({1, 2})
        for sid, count in ((1, 5), (2, 3)):
            got = events[sid]
            assert [e.response.output.text for e in got[:-1]] == [f"t{i}" for i in range(count)]
            assert got[-1].end.code == 0 and not got[-1].end.message
            assert got[-2].response.output.finish.reason == common_pb2.FINISH_REASON_LENGTH
        assert servicer.metadata[2] == {"traceparent": "00-abc", "x-request-id": "r2"}
        assert not servicer.running

    _run(test)


def test_a_client_that_falls_behind_gets_batches() -> None:
    async def test(client: _Client, servicer: _Servicer) -> None:
        # 8 x 100 increments of 2 KiB: past HTTP/2's flow-control window (64 KiB) while this
        # reader sleeps, so the server's writes block and what the streams produce meanwhile
        # gathers (a fixed amount of unread data, not the machine's speed, makes it fall behind).
        client.send(*(_open(sid, "big tokens:100") for sid in range(1, 9)))
        await asyncio.sleep(0.3)
        events = await client.until_ended(set(range(1, 9)))
        assert sum(len(e) for e in events.values()) == 8 * 101
        for sid, stream in events.items():  # each stream's increments in order, then its end
            assert [e.response.output.token_ids[0] for e in stream[:-1]] == list(range(100)), sid
        # Far fewer messages than events, and batches mixing streams.
        assert len(client.batches) <= 8 * 101 // 4
        assert max(len({e.stream_id for e in b.events}) for b in client.batches) > 1

    _run(test)


def test_a_large_backlog_goes_out_in_bounded_messages() -> None:
    async def test(client: _Client, servicer: _Servicer) -> None:
        client.send(_open(1, "burst tokens:5000"))
        events = await client.until_ended({1})
        assert [e.response.output.text for e in events[1][:-1]] == [f"t{i}" for i in range(5000)]
        assert len(client.batches) >= 3
        assert max(len(b.events) for b in client.batches) == MAX_BATCH_EVENTS

    _run(test)


def test_errors_end_their_stream_only_with_the_generate_status() -> None:
    async def test(client: _Client, servicer: _Servicer) -> None:
        client.send(_open(1, "invalid"), _open(2, "busy"), _open(3, "tokens:4"))
        events = await client.until_ended({1, 2, 3})
        invalid = events[1][-1].end
        assert len(events[1]) == 1
        assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert invalid.message == "temperature must be >= 0" and invalid.param == "temperature"
        busy = events[2]
        assert len(busy) == 2 and busy[0].response.output.text == "t0"
        assert busy[1].end.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert busy[1].end.message == "full"
        assert events[3][-1].end.code == 0 and len(events[3]) == 5

    _run(test)


def test_cancel_stops_that_generation_and_sends_nothing_more() -> None:
    async def test(client: _Client, servicer: _Servicer) -> None:
        client.send(_open(1, "forever"), _open(2, "slow tokens:10"))
        first = await client.call.read()
        assert {e.stream_id for e in first.events} <= {1, 2}
        client.send(router_pb2.GenerateManyRequest(cancel=1), router_pb2.GenerateManyRequest(cancel=99))
        events = await client.until_ended({2})
        assert [e.response.output.text for e in events[2][:-1]][-1] == "t9"
        await _eventually(lambda: 1 not in servicer.running)
        assert servicer.cancelled == [1] and not servicer.running
        assert not any(e.HasField("end") for e in events.get(1, []))  # no end for a cancelled stream

    _run(test)


def test_deadline_ends_the_stream_with_deadline_exceeded() -> None:
    async def test(client: _Client, servicer: _Servicer) -> None:
        client.send(_open(1, "forever", timeout_ms=100), _open(2, "tokens:2"))
        events = await client.until_ended({1, 2})
        end = events[1][-1].end
        assert end.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert len(events[1]) > 2  # it streamed until the deadline
        assert events[2][-1].end.code == 0
        assert servicer.cancelled == [1] and not servicer.running

    _run(test)


def test_half_close_lets_open_streams_finish_then_ends_the_call() -> None:
    async def test(client: _Client, servicer: _Servicer) -> None:
        client.send(_open(1, "slow tokens:5"), None)  # None: the client half-closes
        events = await client.until_ended({1})
        assert len(events[1]) == 6 and events[1][-1].end.code == 0
        assert await client.call.read() is grpc.aio.EOF
        assert await client.call.code() == grpc.StatusCode.OK

    _run(test)


def test_a_draining_server_ends_each_call_once_its_streams_have() -> None:
    """Shutdown (`drain_sessions`, before `server.stop(grace)`): an open stream runs to its end,
    a stream opened meanwhile ends UNAVAILABLE at once, and the call then ends OK, while the
    client still holds it open: an idle call, which never ends on its own, does not outlive the
    grace (gRPC logged its forced cancellation as an unhandled servicer error)."""

    async def test(client: _Client, servicer: _Servicer) -> None:
        idle = _Client(client.address)  # a second call, idle once its one stream ended
        try:
            client.send(_open(1, "slow tokens:10"))
            first = await client.call.read()
            assert first.events[0].stream_id == 1
            idle.send(_open(9, "tokens:1"))
            await idle.until_ended({9})
            drain_sessions("the server is shutting down")
            client.send(_open(2, "tokens:3"))
            events = await client.until_ended({1, 2})
            assert len(events[1]) == 10 - len(first.events) + 1 and events[1][-1].end.code == 0
            refused = events[2]
            assert len(refused) == 1 and refused[0].end.code == grpc.StatusCode.UNAVAILABLE.value[0]
            assert "shutting down" in refused[0].end.message
            for call in (client.call, idle.call):
                assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
                assert await call.code() == grpc.StatusCode.OK
        finally:
            Session.draining = None  # process-wide: the other tests' servers serve
            await idle.close()

    _run(test)


@pytest.mark.parametrize(
    "bad, message",
    [
        (router_pb2.GenerateManyRequest(), "a GenerateManyRequest must open or cancel a stream"),
        (_open(1, "tokens:3"), "stream 1 is already open on this call"),
    ],
    ids=["no action", "an open stream's id"],
)
def test_protocol_violations_end_the_call_and_every_stream(
    bad: router_pb2.GenerateManyRequest, message: str
) -> None:
    async def test(client: _Client, servicer: _Servicer) -> None:
        client.send(_open(1, "forever"))
        await client.call.read()
        client.send(bad)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while await client.call.read() is not grpc.aio.EOF:
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == message
        await _eventually(lambda: not servicer.running)
        assert servicer.cancelled == [1] and not servicer.running

    _run(test)


def test_an_undecodable_message_is_invalid_argument() -> None:
    async def test(client: _Client, servicer: _Servicer) -> None:
        bidi = client.channel.stream_stream("/tandem.router.v1.RouterService/GenerateMany")

        async def garbage() -> AsyncIterator[bytes]:
            yield _open(1, "forever").SerializeToString()
            yield b"\x0f\x01\x02"

        call = bidi(garbage())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "could not be parsed" in (info.value.details() or "")
        await _eventually(lambda: not servicer.running)
        assert not servicer.running

    _run(test)


def test_the_call_cancelled_cancels_every_stream() -> None:
    async def test(client: _Client, servicer: _Servicer) -> None:
        client.send(*(_open(sid, "forever") for sid in (1, 2, 3)))
        while len(servicer.running) < 3:
            await client.call.read()
        client.call.cancel()
        await _eventually(lambda: not servicer.running)
        assert sorted(servicer.cancelled) == [1, 2, 3] and not servicer.running

    _run(test)
