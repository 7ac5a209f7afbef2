"""DP attention's request side: rank 0 hands each request to one rank, every rank steps its own
engine, all in lockstep.

With `enable_dp_attention` every rank runs a whole `EngineCore` (scheduler, radix cache, KV
pool, sampler, detokenizer) over the requests it was given; the worker still talks to rank 0's
engine process only, so the router sees one worker. One tick, driven by rank 0:

    rank 0 (engine process)                            ranks 1..N-1 (followers)
    drain the client's messages into a Tick:
      adds (each to one rank), aborts (to the owner) ──broadcast──▶ Tick
    every rank: its adds and aborts, then one step of its core: the forward (its count exchange
      and MLP collectives with the others, shared/distributed/dp_attention.py), or, without
      one, the idle forward on the others' tokens
    gather ◀────────────────────────────────────────────────────── Report: answers to its adds,
                                                                    outputs, busy, stats
    to the client, unchanged: every answer, then every output

Dispatch (`dp_dispatch`) is cache-aware by default: a prefix is cached only on the rank that ran
it, so rank 0 keeps the router's approximate radix tree over the prompts it placed, one tenant
per rank, and applies the router's rule (shared/routing/cache_aware.py): the rank that probably
holds most of the prompt when it holds at least half, else the rank holding least, unless the
ranks' open requests are lopsided, then the least loaded. Each rank's tree is bounded by its KV
pool's size. `round_robin` is the plain alternative. All `n` samples of a prompt go to one rank,
sharing its KV; rank 0 remembers the rank of each open request to route its abort, and refuses
an id already open on any rank. `GetStats` answers the ranks' stats summed.

Ticks run back to back while any rank has work, every few milliseconds while one only waits in
the background (a grammar compiling), and otherwise only when a message arrives; idle followers
wait in the broadcast. Control messages are msgpack (msgspec, never pickle) in uint8 tensors on
a gloo group: the default group on CPU, a gloo group of their own beside NCCL on CUDA.

Failure: a step that raises on any rank leaves the group unusable. A follower exits; rank 0 (its
own step failing, or a collective with a dead rank) fails every open request of every rank
(`StepFailed`) and the engine process exits, as with tensor parallelism.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import msgspec
import torch
import torch.distributed as dist
import zmq

from shared.config import DpDispatch, EngineConfig
from shared.distributed import parallel_state
from shared.distributed.dp_attention import all_gather_flat
from shared.engine_process import (
    IDLE_POLL_MS,
    POLL_BACKGROUND_MS,
    AbortRequest,
    Accepted,
    AddPeer,
    AddRequest,
    ExpectKv,
    FromEngine,
    GetStats,
    Rejected,
    Reply,
    ReserveKv,
    Shutdown,
    StepFailed,
    ToEngine,
    handle_message,
    parent_alive,
    recv_frames,
    reservation_key,
    send_outputs,
)
from shared.errors import InvalidRequest
from shared.outputs import RequestOutput
from shared.routing.cache_aware import CacheAwareChooser, CacheAwareConfig

if TYPE_CHECKING:
    from shared.distributed.launch import Followers
    from shared.engine_core import EngineCore

logger = logging.getLogger(__name__)


class Tick(msgspec.Struct):
    """Rank 0 to every rank: what to do this tick."""

    adds: list[tuple[int, AddRequest]] = []  # (rank, request)
    aborts: list[tuple[int, str]] = []  # (rank, request id)
    stats: bool = False  # every rank reports its stats
    stop: bool = False


class Report(msgspec.Struct):
    """A rank to rank 0, after its step."""

    answers: list[Accepted | Rejected] = []  # to its adds: at once, or late (a grammar compiled)
    outputs: list[RequestOutput] = []
    has_work: bool = False
    background: bool = False  # waiting on something that needs polling (a grammar compiling)
    stats: dict[str, int] | None = None


class Control:
    """The ticks and reports between the ranks (collectives: every rank calls each in turn)."""

    def __init__(self, device: torch.device) -> None:
        self.rank, self.size = parallel_state.tp_rank(), parallel_state.tp_size()
        # Host bytes: gloo. On CPU the default group is gloo already.
        self.group = (
            None
            if device.type == "cpu"
            else dist.new_group(backend="gloo", timeout=parallel_state.SERVING_TIMEOUT)
        )
        self._encode = msgspec.msgpack.Encoder().encode
        self._ticks = msgspec.msgpack.Decoder(Tick)
        self._reports = msgspec.msgpack.Decoder(Report)

    def send_tick(self, tick: Tick) -> None:
        """Rank 0."""
        self._broadcast(self._encode(tick))

    def recv_tick(self) -> Tick:
        """A follower: the next tick (waits as long as rank 0 idles)."""
        return self._ticks.decode(self._broadcast(None))

    def gather_reports(self, own: Report) -> list[Report]:
        """Rank 0: every rank's report, in rank order (`own` is rank 0's)."""
        blobs = self._gather(b"")
        return [own, *(self._reports.decode(b) for b in blobs[1:])]

    def send_report(self, report: Report) -> None:
        """A follower."""
        self._gather(self._encode(report))

    def _broadcast(self, data: bytes | None) -> bytes:
        n = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        dist.broadcast(n, src=0, group=self.group)
        if data is not None:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            buf = torch.empty(int(n.item()), dtype=torch.uint8)
        dist.broadcast(buf, src=0, group=self.group)
        return buf.numpy().tobytes()

    def _gather(self, data: bytes) -> list[bytes]:
        lens = torch.empty(self.size, dtype=torch.int64)
        all_gather_flat(lens, torch.tensor([len(data)], dtype=torch.int64), group=self.group)
        pad = int(lens.max().item())
        buf = torch.zeros(pad, dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        parts = [torch.empty(pad, dtype=torch.uint8) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(buf, parts, dst=0, group=self.group)
        if parts is None:
            return []
        return [p[:n].numpy().tobytes() for p, n in zip(parts, lens.tolist(), strict=True)]


class DpRank:
    """One rank's engine, stepped once per tick."""

    def __init__(self, core: EngineCore, rank: int) -> None:
        self.core, self.rank = core, rank

    def run(self, tick: Tick) -> Report:
        core = self.core
        answers: list[Accepted | Rejected] = []
        for rank, add in tick.adds:
            if rank == self.rank:
                reply = handle_message(core, add)  # Accepted, Rejected, or None (a grammar compiling)
                if reply is not None:
                    assert isinstance(reply, Accepted | Rejected)
                    answers.append(reply)
        for rank, rid in tick.aborts:
            if rank == self.rank:
                core.abort(rid)
        outputs = core.step() if core.has_work or core.waiting_in_background else []
        if core.runner.dp_step_end():  # no forward this step: the others' MLP collectives
            core.counters["dp_idle_forwards"] += 1
        answers += [
            Rejected.of(rids, error) if error is not None else Accepted(rids)
            for rids, _pages, error, _reservation in core.take_admissions()  # no reservations here
        ]
        return Report(
            answers,
            outputs,
            core.has_work,
            core.waiting_in_background,
            core.stats() if tick.stats else None,
        )


