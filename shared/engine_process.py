"""The engine in its own process: an `EngineCore` stepped by a loop that talks msgspec over ZMQ.

Request handling (gRPC, HTTP, the offline API) never shares a thread, a GIL or a thread pool
with the GPU loop. The client side is `shared.engine_client.EngineClient`.

Wire (msgpack via msgspec, never pickle; two ZMQ PUSH/PULL pairs over ipc:// sockets that
the client binds):

    client -> engine   AddRequest | ExpectKv | ReserveKv | SetKvTarget | CommitKv | AddPeer
                       | RemovePeer | GetStats | AbortRequest | Shutdown
    engine -> client   Ready | Accepted | Rejected | Outputs | StepFailed | Reply

`Accepted`/`Rejected` answer every `AddRequest` and `ExpectKv`, before any output of its requests:
at once, or, for a constrained request whose grammar is still compiling, once it compiled (or
failed to, or took too long: `InvalidRequest`). A rejection carries a `RequestError` as data: its
kind, message and the field at fault (shared/errors.py). `ReserveKv` (decode) is answered by a
`Reply` keyed `reserve:<rid>` carrying the pages, at once or, when the engine is full, once room
frees up (a `Rejected` with that key if the request is aborted first). `AddPeer` and `GetStats`
are answered by a `Reply` with the same key (or a `Rejected` whose rids hold that key). A prefill
engine asks for a reservation with an `Outputs` item carrying `kv_pages_wanted`, sent as soon as
the prompt is scheduled (before its forward runs); `SetKvTarget` answers it.

With `tp_size > 1` this process is tensor-parallel rank 0: it starts the follower ranks
(shared/distributed/launch.py) before building its core and stops them when it leaves. A step
that fails then leaves the group unusable (a rank died, or a collective broke), so the engine
fails what was running and exits, as it does when a follower is found dead while idle; the
client sees the process gone. With ranks on other nodes (`nnodes > 1`) an idle engine pings
them every second, since only its own node's followers are processes it can watch. With DP
attention every rank runs an engine of its own and this process hands the requests out
(shared/distributed/dp_engine.py)."""

from __future__ import annotations

import logging
import math
import multiprocessing
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from shared.config import EngineConfig
from shared.distributed.launch import Followers, start_ranks
from shared.errors import InternalError, RequestError
from shared.inputs import Prompt
from shared.outputs import RequestOutput
from shared.parent_death import signal_on_parent_death
from shared.process_exit import exit_without_teardown
from shared.transfer.records import KvCommit, KvTarget

if TYPE_CHECKING:  # imported in the engine process only: the client side stays free of torch
    from shared.engine_core import EngineCore

logger = logging.getLogger(__name__)


class AddRequest(msgspec.Struct, tag="add"):
    rids: list[str]
    prompt: Prompt
    kv_target: KvTarget | None = None
    pooling: dict[str, Any] | None = None  # an embedding request (shared/pooling.py)


class ExpectKv(msgspec.Struct, tag="expect_kv"):
    rid: str
    prompt: Prompt
    lease_s: float | None = None


class ReserveKv(msgspec.Struct, tag="reserve_kv"):
    rid: str


class SetKvTarget(msgspec.Struct, tag="set_kv_target"):
    rid: str
    pages: list[int]


class CommitKv(msgspec.Struct, tag="commit_kv"):
    commit: bytes  # a KvCommit record; the pages (gRPC transport) follow as a frame of their own


class AddPeer(msgspec.Struct, tag="add_peer"):
    key: str
    metadata: bytes


class RemovePeer(msgspec.Struct, tag="remove_peer"):
    name: str


class GetStats(msgspec.Struct, tag="get_stats"):
    key: str


class AbortRequest(msgspec.Struct, tag="abort"):
    rid: str


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


class Ready(msgspec.Struct, tag="ready"):
    vocab_size: int
    max_context_len: int
    page_size: int
    kv_layout: str
    kv_transport: str  # "nixl" or "grpc"
    agent_name: str  # our NIXL agent ("" without one)
    agent_metadata: bytes | None  # NIXL peers learn our pool from it (PD engines with NIXL)
    tp_size: int = 1  # a PD pair must run the same (every rank moves its own KV shard)


class Accepted(msgspec.Struct, tag="accepted"):
    rids: list[str]


