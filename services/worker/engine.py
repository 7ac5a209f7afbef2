"""The engine process seen from the worker's event loop.

`EngineClient` calls back on its receiver thread; `AsyncEngine` hops the outputs onto the loop
into per-request `RequestStream`s, one loop wake-up for all the outputs posted before the loop
ran (an engine step's outputs for every running request arrive together). A stream whose caller
fell behind hands over everything queued as one output (`RequestOutput.then`), so a slow hop
sends fewer, larger messages instead of a growing backlog. Closing or cancelling a stream
before the request finished aborts it in the engine, so a cancelled RPC frees its KV.

Liveness: `ping()` (called every half second by the worker) asks the engine for its stats; the
engine answers between steps, so a recent answer means it is making progress.
`RequestStream.outputs(stall_s)` yields `KEEPALIVE` after each `stall_s / 4` without an output,
so a caller can tell a queued or prefilling request on a busy worker from a frozen worker (which
sends nothing at all), and raises `Unavailable` once the engine has not answered
for `stall_s` (at least `MIN_ENGINE_SILENCE_S`, so a short bound does not fail a long step).

Admission: `admit()` bounds the calls open on this worker (`max_open`); past it a new call is
refused with `CapacityError` (RESOURCE_EXHAUSTED) instead of queueing without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Final

from services.common.silence import SilenceTimer
from shared.config import EngineConfig
from shared.engine_client import EngineClient
from shared.errors import CapacityError, Unavailable
from shared.inputs import Prompt
from shared.outputs import RequestOutput
from shared.transfer.records import KvTarget

MIN_ENGINE_SILENCE_S = 5.0


class Keepalive:
    def __repr__(self) -> str:
        return "KEEPALIVE"


KEEPALIVE: Final = Keepalive()


class LoopInbox:
    """Puts items on asyncio queues of one loop from any thread. The first post after the loop
    last drained the inbox wakes it (`call_soon_threadsafe`: a write to its self-pipe and a
    loop turn); posts before it runs ride along, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._posted: list[tuple[asyncio.Queue[Any], Any]] = []
        self._wake_pending = False
        self._lock = threading.Lock()

    def post(self, queue: asyncio.Queue[Any], item: Any) -> None:  # any thread
        with self._lock:
            self._posted.append((queue, item))
            if self._wake_pending:
                return
            self._wake_pending = True
        self.loop.call_soon_threadsafe(self.drain)

    def drain(self) -> None:  # the loop
        with self._lock:
            posted, self._posted = self._posted, []
            self._wake_pending = False
        for queue, item in posted:
            queue.put_nowait(item)


class RequestStream:
    """Outputs of one request, in order; iteration ends after the finished output."""

    def __init__(self, engine: AsyncEngine, rid: str) -> None:
        self.engine = engine
        self.rid = rid
        self.finished = False
        self._queue: asyncio.Queue[RequestOutput | BaseException | Keepalive] = asyncio.Queue()
        self._held: RequestOutput | BaseException | Keepalive | None = None  # taken, not yet given

    def push(self, item: RequestOutput | BaseException) -> None:  # any thread
        self.engine.inbox.post(self._queue, item)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        async for item in self.outputs(0.0):
            assert isinstance(item, RequestOutput)
            yield item

    async def outputs(
        self, stall_s: float, coalesce: bool = False
    ) -> AsyncIterator[RequestOutput | Keepalive]:
        """The outputs, with `KEEPALIVE` after each `stall_s / 4` of silence (`stall_s` > 0),
        failing once the engine has been silent for `stall_s`. With `coalesce` (token streams
        only: the merge keeps tokens, text, logprobs and the last output's other fields), the
        outputs queued by the time the caller asks for the next come as one."""
        silence_s = max(stall_s, MIN_ENGINE_SILENCE_S)
        timer = (
            SilenceTimer(stall_s / 4, lambda: self._queue.put_nowait(KEEPALIVE), repeat=True)
            if stall_s > 0
            else None
        )
        try:
            while not self.finished:
                item, self._held = self._held or await self._queue.get(), None
                while coalesce and isinstance(item, RequestOutput) and not item.finished:
                    if self._queue.empty():
                        break
                    later = self._queue.get_nowait()  # the caller fell behind: one output for all
                    if isinstance(later, RequestOutput):
                        item = item.then(later)
                    elif isinstance(later, BaseException):
                        self._held = later  # after the tokens that came before it
                        break
                    # a keepalive between outputs says nothing the merged output does not
                if isinstance(item, Keepalive):
                    error = self.engine.silence_error(silence_s)
                    if error is not None:
                        raise error  # not finished: close() aborts it in the engine
                    yield item
                    continue
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                if timer is not None:
                    timer.pause()  # our caller's time is not the engine's silence
                yield item
                if timer is not None:
                    timer.touch()
        finally:
            if timer is not None:
                timer.stop()
            self.close()

    def close(self) -> None:
        """Abort the request if it is still running (a cancelled or abandoned RPC)."""
        if not self.finished:
            self.finished = True
            self.engine.client.abort(self.rid)


@dataclass
class Expectation:
    """A decode engine's expected prompt: its output stream and the engine's pending answer."""

    stream: RequestStream
    answer: Future[Any]

    async def accepted(self, stall_s: float = 0.0) -> RequestStream:
        """The stream once the engine accepted the prompt; raises its refusal (the stream is then
        done: nothing to abort), or Unavailable when it has not answered for `stall_s` (> 0)."""
        try:
            await self.stream.engine.admitted(self.stream.rid, self.answer, stall_s)
        except BaseException:
            self.stream.finished = True  # refused, or aborted by `admitted`
            raise
        return self.stream