class Dispatcher:
    """Rank 0's routing: a rank for each new request (cache-aware or round robin), the rank of
    each open one."""

    def __init__(self, size: int, policy: DpDispatch = "cache_aware", kv_tokens: int = 2**24) -> None:
        self.size = size
        self.owner: dict[str, int] = {}  # open request id -> its rank
        self.open = [0] * size  # open requests per rank
        self._names = [str(r) for r in range(size)]  # the ranks as the chooser's tenants
        self._chooser = (
            CacheAwareChooser(CacheAwareConfig(max_tree_size=max(kv_tokens, 1)))
            if policy == "cache_aware"
            else None
        )
        self._next = 0

    def take(self, msg: ToEngine, tick: Tick) -> FromEngine | None:
        """Put a client message into `tick`, or answer it at once."""
        if isinstance(msg, AddRequest):
            if len(set(msg.rids)) != len(msg.rids) or any(rid in self.owner for rid in msg.rids):
                taken = next(rid for rid in msg.rids if rid in self.owner or msg.rids.count(rid) > 1)
                return Rejected.of(
                    msg.rids, InvalidRequest(f"request id {taken!r} is already in use", param="request_id")
                )
            rank = self._place(msg.prompt.input_ids)
            self.owner.update(dict.fromkeys(msg.rids, rank))
            self.open[rank] += len(msg.rids)
            tick.adds.append((rank, msg))
            return None
        if isinstance(msg, AbortRequest):
            owner = self.owner.get(msg.rid)
            if owner is not None:
                tick.aborts.append((owner, msg.rid))
            return None
        error = InvalidRequest("prefill/decode disaggregation is not supported with DP attention")
        if isinstance(msg, ExpectKv):
            return Rejected.of([msg.rid], error)
        if isinstance(msg, ReserveKv):
            return Rejected.of([reservation_key(msg.rid)], error)
        if isinstance(msg, AddPeer):
            return Rejected.of([msg.key], error)
        logger.warning("dropping %s: not supported with DP attention", type(msg).__name__)
        return None

    def _place(self, input_ids: list[int]) -> int:
        if self._chooser is None:
            rank, self._next = self._next, (self._next + 1) % self.size
            return rank
        return int(self._chooser.place(self._names, tuple(input_ids), lambda r: (self.open[int(r)],)).name)

    def closed(self, answers: list[Accepted | Rejected], outputs: list[RequestOutput]) -> None:
        """Forget refused and finished requests."""
        for answer in answers:
            if isinstance(answer, Rejected):
                for rid in answer.rids:
                    self._forget(rid)
        for out in outputs:
            if out.finished:
                self._forget(out.rid)

    def _forget(self, rid: str) -> None:
        rank = self.owner.pop(rid, None)
        if rank is not None:
            self.open[rank] -= 1

    def fail_all(self) -> list[str]:
        rids, self.owner, self.open = list(self.owner), {}, [0] * self.size
        return rids


