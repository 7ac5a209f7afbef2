"""The engine in its own process: an `EngineCore` stepped by a loop that talks msgspec over ZMQ.

Request handling (gRPC, HTTP, the offline API) never shares a thread, a GIL or a thread pool
with the GPU loop. The client side is `shared.engine_client.EngineClient`.

Wire (msgpack via msgspec, never pickle; two ZMQ PUSH/PULL pairs over ipc:// sockets that
the client binds):

    client -> engine   AddRequest | AbortRequest | Shutdown
    engine -> client   Ready | Accepted | Rejected | Outputs | StepFailed

`Accepted`/`Rejected` answer every `AddRequest` in order, before any output of its requests;
a rejection carries the engine's `ValueError` message.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import zmq

from shared.config import EngineConfig
from shared.engine_core import EngineCore, RequestOutput
from shared.sampling import SamplingParams

logger = logging.getLogger(__name__)


class AddRequest(msgspec.Struct, tag="add"):
    rids: list[str]
    input_ids: list[int]
    params: dict[str, Any]
    return_logprob: bool = False
    top_logprobs_num: int = 0


class AbortRequest(msgspec.Struct, tag="abort"):
    rid: str


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


class Ready(msgspec.Struct, tag="ready"):
    vocab_size: int
    max_context_len: int


class Accepted(msgspec.Struct, tag="accepted"):
    rids: list[str]


class Rejected(msgspec.Struct, tag="rejected"):
    rids: list[str]
    error: str  # "ValueError", or "LoadError" when the engine could not start
    message: str


class Outputs(msgspec.Struct, tag="outputs"):
    items: list[RequestOutput]


class StepFailed(msgspec.Struct, tag="step_failed"):
    rids: list[str]
    message: str


ToEngine = AddRequest | AbortRequest | Shutdown
FromEngine = Ready | Accepted | Rejected | Outputs | StepFailed


def run_engine(config: EngineConfig, to_engine: str, from_engine: str) -> None:
    """Process entry point: build the core, announce `Ready` (or a `Rejected` load error), serve."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(to_engine)
    push = ctx.socket(zmq.PUSH)
    push.connect(from_engine)
    encode = msgspec.msgpack.Encoder().encode
    decoder = msgspec.msgpack.Decoder(ToEngine)
    try:
        core = EngineCore(config)
    except Exception as e:
        push.send(encode(Rejected([], "LoadError", f"{type(e).__name__}: {e}")))
        push.close(linger=1000)
        return
    push.send(encode(Ready(core.runner.vocab_size, core.max_context_len)))
    try:
        _serve(core, pull, push, decoder, encode)
    finally:
        pull.close(linger=0)
        push.close(linger=1000)
        ctx.term()


def _serve(
    core: EngineCore,
    pull: zmq.Socket[bytes],
    push: zmq.Socket[bytes],
    decoder: msgspec.msgpack.Decoder[ToEngine],
    encode: Any,
) -> None:
    while True:
        # Block while idle; between steps only drain what already arrived.
        timeout = 0 if core.has_work else None
        while pull.poll(timeout):
            msg = decoder.decode(pull.recv())
            if isinstance(msg, Shutdown):
                return
            if isinstance(msg, AbortRequest):
                core.abort(msg.rid)
            else:
                push.send(encode(_add(core, msg)))
            timeout = 0
        if not core.has_work:
            continue
        try:
            outputs = core.step()
        except Exception as e:  # fail what was running, keep serving
            logger.exception("engine step failed")
            message = f"engine step failed: {e}"
            push.send(encode(StepFailed(core.fail_all(message), message)))
            continue
        if outputs:
            push.send(encode(Outputs(outputs)))


def _add(core: EngineCore, msg: AddRequest) -> Accepted | Rejected:
    try:
        params = SamplingParams.from_dict(msg.params)
        core.add_request(msg.rids, msg.input_ids, params, msg.return_logprob, msg.top_logprobs_num)
    except ValueError as e:
        return Rejected(msg.rids, "ValueError", str(e))
    return Accepted(msg.rids)