class Rejected(msgspec.Struct, tag="rejected"):
    """A refused call: a `RequestError` as data (shared/errors.py), its field at fault included."""

    rids: list[str]
    kind: str  # RequestError.kind
    message: str
    param: str | None = None

    @classmethod
    def of(cls, rids: list[str], error: RequestError) -> Rejected:
        kind, message, param = error.to_wire()
        return cls(rids, kind, message, param)

    def error(self) -> RequestError:
        return RequestError.from_wire(self.kind, self.message, self.param)


class Reply(msgspec.Struct, tag="reply"):
    key: str
    value: Any


class Outputs(msgspec.Struct, tag="outputs"):
    items: list[RequestOutput]
    # Requests whose `kv_payload` (gRPC transport) follows, one ZMQ frame each, in this order.
    payload_rids: list[str] = []


class StepFailed(msgspec.Struct, tag="step_failed"):
    rids: list[str]
    message: str
    # The engine exits next (its tensor-parallel group broke): the requests failed `Unavailable`,
    # not `InternalError`, so a caller may retry them elsewhere.
    fatal: bool = False


ToEngine = (
    AddRequest
    | ExpectKv
    | ReserveKv
    | SetKvTarget
    | CommitKv
    | AddPeer
    | RemovePeer
    | GetStats
    | AbortRequest
    | Shutdown
)
FromEngine = Ready | Accepted | Rejected | Outputs | StepFailed | Reply
POLL_BACKGROUND_MS = 2  # how often an otherwise idle engine looks at KV transfers and compiles
IDLE_POLL_MS = 1000  # how often an idle engine checks that its parent still lives


def parent_alive() -> bool:
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()


def die_with_parent() -> None:
    """Get SIGKILL when the process that started this engine dies (Linux). Without it an engine
    whose worker was killed ran its open requests to their end, or finished loading its model,
    before it looked: for seconds to minutes, holding the GPU that the worker started again in
    its place (`tandem up`, Kubernetes) sizes its KV pool from."""
    signal_on_parent_death(signal.SIGKILL)  # elsewhere: the idle check in `_serve` still ends it