def serve_rank0(
    core: EngineCore,
    pull: zmq.Socket[bytes],
    push: zmq.Socket[bytes],
    decoder: msgspec.msgpack.Decoder[ToEngine],
    encode: Any,
    followers: Followers | None,
) -> bool:
    """The engine process's loop with DP attention (in place of `engine_process._serve`): serve
    until told to stop (True, the followers released) or the group broke (False)."""
    assert followers is not None
    control = Control(core.runner.device)
    me = DpRank(core, 0)
    # Without a radix cache there is nothing to aim at: spread the requests.
    policy = "round_robin" if core.config.disable_radix_cache else core.config.dp_dispatch
    dispatcher = Dispatcher(control.size, policy, core.kv.usage()[3])
    has_work = background = False
    while True:
        timeout = 0 if has_work else POLL_BACKGROUND_MS if background else IDLE_POLL_MS
        if timeout == IDLE_POLL_MS and not parent_alive():
            logger.warning("the engine's parent process is gone; exiting")
            return _stop(control)
        if timeout == IDLE_POLL_MS and followers.dead():
            logger.error("DP attention rank(s) %s died; the engine exits", followers.dead())
            return False
        tick, stats_keys = Tick(), []
        while pull.poll(timeout):
            header, _payloads = recv_frames(pull)
            msg = decoder.decode(header)
            if isinstance(msg, Shutdown):
                return _stop(control)
            if isinstance(msg, GetStats):
                tick.stats = True
                stats_keys.append(msg.key)
            elif (reply := dispatcher.take(msg, tick)) is not None:
                push.send(encode(reply))
            timeout = 0
        if not (has_work or background or tick.adds or tick.aborts or tick.stats):
            continue
        try:
            control.send_tick(tick)
            reports = control.gather_reports(me.run(tick))
        except Exception as e:
            logger.exception("a DP attention step failed; the engine exits")
            message = f"engine step failed: {e} (a tensor-parallel rank failed; the engine exits)"
            push.send(encode(StepFailed(dispatcher.fail_all(), message, fatal=True)))
            return False
        answers = [a for r in reports for a in r.answers]
        outputs = [o for r in reports for o in r.outputs]
        dispatcher.closed(answers, outputs)
        for answer in answers:  # before any output of theirs
            push.send(encode(answer))
        if outputs:
            send_outputs(push, encode, outputs)
        if stats_keys:
            total = _sum_stats([r.stats or {} for r in reports])
            for key in stats_keys:
                push.send(encode(Reply(key, total)))
        has_work = any(r.has_work for r in reports)
        background = any(r.background for r in reports)


def _stop(control: Control) -> bool:
    """Release the followers from their loop; False when the group is already broken."""
    try:
        control.send_tick(Tick(stop=True))
    except Exception as e:  # a rank died meanwhile
        logger.warning("could not stop the DP attention ranks: %s", e)
        return False
    return True


def _sum_stats(stats: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for s in stats:
        for key, value in s.items():
            total[key] = total.get(key, 0) + value
    return total


def serve_follower(config: EngineConfig, rank: int) -> None:
    """A follower rank's engine with DP attention: build its own core, run rank 0's ticks until
    the stop. A failed step or collective raises (the caller exits)."""
    from shared.engine_core import EngineCore

    # Each rank samples its own requests: a seed of its own.
    core = EngineCore(dataclasses.replace(config, random_seed=config.random_seed + rank))
    control = Control(core.runner.device)
    me = DpRank(core, rank)
    while not (tick := control.recv_tick()).stop:
        control.send_report(me.run(tick))