class AsyncEngine:
    def __init__(self, config: EngineConfig, max_open: int = 0) -> None:
        self.config = config
        self.client = EngineClient(config)  # blocks until the engine is ready (or failed)
        self.loop = asyncio.get_running_loop()
        self.max_open = max_open  # calls open at once (0: no bound)
        self.open = 0
        # Shutting down: new calls are refused. The server refuses new calls itself, but not
        # new streams of a GenerateMany call already open (services/common/multiplex.py).
        self.closing = False
        self.alive_at = time.monotonic()  # when the engine last answered a ping
        self._pinging = False
        self.inbox = LoopInbox(self.loop)  # the client's thread -> the streams' queues

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Count a call against `max_open` while it is open; refuse it past the bound, or
        once the worker is shutting down (UNAVAILABLE: the router tries another worker)."""
        if self.closing:
            raise Unavailable("the worker is shutting down")
        if self.max_open and self.open >= self.max_open:
            raise CapacityError(f"the worker is at capacity ({self.open} calls open); retry later")
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1

    def ping(self) -> None:
        """Ask the engine for its stats unless the last ask is still unanswered; the answer
        stamps `alive_at` (on the client's receiver thread: a float store)."""
        if self._pinging or self.client.error is not None:
            return
        self._pinging = True

        def answered(fut: Future[dict[str, int]]) -> None:
            self._pinging = False
            if not fut.cancelled() and fut.exception() is None:
                self.alive_at = time.monotonic()

        try:
            self.client.stats().add_done_callback(answered)
        except Unavailable:  # the engine is gone
            self._pinging = False

    def silent_for(self) -> float:
        """Seconds since the engine last answered a ping."""
        return time.monotonic() - self.alive_at

    def silence_error(self, bound_s: float) -> Unavailable | None:
        """The error for a request once the engine has not answered for `bound_s`."""
        silent = self.silent_for()
        if silent < bound_s:
            return None
        return Unavailable(f"this worker's engine has not answered for {silent:.1f} s")

    async def generate(
        self, rid: str, prompt: Prompt, kv_target: KvTarget | None = None, stall_s: float = 0.0
    ) -> RequestStream:
        """Queue a request; raises the engine's refusal (a RequestError: shared/errors.py), or
        Unavailable when the engine has not answered for `stall_s` (> 0) meanwhile."""
        stream = RequestStream(self, rid)
        fut = self.client.submit([rid], prompt, stream.push, kv_target)
        await self.admitted(rid, fut, stall_s)
        return stream

    async def embed(self, rid: str, input_ids: list[int], pooling: dict[str, Any]) -> RequestOutput:
        """One embedding request, to its finished output (`RequestOutput.embedding`); raises the
        engine's refusal. Cancelling the caller aborts it in the engine."""
        stream = RequestStream(self, rid)
        await self.admitted(rid, self.client.embed(rid, input_ids, pooling, stream.push))
        last: RequestOutput | None = None
        async for out in stream:
            last = out
        assert last is not None and last.finished
        if last.embedding is None:  # aborted (finish_reason abort): the engine said why
            reason = last.finish_reason or {}
            raise Unavailable(str(reason.get("message") or "the embedding request was aborted"))
        return last

    def expect_kv(self, rid: str, prompt: Prompt, lease_s: float | None = None) -> Expectation:
        """Decode engine: register a prompt whose KV a prefill engine will write. Returns at once,
        the message sent: the prefill side may be told before the engine answers (`Expectation.
        accepted`), since the engine takes this before any reservation for the request, both
        travelling in order on this client's one socket, and a busy engine answers only between
        its steps."""
        stream = RequestStream(self, rid)
        return Expectation(stream, self.client.expect_kv(rid, prompt, stream.push, lease_s))

    async def reserve_kv(self, rid: str) -> list[int]:
        """Decode engine: pages for an expected prompt, once there is room. A caller that leaves
        before the answer aborts the request."""
        pages: list[int] = await self.admitted(rid, self.client.reserve_kv(rid))
        return pages

    def set_kv_target(self, rid: str, pages: list[int]) -> None:
        self.client.set_kv_target(rid, pages)

    async def add_peer(self, metadata: bytes) -> str:
        return await self._await(self.client.add_peer(metadata))

    def remove_peer(self, name: str) -> None:
        self.client.remove_peer(name)

    async def stats(self) -> dict[str, int]:
        return await self._await(self.client.stats())

    def commit_kv(self, commit: bytes, payload: bytes | memoryview | None) -> None:
        self.client.commit_kv(commit, payload)

    def shutdown(self) -> None:
        self.client.shutdown()

    async def admitted(self, rid: str, fut: Future[Any], stall_s: float = 0.0) -> Any:
        """The engine's answer to an add or a reservation. The answer can come late (a grammar
        compiling, a reservation queued): a caller that leaves before it aborts the request, and
        so does an engine that has not answered for `stall_s` (> 0, at least 5 s) meanwhile."""
        answer = asyncio.wrap_future(fut)
        try:
            while True:
                await asyncio.wait([answer], timeout=stall_s / 4 if stall_s > 0 else None)
                if answer.done():
                    return answer.result()
                error = self.silence_error(max(stall_s, MIN_ENGINE_SILENCE_S)) if stall_s > 0 else None
                if error is not None:
                    answer.cancel()  # its late answer is dropped (EngineClient)
                    self.client.abort(rid)
                    raise error
        except asyncio.CancelledError:
            answer.cancel()
            self.client.abort(rid)
            raise

    @staticmethod
    async def _await(fut: Future[Any]) -> Any:
        return await asyncio.wrap_future(fut)
