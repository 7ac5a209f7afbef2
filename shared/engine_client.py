"""Client side of the engine process (`shared.engine_process`): start it, feed it, hear it.

    client = EngineClient(EngineConfig.from_options(model_path))
    client.add(["r1"], Prompt(prompt_ids, {"max_new_tokens": 16}), on_output=print)  # RequestError if refused
    ...
    client.shutdown()

`add` blocks until the engine accepted; `submit` (and `expect_kv`, `reserve_kv`, `add_peer`, `stats`) return a
`concurrent.futures.Future` instead, for callers on an event loop (`asyncio.wrap_future`).
Refusals raise the engine's `RequestError` (shared/errors.py: InvalidRequest, CapacityError, ...).

A caller may cancel a future it no longer wants (an event-loop caller that left); the engine's
answer to it is then dropped, never set on the cancelled future (which would raise on the
receiver thread and stop it delivering anything more).

Any thread may call these methods. Each request's outputs (`RequestOutput` increments, or
an exception when the engine fails it or dies) go to its `on_output` callback, called on the
client's receiver thread: callbacks must be quick and must not block (hand off to a queue or
an event loop). When the engine process dies, every open request gets `Unavailable` at once.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import multiprocessing
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import msgspec
import zmq

from shared.config import EngineConfig
from shared.engine_process import (
    AbortRequest,
    Accepted,
    AddPeer,
    AddRequest,
    CommitKv,
    ExpectKv,
    FromEngine,
    GetStats,
    Outputs,
    Ready,
    Rejected,
    RemovePeer,
    Reply,
    ReserveKv,
    SetKvTarget,
    Shutdown,
    StepFailed,
    ToEngine,
    recv_frames,
    reservation_key,
    run_engine,
)
from shared.errors import InternalError, InvalidRequest, Unavailable
from shared.inputs import Prompt
from shared.outputs import RequestOutput
from shared.transfer.records import KvTarget

OutputHandler = Callable[[RequestOutput | BaseException], None]
# The receiver wakes for a message or the engine process's end (its sentinel); this bounds the
# wait in between, for the client's own `shutdown`.
_POLL_MS = 200
_LAST_WORDS_MS = 50


_DIR_PREFIX = "tandem-engine-"  # the sockets' directory, one per client, in the temp directory
_OWNER = "owner"  # the file in it naming the client: its process id and PID namespace


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def remove_orphaned_socket_dirs(parent: str) -> list[str]:
    """Remove the socket directories in `parent` whose client process is gone (killed, so it
    never removed its own: a SIGKILLed worker and its engine leave one each time); the removed.
    Only those of this PID namespace: a temp directory shared with another container holds ids
    this process cannot see."""
    removed = []
    namespace = _pid_namespace()
    for path in glob.glob(os.path.join(parent, _DIR_PREFIX + "*")):
        try:
            with open(os.path.join(path, _OWNER)) as f:
                pid_text, _, owner_namespace = f.read().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            continue  # being made, or made before owners were written: left alone
        if owner_namespace != namespace:
            continue
        try:
            os.kill(pid, 0)
            continue  # alive (or reused: the directory then waits for a later start)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class EngineClient:
    def __init__(self, config: EngineConfig) -> None:
        remove_orphaned_socket_dirs(tempfile.gettempdir())
        self._dir = tempfile.mkdtemp(prefix=_DIR_PREFIX)
        with open(os.path.join(self._dir, _OWNER), "w") as f:
            f.write(f"{os.getpid()} {_pid_namespace()}")
        to_engine, from_engine = f"ipc://{self._dir}/to-engine", f"ipc://{self._dir}/from-engine"
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        # Sends never block the caller (often an event loop): no queue bound while the engine
        # is connected, and an error at once when it is not (a PUSH socket without a peer
        # would otherwise block until one connects, i.e. forever once the engine died).
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.bind(to_engine)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(from_engine)
        self._encode = msgspec.msgpack.Encoder().encode
        self._decoder = msgspec.msgpack.Decoder(FromEngine)
        self._send_lock = threading.Lock()  # ZMQ sockets are not thread-safe
        self._state_lock = threading.Lock()
        self._handlers: dict[str, OutputHandler] = {}
        self._calls: dict[str, Future[Any]] = {}  # answers awaited, by request id or call key
        self._keys = itertools.count()
        self._closed = False
        self.error: str | None = None  # why the engine is gone, once it is
        # The kernel ties PR_SET_PDEATHSIG to the thread that starts the engine: only the main
        # thread lives as long as this process (an LLM built on a short-lived thread must not
        # lose its engine when that thread ends).
        with_parent = threading.current_thread() is threading.main_thread()
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_engine,
            args=(config, to_engine, from_engine, with_parent),
            name="tandem-engine",
            daemon=True,
        )
        self.process.start()
        self._poller = zmq.Poller()  # a message, or the engine process gone
        self._poller.register(self._pull, zmq.POLLIN)
        self._poller.register(self.process.sentinel, zmq.POLLIN)
        try:
            ready = self._wait_ready()
        except BaseException:
            self._close_sockets()
            raise
        self.vocab_size = ready.vocab_size
        self.max_context_len = ready.max_context_len
        self.page_size = ready.page_size
        self.kv_layout = ready.kv_layout
        self.kv_transport = ready.kv_transport
        self.agent_name = ready.agent_name
        self.agent_metadata = ready.agent_metadata
        self.tp_size = ready.tp_size
        self._receiver = threading.Thread(target=self._receive, name="tandem-engine-client", daemon=True)
        self._receiver.start()

    # ---- requests ------------------------------------------------------------------------------

    def add(
        self, rids: list[str], prompt: Prompt, on_output: OutputHandler, kv_target: KvTarget | None = None
    ) -> None:
        """Queue one prompt (its `n` samples named by `rids`); raises the engine's RequestError."""
        self.submit(rids, prompt, on_output, kv_target).result()

    def submit(
        self,
        rids: list[str],
        prompt: Prompt,
        on_output: OutputHandler | dict[str, OutputHandler],
        kv_target: KvTarget | None = None,
        pooling: dict[str, Any] | None = None,
    ) -> Future[None]:
        """As `add`, answered through a future (done when the engine accepted or refused).
        `on_output` may be one handler per rid. `pooling` (PoolingParams' fields) makes it an
        embedding request: one rid, the prompt's `params` unused, the final output carries
        `embedding`."""
        msg = AddRequest(rids, prompt, kv_target, pooling)
        handlers = on_output if isinstance(on_output, dict) else dict.fromkeys(rids, on_output)
        return self._call(rids[0], msg, handlers)

    def embed(
        self, rid: str, input_ids: list[int], pooling: dict[str, Any], on_output: OutputHandler
    ) -> Future[None]:
        """An embedding request (see `submit`)."""
        return self.submit([rid], Prompt(input_ids, {}), on_output, pooling=pooling)

    def expect_kv(
        self, rid: str, prompt: Prompt, on_output: OutputHandler, lease_s: float | None = None
    ) -> Future[None]:
        """Decode engine: a prompt whose KV a prefill engine will write (it holds no pages yet);
        the future is done when the engine accepted or refused it."""
        msg = ExpectKv(rid, prompt, lease_s)
        return self._call(rid, msg, {rid: on_output})

    def reserve_kv(self, rid: str) -> Future[list[int]]:
        """Decode engine: pages for an expected prompt; the future gives the page ids once
        there is room (it waits, first come first served, until then or an abort)."""
        key = reservation_key(rid)
        return self._call(key, ReserveKv(rid), {})

    def set_kv_target(self, rid: str, pages: list[int]) -> None:
        """Prefill engine: the decode engine's pages for a request that asked for them."""
        self._send(SetKvTarget(rid, pages))

    def commit_kv(self, commit: bytes, payload: bytes | memoryview | None = None) -> None:
        """Decode engine, gRPC transport: a reservation's pages (bytes) and commit record."""
        self._send(CommitKv(commit), payload)

    def add_peer(self, metadata: bytes) -> Future[str]:
        """Prefill engine: learn a decode engine's NIXL metadata; the future gives its agent name."""
        key = f"peer:{next(self._keys)}"
        return self._call(key, AddPeer(key, metadata), {})

    def remove_peer(self, name: str) -> None:
        """Prefill engine: forget a decode engine's NIXL agent once no write goes there."""
        self._send(RemovePeer(name))

    def stats(self) -> Future[dict[str, int]]:
        """The engine's load and counters (`EngineCore.stats`)."""
        key = f"stats:{next(self._keys)}"
        return self._call(key, GetStats(key), {})

    def _call(self, key: str, msg: ToEngine, handlers: dict[str, OutputHandler]) -> Future[Any]:
        answer: Future[Any] = Future()
        with self._state_lock:
            if self.error is not None or self._closed:
                raise Unavailable(self.error or "the engine client was shut down")
            # A second caller with the same id must not take over (and then lose) the first
            # caller's outputs: it is refused here, before anything reaches the engine.
            for taken in (key, *handlers):
                if taken in self._calls or taken in self._handlers:
                    raise InvalidRequest(f"request id {taken!r} is already in use", param="request_id")
            self._calls[key] = answer
            self._handlers.update(handlers)
        self._send(msg)
        return answer

    def abort(self, rid: str) -> None:
        """Stop a request; its handler gets a final output with finish_reason abort."""
        if self.error is None and not self._closed:
            with contextlib.suppress(Unavailable):  # the engine is gone: nothing left to stop
                self._send(AbortRequest(rid))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine process (killing it if it does not stop in time) and fail open requests."""
        if self._closed:
            return
        self._closed = True
        if self.process.is_alive():
            with contextlib.suppress(Unavailable):
                self._send(Shutdown())
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._receiver.join()
        self._fail_all("the engine client was shut down")
        self._close_sockets()

    # ---- receiving -----------------------------------------------------------------------------

    def _send(self, msg: ToEngine, payload: bytes | memoryview | None = None) -> None:
        """`payload` (KV pages) goes as a frame of its own, without a copy."""
        with self._send_lock:
            try:
                if payload is None:
                    self._push.send(self._encode(msg), zmq.NOBLOCK)
                else:
                    self._push.send_multipart([self._encode(msg), payload], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                raise Unavailable(self.error or "the engine process is not connected (gone?)") from None

    def _wait_ready(self) -> Ready:
        while not self._message_or_exit():
            if not self.process.is_alive():
                code = self.process.exitcode
                raise RuntimeError(f"the engine process exited during start-up (exit code {code})")
        msg = self._decoder.decode(self._pull.recv())
        if isinstance(msg, Rejected):
            self.process.join()
            raise RuntimeError(f"the engine failed to start: {msg.message}")
        assert isinstance(msg, Ready), msg
        return msg

    def _message_or_exit(self) -> bool:
        """Wait up to `_POLL_MS` for the engine's next message or its process's end: whether a
        message is there. Woken by the end, it waits `_LAST_WORDS_MS` more for a message the
        engine sent before exiting (a `StepFailed`, a start-up `Rejected`) that the socket has
        not delivered yet."""
        events = self._poller.poll(_POLL_MS)
        if any(sock is self._pull for sock, _ in events):
            return True
        return bool(events) and bool(self._pull.poll(_LAST_WORDS_MS))

    def _receive(self) -> None:
        while True:
            if self._message_or_exit():
                self._dispatch(self._receive_one())
                continue
            if self._closed:
                return
            if not self.process.is_alive():
                self._fail_all(f"the engine process died (exit code {self.process.exitcode})")
                return

    def _receive_one(self) -> FromEngine:
        header, frames = recv_frames(self._pull)
        msg = self._decoder.decode(header)
        if isinstance(msg, Outputs) and msg.payload_rids:  # KV payloads follow, one frame each
            payloads = dict(zip(msg.payload_rids, frames))
            for out in msg.items:
                out.kv_payload = payloads.get(out.rid, out.kv_payload)
        return msg

    def _dispatch(self, msg: FromEngine) -> None:
        if isinstance(msg, Outputs):
            for out in msg.items:
                with self._state_lock:
                    handler = self._handlers.pop(out.rid) if out.finished else self._handlers.get(out.rid)
                if handler is not None:
                    handler(out)
        elif isinstance(msg, Accepted | Rejected | Reply):
            key = msg.key if isinstance(msg, Reply) else msg.rids[0]
            with self._state_lock:
                fut = self._calls.pop(key, None)
                if isinstance(msg, Rejected):
                    for rid in msg.rids:
                        self._handlers.pop(rid, None)
            if fut is None or not fut.set_running_or_notify_cancel():  # the caller left
                return
            if isinstance(msg, Rejected):
                fut.set_exception(msg.error())
            elif isinstance(msg, Reply):
                fut.set_result(msg.value)
            else:
                fut.set_result(None)
        elif isinstance(msg, StepFailed):
            with self._state_lock:
                handlers = [self._handlers.pop(rid) for rid in msg.rids if rid in self._handlers]
            error = Unavailable if msg.fatal else InternalError
            for handler in handlers:
                handler(error(msg.message))

    def _fail_all(self, reason: str) -> None:
        with self._state_lock:
            self.error = self.error or reason
            handlers, self._handlers = list(self._handlers.values()), {}
            calls, self._calls = list(self._calls.values()), {}
        for handler in handlers:
            handler(Unavailable(reason))
        for fut in calls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(Unavailable(reason))

    def _close_sockets(self) -> None:
        self._push.close(linger=0)
        self._pull.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