def run_engine(config: EngineConfig, to_engine: str, from_engine: str, with_parent: bool = False) -> None:
    """Process entry point: build the core, announce `Ready` (or a `Rejected` load error), serve.
    `with_parent`: die with the starting process (`die_with_parent`). SIGINT is ignored: a
    Ctrl-C in a terminal reaches the whole process group, and the engine stops when its client
    (which takes the Ctrl-C) tells it or dies, not in the middle of a step with a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if with_parent:
        die_with_parent()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(to_engine)
    push = ctx.socket(zmq.PUSH)
    push.connect(from_engine)
    encode = msgspec.msgpack.Encoder().encode
    decoder = msgspec.msgpack.Decoder(ToEngine)
    followers: Followers | None = None
    try:
        from shared.engine_core import EngineCore

        followers = start_ranks(config)  # None at tp_size 1
        core = EngineCore(config)
    except Exception as e:
        push.send(encode(Rejected.of([], InternalError(f"{type(e).__name__}: {e}"))))
        push.close(linger=1000)
        if followers is not None:
            followers.stop(graceful=False)
        return
    push.send(
        encode(
            Ready(
                core.runner.vocab_size,
                core.max_context_len,
                core.layout.page_size,
                core.layout.fingerprint,
                core.transport,
                core.agent.name if core.agent is not None else "",
                core.agent.metadata() if core.agent is not None else None,
                config.tp_size,
            )
        )
    )

    def send_early(outputs: list[RequestOutput]) -> None:
        _send_admissions(core, push, encode)  # before any output of theirs
        send_outputs(push, encode, outputs)

    core.early_outputs = send_early
    group_ok = True
    try:
        if config.enable_dp_attention:  # every rank its own requests, in lockstep with rank 0
            from shared.distributed.dp_engine import serve_rank0

            group_ok = serve_rank0(core, pull, push, decoder, encode, followers)
        else:
            group_ok = _serve(core, pull, push, decoder, encode, followers)
    finally:
        if followers is not None:
            _stop_ranks(core, followers, group_ok)
        pull.close(linger=0)
        push.close(linger=1000)
        ctx.term()
    # The client reports the exit status: 1 is not a clean stop.
    exit_without_teardown(0 if group_ok else 1)


def _serve(
    core: EngineCore,
    pull: zmq.Socket[bytes],
    push: zmq.Socket[bytes],
    decoder: msgspec.msgpack.Decoder[ToEngine],
    encode: Any,
    followers: Followers | None = None,
) -> bool:
    """Serve until told to stop (True) or the tensor-parallel group broke (False)."""
    while True:
        # Block while idle; between steps only drain what already arrived; while KV transfers
        # are in flight, look at them every few milliseconds.
        # A paced decode engine waits for its next step, still taking messages and arriving KV
        # (every few milliseconds) meanwhile.
        timeout = (
            min(math.ceil(core.step_delay() * 1000), POLL_BACKGROUND_MS)
            if core.has_work
            else POLL_BACKGROUND_MS
            if core.waiting_in_background
            else IDLE_POLL_MS
        )
        if timeout == IDLE_POLL_MS and not parent_alive():
            logger.warning("the engine's parent process is gone; exiting")
            return True
        if timeout == IDLE_POLL_MS and followers is not None and not _ranks_alive(core, followers):
            return False
        while pull.poll(timeout):
            header, payloads = recv_frames(pull)
            msg = decoder.decode(header)
            if isinstance(msg, Shutdown):
                return True
            reply = handle_message(core, msg, payloads[0] if payloads else None)
            if reply is not None:
                push.send(encode(reply))
            timeout = 0
        _send_admissions(core, push, encode)  # e.g. a queued reservation aborted
        if not (core.has_work or core.waiting_in_background):
            continue
        try:  # paced: no step yet, but the first tokens of arriving KV go out meanwhile
            outputs = core.poll_paced() if core.step_delay() > 0 else core.step()
        except Exception as e:  # fail what was running, keep serving
            logger.exception("engine step failed")
            message = f"engine step failed: {e}"
            if followers is None:
                push.send(encode(StepFailed(core.fail_all(message), message)))
                continue
            # With ranks the group is unusable now: the engine exits.
            message += " (a tensor-parallel rank failed; the engine exits)"
            push.send(encode(StepFailed(core.fail_all(message), message, fatal=True)))
            logger.error("a tensor-parallel step failed (dead ranks: %s); the engine exits", followers.dead())
            return False
        _send_admissions(core, push, encode)  # before any output of theirs
        if outputs:
            send_outputs(push, encode, outputs)


def _ranks_alive(core: EngineCore, followers: Followers) -> bool:
    """Idle: whether every rank lives. This node's followers are our children; ranks on other
    nodes are not, so a ping (a broadcast that fails if one of them died) asks them."""
    if dead := followers.dead():
        logger.error("tensor-parallel rank(s) %s died; the engine exits", dead)
        return False
    if core.config.nnodes > 1:
        try:
            core.runner.ping_followers()
        except Exception as e:
            logger.error("a tensor-parallel rank is gone (%s: %s); the engine exits", type(e).__name__, e)
            return False
    return True


def _stop_ranks(core: EngineCore, followers: Followers, group_ok: bool) -> None:
    from shared.distributed import parallel_state

    if group_ok:
        try:
            core.runner.stop_followers()
        except Exception:  # a rank died meanwhile: nothing left to stop gracefully
            group_ok = False
    followers.stop(graceful=group_ok)
    if group_ok:
        parallel_state.destroy_tensor_parallel()


def send_outputs(push: zmq.Socket[bytes], encode: Any, outputs: list[RequestOutput]) -> None:
    """Outputs as ZMQ frames: the msgpack header, then each KV payload as a frame of its own, sent
    without a copy (a 134 MB payload through msgpack would be copied twice more)."""
    carriers, payloads = [], []
    for out in outputs:
        if out.kv_payload is not None:
            carriers.append(out)
            payloads.append(out.kv_payload)
            out.kv_payload = None
    header = encode(Outputs(outputs, [out.rid for out in carriers]))
    if payloads:
        push.send_multipart([header, *payloads], copy=False)
    else:  # every step's outputs: the plain send, as before payloads had frames
        push.send(header)


def recv_frames(sock: zmq.Socket[bytes]) -> tuple[bytes, list[memoryview]]:
    """A message's msgpack header and the KV payload frames after it (views, not copies)."""
    header = sock.recv()
    payloads = []
    while sock.get(zmq.RCVMORE):
        payloads.append(sock.recv(copy=False).buffer)
    return header, payloads


