"""GenerateMany: many Generate calls over one gRPC stream, on the router and on the workers.

gRPC's Python stack costs about 50 us of CPU per message on each side of a hop
(`bench/stream_overhead.py`). A Generate call per request pays it per token, which at a few
thousand tokens a second is most of a core in each of the gateway, the router and the worker.
A client holding many generations at once (the gateway towards the router, the router towards
each worker) opens them all on one GenerateMany call instead and pays it per batch. The
messages have the same shape in router.proto and worker.proto (`GenerateManyRequest` with
`open` / `cancel`, `OpenStream`, `GenerateManyResponse` of `StreamEvent`s, common.proto's
`StreamEnd`), so one implementation serves both, given the proto module:

server  `Session(generate, batch_type).run(requests)`, the servicer's GenerateMany:
    reader     OpenStream -> a task per stream, serving it exactly as the servicer's Generate
               does (`generate(request, metadata)`: checks, span, metrics, the work); cancel ->
               that task cancelled
    streams    each response, then the stream's StreamEnd (OK, or the status Generate would
               have ended with, its field at fault as data), appended to the pending batch
    writer     (`run`, the call's response stream) sends the pending batch as one message;
               while gRPC writes it the next one gathers, so a client that keeps up gets what
               one moment produced (one engine step's outputs) and one that falls behind gets
               fewer, larger messages (at most MAX_BATCH_EVENTS events each)
  A protocol violation (an action missing, a stream id already open) ends the call with
  INVALID_ARGUMENT. The client half-closing lets its open streams finish before the call ends;
  the call ending otherwise (cancelled, the connection lost) cancels every stream.

client  `Multiplexer(stub, proto_module)`: the stub with `Generate` answering a `StreamCall`
  that behaves as the Generate call it stands for (iterate it; a failure raises the
  `grpc.aio.AioRpcError` the call would have, its field at fault as trailing metadata;
  `cancel()`, which also ends an iteration waiting for the next message with CancelledError),
  carried as one stream of the shared call (`_ClientSession`). The session failing (the server
  gone) fails every stream open on it with the call's status; the next generation opens a new
  session. Before opening one it asks the server whether it has GenerateMany: a server without
  it (an older version: UNIMPLEMENTED) gets Generate calls, and is asked again after
  `RECHECK_S` (a rolling upgrade brings it the method under the same address).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from types import ModuleType
from typing import Any, TypeAlias

import grpc

from services.common.errors import ANSWERED_METADATA_KEY, PARAM_METADATA_KEY, grpc_errors, status_of
from services.protos.tandem.common.v1 import common_pb2
from shared.errors import InvalidRequest

Metadata = Sequence[tuple[str, str]]
# One generation as a servicer's Generate serves it: the request and its call metadata in, the
# responses out; a failure raises what Generate's status is made from.
Generation = Callable[[Any, Metadata], AsyncIterator[Any]]

# Events in one message at most: a client far behind gets its backlog in several messages, each
# well under gRPC's 4 MiB default receive limit even with top logprobs (~0.5 KB an event).
MAX_BATCH_EVENTS = 2048
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_WRITE_RACE = "Internal error from Core"  # grpc.aio's status when a send fails as the call ends
PROBE_TIMEOUT_S = 5.0
RECHECK_S = 30.0  # a server without GenerateMany is asked again after this long


# ---- server ----------------------------------------------------------------------------------


class GenerateServicer:
    """`Generate` and `GenerateMany` of a servicer that serves one generation in `_serve`; put it
    before the generated servicer base, and set `batch_type` to the proto's GenerateManyResponse."""

    batch_type: Any

    def _serve(self, request: Any, metadata: Metadata) -> AsyncIterator[Any]:
        """One generation, a Generate call's or a GenerateMany stream's: its responses; a failure
        raises what the call's status is made from (services/common/errors.py)."""
        raise NotImplementedError

    @grpc_errors
    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in self._serve(request, context.invocation_metadata() or ()):
            yield response

    @grpc_errors
    async def GenerateMany(
        self, requests: AsyncIterable[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for batch in Session(self._serve, self.batch_type).run(requests):
            yield batch


_LIVE: weakref.WeakSet[Session] = weakref.WeakSet()  # this process's GenerateMany calls


def drain_sessions(message: str) -> None:
    """Server shutdown, before `server.stop(grace)`: every GenerateMany call of this process
    ends (OK) as soon as its open streams have ended, and opens nothing more (a stream opened
    meanwhile ends UNAVAILABLE with `message` at once). Its client then opens a new session, on
    another server. Without this an idle call, which never ends on its own, outlived the grace
    and gRPC logged its forced cancellation as an unhandled servicer error."""
    Session.draining = message
    for session in list(_LIVE):
        session._wake.set()


class Session:
    """One GenerateMany call on the server: its open streams and the batch gathering for the
    client. Everything runs on the call's event loop; the stream tasks append to `_batch` and
    wake the writer, which alone swaps it out."""

    draining: str | None = None  # the refusal, set for the whole process by `drain_sessions`

    def __init__(self, generate: Generation, batch_type: Any) -> None:
        self._generate = generate
        self._batch_type = batch_type  # the proto's GenerateManyResponse
        self._streams: dict[int, asyncio.Task[None]] = {}
        self._batch = batch_type()
        self._wake = asyncio.Event()
        _LIVE.add(self)

    async def run(self, requests: AsyncIterable[Any]) -> AsyncIterator[Any]:
        """The call's responses: batches of events until the client half-closed and every stream
        ended. A protocol violation raises InvalidRequest (the call's status)."""
        reader = asyncio.ensure_future(self._read(requests))
        reader.add_done_callback(lambda _: self._wake.set())
        try:
            while True:
                if self._batch.events:
                    batch, self._batch = self._batch, self._batch_type()
                    for part in self._parts(batch):
                        yield part  # gRPC writes it; meanwhile the streams fill the next batch
                    continue
                if reader.done():
                    reader.result()  # a protocol violation ends the call with its status
                    if not self._streams:
                        return
                if self.draining is not None and not self._streams:
                    return  # the server is stopping: the client opens its next session elsewhere
                self._wake.clear()
                await self._wake.wait()
        finally:
            reader.cancel()
            for task in self._streams.values():
                task.cancel()

    def _parts(self, batch: Any) -> list[Any]:
        """`batch` as messages of at most MAX_BATCH_EVENTS events, in order."""
        events = batch.events
        if len(events) <= MAX_BATCH_EVENTS:
            return [batch]
        return [
            self._batch_type(events=events[i : i + MAX_BATCH_EVENTS])
            for i in range(0, len(events), MAX_BATCH_EVENTS)
        ]

    async def _read(self, requests: AsyncIterable[Any]) -> None:
        async for message in requests:
            action = message.WhichOneof("action")
            if action == "open":
                self._open(message.open)
            elif action == "cancel":
                task = self._streams.pop(message.cancel, None)
                if task is not None:
                    task.cancel()
            else:
                raise InvalidRequest("a GenerateManyRequest must open or cancel a stream", param="action")

    def _open(self, stream: Any) -> None:
        sid = stream.stream_id
        if sid in self._streams:
            raise InvalidRequest(f"stream {sid} is already open on this call", param="stream_id")
        if self.draining is not None:
            code = grpc.StatusCode.UNAVAILABLE
            end = common_pb2.StreamEnd(code=code.value[0], message=self.draining)
            self._batch.events.add(stream_id=sid, end=end)
            self._wake.set()
            return
        metadata = tuple((m.key, m.value) for m in stream.metadata)
        timeout = stream.timeout_ms / 1000 if stream.timeout_ms else None
        self._streams[sid] = asyncio.ensure_future(self._serve(sid, stream.request, metadata, timeout))

    async def _serve(self, sid: int, request: Any, metadata: Metadata, timeout: float | None) -> None:
        """Stream `sid` to its end. Cancelled (by the client, or the call ending): nothing more is
        sent for it, the client no longer listens."""
        try:
            try:
                async with asyncio.timeout(timeout):
                    async for response in self._generate(request, metadata):
                        event = self._batch.events.add(stream_id=sid)  # the batch gathering now
                        event.response.CopyFrom(response)
                        self._wake.set()
                end = common_pb2.StreamEnd()
            except Exception as exc:  # what Generate's status would have been; CancelledError passes
                code, message, param = status_of(exc)
                end = common_pb2.StreamEnd(code=code.value[0], message=message, param=param or "")
            self._batch.events.add(stream_id=sid, end=end)
        finally:
            if self._streams.get(sid) is asyncio.current_task():
                del self._streams[sid]
            self._wake.set()


# ---- client ----------------------------------------------------------------------------------


def rpc_error(
    code: grpc.StatusCode, message: str, param: str = "", answered: bool = False
) -> grpc.aio.AioRpcError:
    """The error a failed Generate call raises: `code`, `message`, the field at fault as data;
    `answered`: the server ended the stream with it (services/common/errors.py `answered`)."""
    trailing = grpc.aio.Metadata((PARAM_METADATA_KEY, param)) if param else grpc.aio.Metadata()
    if answered:
        trailing.add(ANSWERED_METADATA_KEY, "1")
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=message)


_CANCELLED = object()  # in an inbox: the StreamCall was cancelled
_Item: TypeAlias = Any  # a StreamEvent, an AioRpcError (the session failed) or _CANCELLED


class Multiplexer:
    """A service stub whose Generate calls travel multiplexed (any other method as the stub's).
    One per stub and event loop."""

    def __init__(self, stub: Any, messages: ModuleType) -> None:
        self.stub = stub
        self.messages = messages  # the proto module: GenerateManyRequest, OpenStream
        self._unsupported_at: float | None = None  # when the server answered UNIMPLEMENTED
        self._session: _ClientSession | None = None
        self._opening = asyncio.Lock()
        self._ids = itertools.count(1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stub, name)

    @property
    def multiplexed(self) -> bool:
        """False while Generate calls go one call each (the server lacked GenerateMany lately)."""
        unsupported = self._unsupported_at
        return unsupported is None or time.monotonic() - unsupported >= RECHECK_S

    def Generate(self, request: Any, timeout: float | None = None, metadata: Metadata | None = None) -> Any:
        if not self.multiplexed:
            return self.stub.Generate(request, timeout=timeout, metadata=metadata)
        return StreamCall(self, request, timeout, tuple(metadata or ()))

    async def session(self) -> _ClientSession | None:
        """The open session; a new one when there is none or the last one failed; None when the
        server has no GenerateMany (then Generate calls)."""
        if self._session is not None and self._session.error is None:
            return self._session
        async with self._opening:
            if not self.multiplexed:  # learned while this call waited
                return None
            if self._session is None or self._session.error is not None:
                if not await self._has_generate_many():
                    self._unsupported_at = time.monotonic()
                    return None
                self._unsupported_at = None
                self._session = _ClientSession(self.stub, self.messages)
            return self._session

    async def _has_generate_many(self) -> bool:
        """Ask with a call that sends nothing: a server with GenerateMany ends it OK at once, an
        older one answers UNIMPLEMENTED. (Asking with the session itself would not tell: a
        message on its way when the status comes turns the status into INTERNAL.) Any other
        failure says nothing: the session is opened and its streams get that failure."""
        call = self.stub.GenerateMany(timeout=PROBE_TIMEOUT_S)
        with contextlib.suppress(Exception):  # a failed call: its status says why, below
            await call.done_writing()
        return await call.code() is not grpc.StatusCode.UNIMPLEMENTED

    def open_streams(self) -> int:
        """Generations open on the current session (0 without one)."""
        return len(self._session.streams) if self._session is not None else 0

    def next_id(self) -> int:
        return next(self._ids)

    def close(self) -> None:
        """Cancel the open session (its streams fail with CANCELLED)."""
        if self._session is not None:
            self._session.call.cancel()


class _ClientSession:
    """One GenerateMany call on the client: the messages to send, and the open streams' inboxes."""

    def __init__(self, stub: Any, messages: ModuleType) -> None:
        self._request_type = messages.GenerateManyRequest
        self._outgoing: asyncio.Queue[Any] = asyncio.Queue()  # None: the call ended
        self.streams: dict[int, asyncio.Queue[_Item]] = {}
        self.error: grpc.aio.AioRpcError | None = None  # set once the call ended
        self.call = stub.GenerateMany(self._requests())
        self._reader = asyncio.ensure_future(self._read())

    async def _requests(self) -> AsyncIterator[Any]:
        while (message := await self._outgoing.get()) is not None:
            yield message

    def open(self, sid: int, inbox: asyncio.Queue[_Item], stream: Any) -> None:
        if self.error is not None:
            inbox.put_nowait(self.error)
            return
        self.streams[sid] = inbox
        self._outgoing.put_nowait(self._request_type(open=stream))

    def cancel(self, sid: int) -> None:
        if self.streams.pop(sid, None) is not None and self.error is None:
            self._outgoing.put_nowait(self._request_type(cancel=sid))

    async def _read(self) -> None:
        streams = self.streams
        try:
            async for batch in self.call:
                for event in batch.events:
                    inbox = streams.get(event.stream_id)
                    if inbox is None:
                        continue  # cancelled here; its last events were on the way
                    if event.HasField("end"):
                        del streams[event.stream_id]
                    inbox.put_nowait(event)
            error = rpc_error(grpc.StatusCode.UNAVAILABLE, "the server ended the GenerateMany stream")
        except grpc.aio.AioRpcError as exc:
            error = exc
            if exc.code() is grpc.StatusCode.INTERNAL and exc.details() == _WRITE_RACE:
                # The call ended (the server gone) while a message of ours was on its way, and
                # grpc.aio reports that instead of the status: the stream broke.
                error = rpc_error(grpc.StatusCode.UNAVAILABLE, "the GenerateMany stream broke")
        except asyncio.CancelledError:
            # Its channel closed (the server removed from the client's view, the client shutting
            # down): for each generation the connection is gone, as UNAVAILABLE says; CANCELLED
            # would say its own caller gave up, and no retry policy retries that.
            error = rpc_error(grpc.StatusCode.UNAVAILABLE, "the GenerateMany stream was closed")
        self.error = error
        self._outgoing.put_nowait(None)  # grpc.aio's task sending our messages ends too
        for inbox in streams.values():
            inbox.put_nowait(error)
        streams.clear()


class StreamCall:
    """One generation on the server, as the Generate call it stands for (see the module doc)."""

    def __init__(
        self, mux: Multiplexer, request: Any, timeout: float | None, metadata: tuple[tuple[str, str], ...]
    ) -> None:
        self._mux = mux
        self._request = request
        self._timeout = timeout
        self._metadata = metadata
        self._inbox: asyncio.Queue[_Item] = asyncio.Queue()
        self._session: _ClientSession | None = None
        self._sid = 0
        self._fallback: Any = None  # the Generate call, on a server without GenerateMany
        self._done = False

    def cancel(self) -> bool:
        """Cancel the generation (a no-op once it ended); True if it was still running."""
        if self._done:
            return False
        self._done = True
        if self._fallback is not None:
            self._fallback.cancel()
        elif self._session is not None:
            self._session.cancel(self._sid)
        self._inbox.put_nowait(_CANCELLED)
        return True

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[Any]:
        if self._done:
            raise asyncio.CancelledError
        session = await self._mux.session()
        if self._done:
            raise asyncio.CancelledError
        if session is None:  # a server without GenerateMany
            self._fallback = self._mux.stub.Generate(
                self._request, timeout=self._timeout, metadata=self._metadata or None
            )
            async for response in self._fallback:
                yield response
            return
        self._session, self._sid = session, self._mux.next_id()
        timeout_ms = max(1, round(self._timeout * 1000)) if self._timeout is not None else 0
        stream = self._mux.messages.OpenStream(
            stream_id=self._sid, request=self._request, timeout_ms=timeout_ms
        )
        for key, value in self._metadata:
            stream.metadata.add(key=key, value=value)
        session.open(self._sid, self._inbox, stream)
        # The server's deadline ends the stream; this one answers should the server not.
        expiry = None
        if self._timeout is not None:
            error = rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            expiry = asyncio.get_running_loop().call_later(self._timeout + 1.0, self._inbox.put_nowait, error)
        try:
            while True:
                item = await self._inbox.get()
                if item is _CANCELLED:
                    raise asyncio.CancelledError  # as a cancelled grpc.aio call's iteration
                if isinstance(item, grpc.aio.AioRpcError):
                    raise item
                if item.HasField("end"):
                    end = item.end
                    if end.code:
                        code = _CODES.get(end.code, grpc.StatusCode.UNKNOWN)
                        raise rpc_error(code, end.message, end.param, answered=True)
                    return
                yield item.response
        finally:
            if expiry is not None:
                expiry.cancel()
            self.cancel()