def reservation_key(rid: str) -> str:
    """The call key under which a `ReserveKv` is answered."""
    return f"reserve:{rid}"


def _send_admissions(core: EngineCore, push: zmq.Socket[bytes], encode: Any) -> None:
    reply: FromEngine
    for rids, pages, error, reservation in core.take_admissions():
        if reservation:
            key = reservation_key(rids[0])
            reply = Rejected.of([key], error) if error else Reply(key, pages)
        else:
            reply = Rejected.of(rids, error) if error else Accepted(rids)
        push.send(encode(reply))


def handle_message(core: EngineCore, msg: ToEngine, payload: memoryview | None = None) -> FromEngine | None:
    """Apply one client message to `core`; its immediate answer, or None (answered later, or
    never: an abort)."""
    from shared.sampling import SamplingParams

    if isinstance(msg, AbortRequest):
        core.abort(msg.rid)
        return None
    if isinstance(msg, CommitKv):
        try:
            commit = KvCommit.decode(msg.commit)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:  # not a commit record
            logger.warning("dropping a malformed KV commit record: %s", e)
            return None
        try:
            core.commit_kv(commit, payload)  # a bad payload aborts that request
        except ValueError as e:  # not a decode engine: nothing of ours to commit to
            logger.warning("dropping a KV commit: %s", e)
        return None
    if isinstance(msg, SetKvTarget):
        try:
            core.set_kv_target(msg.rid, msg.pages)  # bad pages abort that request
        except ValueError as e:  # not a prefill engine
            logger.warning("dropping a KV target: %s", e)
        return None
    if isinstance(msg, AddRequest):
        from shared.pooling import PoolingParams

        try:
            prompt = msg.prompt
            admitted = core.add_request(
                msg.rids,
                prompt.input_ids,
                SamplingParams.from_dict(prompt.params),
                prompt.return_logprob,
                prompt.top_logprobs_num,
                msg.kv_target,
                PoolingParams.from_dict(msg.pooling) if msg.pooling is not None else None,
            )
        except Exception as e:
            return _rejected(msg.rids, e)
        return Accepted(msg.rids) if admitted else None  # a compiling grammar answers later
    if isinstance(msg, ExpectKv):
        return _answer(
            [msg.rid],
            lambda: core.expect_kv(
                msg.rid,
                msg.prompt.input_ids,
                SamplingParams.from_dict(msg.prompt.params),
                msg.prompt.return_logprob,
                msg.prompt.top_logprobs_num,
                msg.lease_s,
            ),
        )
    if isinstance(msg, ReserveKv):
        key = reservation_key(msg.rid)
        reply = _answer([key], lambda: core.reserve_kv(msg.rid), key)
        queued = isinstance(reply, Reply) and reply.value is None
        return None if queued else reply  # a queued reservation is answered when granted
    if isinstance(msg, AddPeer):
        return _answer([msg.key], lambda: core.add_peer(msg.metadata), msg.key)
    if isinstance(msg, RemovePeer):
        try:
            core.remove_peer(msg.name)
        except ValueError as e:  # not a prefill engine
            logger.warning("dropping a peer removal: %s", e)
        return None
    assert isinstance(msg, GetStats)
    # The process's CPU time (every thread: the loop, NIXL's, torch's): the host's share per token.
    return Reply(msg.key, core.stats() | {"engine_cpu_us": int(time.process_time() * 1e6)})


def _answer(rids: list[str], call: Callable[[], Any], reply_key: str | None = None) -> FromEngine:
    """Run a request-changing call: Accepted / Reply (with its value), or Rejected."""
    try:
        value = call()
    except Exception as e:
        return _rejected(rids, e)
    if reply_key is not None:
        return Reply(reply_key, value)
    return Accepted(rids)


def _rejected(rids: list[str], error: Exception) -> Rejected:
    """A refusal; anything outside the taxonomy is our bug: logged, and refused as internal (the
    engine keeps serving)."""
    if not isinstance(error, RequestError):
        logger.exception("internal error handling a request", exc_info=error)
        error = InternalError(f"internal error in the engine: {type(error).__name__}: {error}")
    return Rejected.of(rids, error)
