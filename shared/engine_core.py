"""One engine: scheduler + model runner + sampler, driven by `step()`.

Single-threaded by design: whoever owns an `EngineCore` calls `add_request`, `abort` and `step`
from one thread (the offline `Engine`'s loop thread, or a worker's engine process). Each step is
`schedule() -> run() -> process()`:

    schedule  pick this step's requests and token counts, allocating KV (may retract)
    run       one model forward over the ragged batch, logits for the requests that sample
    process   sample, append, detokenize, check stop conditions, free finished requests

and returns the increments (`RequestOutput`) produced by that step.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from shared.config import EngineConfig
from shared.constrained import GrammarCompiler, TokenMasks
from shared.constrained.gate import GrammarGate
from shared.disagg import KvReceiver, KvSender
from shared.disagg.events import Arrived, Expired, Granted, Released, SendFailed
from shared.disagg.pacing import DecodePacer
from shared.disagg.receiver import Held
from shared.errors import CapacityError, InternalError, InvalidRequest, RequestError
from shared.inflight import InflightStep
from shared.mem import RadixCache
from shared.model_runner import ModelRunner, PrevTokens
from shared.outputs import RequestOutput
from shared.pooling import PoolingParams
from shared.request_builder import RequestBuilder
from shared.sampling import SampleOutput, Sampler, SamplingBatch, SamplingParams
from shared.scheduler.kv_manager import KVCacheManager
from shared.scheduler.request import PENDING, FinishKind, FinishReason, Req
from shared.scheduler.scheduler import ScheduleBatch, ScheduledReq, Scheduler
from shared.scheduler.stopping import final_reason, stop_after
from shared.step_stats import StepStats
from shared.transfer import KvCommit, KvTarget, PageLayout, nixl_available
from shared.transfer.nixl import KvAgent, NixlAgent
from shared.transfer.pages import KvPages
from shared.transfer.shards import shard_transfer

logger = logging.getLogger(__name__)


def resolve_transport(config: EngineConfig) -> str:
    if config.kv_transport == "auto":
        if nixl_available():
            return "nixl"
        if config.disaggregation_mode != "null":
            logger.warning(
                "NIXL is not installed: this %s engine moves KV as bytes over the gRPC transport"
                " (0.5-1.5 GB/s on a CPU host, docs/kv_transfer.md); pip install nixl (or nixl-cu12 /"
                " nixl-cu13) for the fast path",
                config.disaggregation_mode,
            )
        return "grpc"
    if config.kv_transport == "nixl" and config.disaggregation_mode != "null" and not nixl_available():
        raise ValueError("kv_transport='nixl' but NIXL is not installed (pip install nixl)")
    return config.kv_transport


class Admission(NamedTuple):
    """The late answer to an add or a reservation that could not be answered at once."""

    rids: list[str]
    pages: list[int] | None  # a granted reservation's pages
    error: RequestError | None  # None when accepted
    reservation: bool = False  # the answer to `reserve_kv` (else to `add_request`)


class EngineCore:
    def __init__(self, config: EngineConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        self.config = config
        self.runner = ModelRunner(config)  # first: a bad model path fails here, clearly
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(
            config.tokenizer_path or config.model_path
        )
        cache = None if config.disable_radix_cache else RadixCache(self.runner.allocator)
        self.kv = KVCacheManager(self.runner.allocator, self.runner.req_pool, cache)
        self.scheduler = Scheduler(config, self.kv)
        self.sampler = Sampler(torch.Generator(self.runner.device).manual_seed(config.random_seed))
        self.eos_ids = frozenset(self.runner.model_config.eos_token_ids)
        self.max_context_len = self.runner.max_context_len
        self._requests: dict[str, Req] = {}
        self._pending_outputs: list[RequestOutput] = []
        self.counters: Counter[str] = Counter()
        self.step_stats = StepStats(self.runner.device, config.step_gpu_timing)
        self._admissions: list[Admission] = []
        # Constrained decoding: grammars compile on a pool; requests wait for theirs here.
        self.grammars = GrammarCompiler(
            self.tokenizer,
            self.runner.vocab_size,
            self.eos_ids,
            threads=config.grammar_compile_threads,
            cache_size=config.grammar_cache_size,
            json_any_whitespace=config.json_any_whitespace,
        )
        self.masks = TokenMasks(self.runner.vocab_size, self.runner.device)
        self.builder = RequestBuilder(
            self.tokenizer,
            self.runner.vocab_size,
            self.max_context_len,
            self.eos_ids,
            self.grammars,
            config.grammar_compile_timeout_s,
        )
        # Overlap scheduling (see `step`): on by default on CUDA, where the forward runs
        # asynchronously; prefill engines gain little and stream KV pages between steps.
        overlap = config.enable_overlap_schedule
        if overlap is None:
            overlap = self.runner.device.type == "cuda"
        self.overlap = overlap
        self._inflight: InflightStep | None = None
        self.grammar_gate = GrammarGate()

        # Disaggregation: the NIXL agent over our pool, and the side of the hand-off we play.
        self.mode = config.disaggregation_mode
        layout = PageLayout(self.runner.kv_pool.buffers(), config.page_size)
        self.transport = resolve_transport(config)
        agent = (
            NixlAgent(layout, self.mode, tp_size=config.tp_size)
            if self.mode != "null" and self.transport == "nixl"
            else None
        )
        self.layout: KvPages = layout
        self.agent: KvAgent | None = agent
        if self.mode != "null" and self.runner.step_sync is not None:
            # Tensor parallelism: every rank moves its own shard, as this rank 0 instructs.
            self.layout, self.agent = shard_transfer(layout, agent, self.runner.step_sync, config.tp_size)
        timeout = config.kv_transfer_timeout_s
        self.sender = (
            KvSender(self.layout, self._own_pages, self.agent, timeout, self._want_target)
            if self.mode == "prefill"
            else None
        )
        self.receiver = (
            KvReceiver(self.layout, self._reserve_pages, self.agent, timeout)
            if self.mode == "decode"
            else None
        )
        self.pacer = (
            DecodePacer(config.decode_step_interval_ms / 1000, config.decode_pacing_backlog)
            if self.receiver
            else None
        )
        # Outputs that must not wait for the end of the step (a prefill engine asking for its
        # reservation while the forward runs, a decode engine's first tokens of arrived KV); the
        # engine process sends them at once.
        self.early_outputs: Callable[[list[RequestOutput]], None] | None = None

    # ---- requests in ---------------------------------------------------------------------------

    def add_request(
        self,
        rids: list[str],
        input_ids: list[int],
        params: SamplingParams,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        kv_target: KvTarget | None = None,
        pooling: PoolingParams | None = None,
    ) -> bool:
        """Queue one prompt; `rids` names its `params.n` samples. Bad input is a `ValueError`.

        Returns True when admitted, False when the request waits for its grammar to compile: the
        outcome (accepted, or refused with the reason) then arrives through `take_admissions`.
        A prefill engine needs `kv_target` (where the prompt's KV goes) and `n == 1`.
        With `pooling` it is an embedding request (one rid; `params` unused): it runs its prompt
        and finishes with `RequestOutput.embedding` (shared/pooling.py), unified engines only.
        """
        if self.mode == "decode":
            raise ValueError("a decode engine takes reservations (reserve), not prompts")
        if (kv_target is not None) != (self.mode == "prefill"):
            raise ValueError("a KV target is required by a prefill engine and refused by others")
        self._check_free(rids)
        if pooling is not None:
            self._admit(self._build_embed(rids, input_ids, pooling), None)
            return True
        if self.runner.is_embedding:
            raise InvalidRequest(
                "this model is an embedding model (no lm head): it serves embeddings"
                " (/v1/embeddings), not text generation",
                param="model",
            )
        reqs = self.builder.build(rids, input_ids, params, return_logprob, top_logprobs_num)
        if kv_target is not None:
            assert self.sender is not None
            if len(reqs) != 1:
                raise ValueError("a prefill request has n == 1")
            self.sender.check_target(kv_target, len(input_ids))
        for req in reqs:
            self._requests[req.rid] = req
        if self.grammar_gate.hold(
            reqs,
            on_ready=lambda: self._admit(reqs, kv_target, notify=True),
            on_fail=lambda error: self._refuse(reqs, error),
        ):
            return False
        self._admit(reqs, kv_target)
        return True

    def _build_embed(self, rids: list[str], input_ids: list[int], pooling: PoolingParams) -> list[Req]:
        if self.mode != "null":
            raise InvalidRequest(
                "embeddings run on unified workers, not on a prefill/decode pair", param="model"
            )
        if len(rids) != 1:
            raise InvalidRequest("an embedding request has one input per request id", param="n")
        pooling.verify(self.runner.model_config.hidden_size)
        (req,) = self.builder.build(rids, input_ids, SamplingParams(), False, 0)
        req.pooling = pooling
        self._requests[req.rid] = req
        return [req]

    def _admit(self, reqs: list[Req], kv_target: KvTarget | None, notify: bool = False) -> None:
        if kv_target is not None:
            assert self.sender is not None
            req = reqs[0]
            # Here only the prompt runs and one token is sampled; stops are the decode side's.
            req.params = replace(req.params, max_new_tokens=1, stop=[])
            req.stop_matcher = None
            req.kv_target = kv_target
            self.sender.track(req)
        if notify:
            self._admissions.append(Admission([r.rid for r in reqs], None, None))
        for req in reqs:
            if req.params.max_new_tokens == 0 and req.pooling is None:
                self._finish(req, FinishReason(FinishKind.LENGTH))
            else:
                self.scheduler.add(req)

    def _refuse(self, reqs: list[Req], error: RequestError) -> None:
        """A waiting add ends without ever running (no output is reported)."""
        for req in reqs:
            self._requests.pop(req.rid, None)
        self._admissions.append(Admission([r.rid for r in reqs], None, error))

    def expect_kv(
        self,
        rid: str,
        input_ids: list[int],
        params: SamplingParams,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        lease_s: float | None = None,
    ) -> None:
        """Decode engine: a prompt whose KV a prefill engine will write. It holds nothing until
        `reserve_kv` (asked by the prefill side when it starts computing the prompt); then it
        continues when its commit record arrives (`commit_kv`, or a NIXL notification), and is
        aborted if none arrives within the lease after the pages were granted. A prompt with
        `max_new_tokens` 0 needs no KV: it finishes at once (`length`, no tokens). `ValueError`
        for bad input."""
        if self.receiver is None:
            raise ValueError("only a decode engine takes reservations")
        self._check_free([rid])
        (req,) = self.builder.build([rid], input_ids, params, return_logprob, top_logprobs_num)
        if req.params.max_new_tokens == 0:
            # Nothing to generate, so no KV to wait for: finished here as a unified engine
            # finishes it (the decode worker sends no reservation for it, the router no prefill).
            self._requests[rid] = req
            self._finish(req, FinishReason(FinishKind.LENGTH))
            return
        allocator = self.kv.allocator
        if allocator.pages_needed(0, len(input_ids) + 1) >= allocator.num_pages:
            raise InvalidRequest(
                f"the prompt has {len(input_ids)} tokens; this decode engine holds at most"
                f" {(allocator.num_pages - 1) * allocator.page_size} KV tokens",
                param="prompt",
            )
        self.receiver.expect(req, lease_s)
        self._requests[rid] = req

    def reserve_kv(self, rid: str) -> list[int] | None:
        """Decode engine: pages for an expected prompt (page i of the prompt goes to pages[i]),
        or None when the engine is full: the reservation then waits, first come first served,
        until room frees up or the request is aborted, and its outcome arrives through
        `take_admissions`."""
        if self.receiver is None:
            raise ValueError("only a decode engine takes reservations")
        return self.receiver.reserve(rid)

    def set_kv_target(self, rid: str, pages: list[int]) -> None:
        """Prefill engine: the decode engine reserved `pages` for request `rid`; a bad page
        list aborts the request."""
        if self.sender is None:
            raise ValueError("only a prefill engine sends KV")
        try:
            self.sender.set_target(rid, pages)
        except ValueError as e:
            self.abort(rid, f"bad KV target: {e}")
        if not self.scheduler.has_work:  # no step's forward to post the last write behind
            self.sender.post_ready()
        self._kv_events()

    def take_admissions(self) -> list[Admission]:
        """Late answers since the last call: adds whose grammar compiled (accepted) or failed to
        (refused), and queued reservations granted or refused (no room within the lease, or
        aborted while queued)."""
        events, self._admissions = self._admissions, []
        return events

    def add_peer(self, metadata: bytes) -> str:
        """Learn a decode engine's NIXL metadata (prefill side); returns its agent name."""
        if self.sender is None:
            raise ValueError("only a prefill engine sends KV to peers")
        return self.sender.add_peer(metadata)

    def remove_peer(self, name: str) -> None:
        """Forget a decode engine's NIXL agent (prefill side) once no write goes there."""
        if self.sender is None:
            raise ValueError("only a prefill engine sends KV to peers")
        self.sender.remove_peer(name)

    def commit_kv(self, commit: KvCommit, payload: bytes | memoryview | None = None) -> None:
        """Decode side of the gRPC transport: the prompt's pages as bytes, then the commit record."""
        if self.receiver is None:
            raise ValueError("only a decode engine receives KV")
        try:
            self.receiver.commit(commit, payload)
        except ValueError as e:  # a malformed payload: fail that request, keep serving
            logger.warning("dropping the KV of %s: %s", commit.rid, e)
            self.abort(commit.rid, f"bad KV payload: {e}")
        self._kv_events()

    def _check_free(self, rids: list[str]) -> None:
        for rid in rids:
            if rid in self._requests:
                raise InvalidRequest(f"request id {rid!r} is already in use", param="request_id")

    def abort(self, rid: str, message: str = "aborted") -> None:
        """Stop a request wherever it is; it reports `finish_reason` abort and frees what it held
        (pages a KV write may still reach are freed once it cannot: see shared/disagg)."""
        req = self._requests.get(rid)
        if req is None or req.finished:
            return
        if self.grammar_gate.cancel(req, message):  # still waiting for its grammar: the add ends
            return
        if self.sender is not None and self.sender.abort(req):
            if req in self.scheduler.running:
                self.scheduler.park(req)
            return  # reported once its writes are over
        held = self.receiver.abort(req) if self.receiver is not None else Held.NOTHING
        if held == Held.NO_PAGES:
            self._admissions.append(Admission([rid], None, CapacityError(message), reservation=True))
        if held == Held.NOTHING:
            # A token still on the device: its K/V may be unwritten, so cache only what is;
            # a reservation whose KV never arrived has nothing to cache.
            cache_kv = not req.pending and not req.awaiting_kv
            self._drop_pending(req)
            self.scheduler.remove(req, cache_kv=cache_kv)
        self._finish(req, FinishReason(FinishKind.ABORT, message=message))

    # ---- disaggregation callbacks (shared/disagg) ----------------------------------------------

    def continue_decode(self, req: Req, commit: KvCommit) -> None:
        """A reservation's KV arrived (the request is parked): take the prefill side's first
        token and run on, once the request's grammar (if any) compiled."""
        if self.grammar_gate.hold(
            [req],
            on_ready=lambda: self.continue_decode(req, commit),
            on_fail=lambda error: self._abort_parked(req, error.message),
        ):
            return
        self.scheduler.unpark(req)
        req.cached_tokens = commit.cached_tokens
        if req.return_logprob and commit.logprob is not None:
            req.output_logprobs.append(commit.logprob)
        if req.top_logprobs_num and commit.top_logprobs is not None:
            req.output_top_logprobs.append(
                [(float(v), int(t)) for v, t in commit.top_logprobs][: req.top_logprobs_num]
            )
        self._append_token(req, commit.first_token, first=True)

    def _abort_parked(self, req: Req, message: str) -> None:
        self.scheduler.remove(req)
        self._finish(req, FinishReason(FinishKind.ABORT, message=message))

    # ---- the KV hand-off's collaborators (shared/disagg) -----------------------------------------

    def _own_pages(self, req: Req, n: int) -> list[int]:
        """Page ids of the first `n` pages of a running request's prompt."""
        page_size = self.layout.page_size
        assert req.row is not None
        slots = self.kv.req_pool.read(req.row, 0, n * page_size)[::page_size]
        return (slots // page_size).tolist()

    def _want_target(self, req: Req, num_pages: int) -> None:
        """Ask the caller for the decode engine's pages (a `kv_pages_wanted` output), at once."""
        out = RequestOutput(
            rid=req.rid,
            new_ids=[],
            new_text="",
            finished=False,
            finish_reason=None,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=0,
            cached_tokens=0,
            kv_pages_wanted=num_pages,
        )
        if self.early_outputs is not None:
            self.early_outputs([out])
        else:
            self._pending_outputs.append(out)

    def _reserve_pages(self, req: Req) -> list[int] | None:
        """Pages for a reservation's prompt (the request parks holding them), or None. The
        prompt's prefix that this engine's cache already holds (whole pages, short of the last
        token) is locked and shared instead: the pages returned are those of the rest, which is
        all the prefill engine sends."""
        if self.scheduler.num_active >= self.config.max_running_requests:
            return None
        match = self.kv.match(req)
        cached = len(match.slots) if match is not None else 0
        # Room for the running requests' next tokens stays free, as admission does.
        reserve = len(self.scheduler.running)
        slots = self.kv.admit(req, match, len(req.prompt_ids) - cached, reserve_pages=reserve)
        if slots is None:
            return None
        self.scheduler.parked.append(req)
        page_size = self.layout.page_size
        pages: list[int] = (slots[::page_size] // page_size).tolist()
        return pages

    def _kv_events(self) -> None:
        """Act on what the KV hand-off decided since the last call."""
        if self.sender is not None:
            for ev in self.sender.take_events():
                self.scheduler.remove(ev.req)
                if isinstance(ev, SendFailed):
                    if not ev.req.finished:
                        self._finish(ev.req, FinishReason(FinishKind.ABORT, message=ev.message))
                    continue
                self._finish(ev.req, FinishReason(FinishKind.TRANSFERRED))
                out = self._pending_outputs[-1]
                assert out.rid == ev.req.rid
                out.kv_bytes, out.kv_payload, out.kv_commit = ev.kv_bytes, ev.payload, ev.commit
                out.kv_transfer_start, out.kv_transfer_end = ev.span
        if self.receiver is not None:
            for rev in self.receiver.take_events():
                if isinstance(rev, Granted):
                    self._admissions.append(Admission([rev.req.rid], rev.pages, None, reservation=True))
                elif isinstance(rev, Arrived):
                    self.continue_decode(rev.req, rev.commit)
                elif isinstance(rev, Expired):
                    self.abort(rev.req.rid, rev.message)
                else:
                    assert isinstance(rev, Released)
                    self.scheduler.remove(rev.req, cache_kv=False)

    def fail_all(self, message: str) -> list[str]:
        """After a step failed half-way: drop every request without caching its (untrusted) KV.
        Returns their ids; the caller tells their owners."""
        self._inflight = None
        rids = [req.rid for req in self.scheduler.abort_all(message)]
        for rid in rids:
            self._requests.pop(rid, None)
        for reqs in self.grammar_gate.groups:  # adds not yet accepted are refused; parked ones are gone
            if any(req.rid in self._requests for req in reqs):
                self._refuse(reqs, InternalError(message))
        self.grammar_gate.clear()
        if self.sender is not None:
            self.sender.reset()
        if self.receiver is not None:
            for req in self.receiver.reset():  # expected or queued: held nothing, but were open
                self._requests.pop(req.rid, None)
                rids.append(req.rid)
        return rids

    @property
    def has_work(self) -> bool:
        """Something to compute or report now."""
        return self.scheduler.has_work or bool(self._pending_outputs) or self.step_in_flight

    @property
    def step_in_flight(self) -> bool:
        """A step launched and not yet read: the next `step` returns its tokens (overlap)."""
        return self._inflight is not None

    def step_delay(self) -> float:
        """Seconds the caller should wait before the next `step` (0 but for a paced decode engine
        sharing its GPU with a backlogged prefill engine: shared/disagg/pacing.py)."""
        if self.pacer is None or self.receiver is None or not self.scheduler.running:
            return 0.0  # nothing to decode: poll for arriving KV at once
        # Outputs ready meanwhile (a first token that came with its KV) need no step: poll_paced.
        return self.pacer.delay(self.receiver.pending, len(self.scheduler.running), time.monotonic())

    def poll_paced(self) -> list[RequestOutput]:
        """While a paced decode engine waits for its next step: take the KV that arrived. A
        request's first token was sampled by the prefill engine, so it goes out now rather than
        after the pause; the request decodes from the next step. Returns the outputs to send."""
        self._poll_kv()
        outputs, self._pending_outputs = self._pending_outputs, []
        return outputs

    @property
    def waiting_in_background(self) -> bool:
        """KV writes, reservations or grammar compiles in flight: the loop must keep polling
        (`step`) for them."""
        return (
            bool(self.grammar_gate)
            or (self.sender is not None and self.sender.busy)
            or (self.receiver is not None and self.receiver.busy)
        )

    # ---- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One step. With overlap scheduling, a decode step's sampled tokens stay on the device
        while the next step is scheduled and launched (their inputs are patched from the device),
        and are read and processed while that next forward runs:

            step k:   schedule N+1 ─ launch N+1 (inputs of N's requests from N's tokens) ─ read
                      and process N's tokens (append, detokenize, stop) ─ return N's outputs

        A request whose next sampling needs its history on the host (penalties, a grammar) makes
        the engine read the previous step first (no overlap for that step). A prefill engine
        overlaps the same way: its prompts sample one token, so a prompt done in N is parked
        before N+1 is scheduled, and reading N streams the pages N's chunks computed.
        """
        self.step_stats.began()
        if self.grammar_gate:
            self.grammar_gate.poll()
        self._poll_kv()  # committed reservations join this step
        self._send_early()  # their first tokens, sampled on the prefill side, need no forward
        inflight, self._inflight = self._inflight, None
        if inflight is not None and not self._can_overlap(inflight):
            self._resolve(inflight)
            inflight = None
        if inflight is not None:
            # Will finish by length whatever their token (a prefill engine's prompts too: they
            # sample one token): no next step.
            for it in inflight.items:
                if not it.req.finished and self._reaches_length(it.req):
                    self.scheduler.park(it.req)
        batch = self.scheduler.schedule()
        launched = None
        if batch is not None:
            if self.pacer is not None:
                self.pacer.stepped(time.monotonic())
            if self.sender is not None:
                self.sender.on_scheduled([it.req for it in batch.items])  # reservations, just in time
            prev = None
            if inflight is not None and inflight.next_ids is not None:
                prev = PrevTokens(inflight.next_ids, inflight.rows)
            with self.step_stats.forward(batch):
                if batch.embeds:
                    logits, embeddings = self.runner.forward_embed(batch, prev)
                    launched = self._launch(batch, logits)
                    self._finish_embeddings(embeddings)
                else:
                    logits = self.runner.forward(batch, prev)
                    launched = self._launch(batch, logits)
            if self.sender is not None:
                self._post_kv()  # the host posts finished prompts' last writes while the GPU runs
        if inflight is not None:
            self._resolve(inflight)  # host work while the forward just launched runs
        if launched is not None:
            if self.overlap and self._can_overlap(launched):
                self._inflight = launched
            else:
                self._resolve(launched)
        self._poll_kv()  # writes that finished during the step free their pages now
        if self.sender is not None and (
            self._inflight is not None or batch is None or not self.scheduler.has_work
        ):
            self._post_kv()  # a forward runs behind the posts, or none follows to post them behind
        if self.config.debug_invariants:
            self.kv.check_invariant(self.scheduler.running + self.scheduler.parked)
        outputs, self._pending_outputs = self._pending_outputs, []
        self.step_stats.ended()
        return outputs

    def _send_early(self) -> None:
        """A prefill or decode engine: hand what is ready now to `early_outputs` (when the engine
        process set it) instead of holding it until the step's forward has been launched and its
        previous one read: a PD request's first token is out the moment its KV lands, and a
        prefill request that finished sending completes its call. (Not a unified engine: under
        DP attention its rank 0 must see every output of the step, to close its requests.)"""
        pd = self.receiver is not None or self.sender is not None
        if pd and self.early_outputs is not None and self._pending_outputs:
            outputs, self._pending_outputs = self._pending_outputs, []
            self.early_outputs(outputs)

    def _poll_kv(self) -> None:
        if self.receiver is not None:
            self.receiver.poll()
        if self.sender is not None:
            self.sender.poll()
        self._kv_events()

    def _post_kv(self) -> None:
        """Prefill engine: post the last writes that are due (a failed post fails its request)."""
        assert self.sender is not None
        self.sender.post_ready()
        self._kv_events()

    def _can_overlap(self, launched: InflightStep) -> bool:
        """Whether the next step may run before the host reads `launched`'s tokens: not when a
        request's next sampling needs them on the host (penalties over its history, a grammar)."""
        for it in launched.items:
            p = it.req.params
            if it.req.grammar is not None or p.repetition_penalty != 1.0:
                return False
            if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
                return False
        return True

    def _reaches_length(self, req: Req) -> bool:
        return len(req.output_ids) >= req.params.max_new_tokens or req.seq_len >= self.max_context_len

    def _launch(self, batch: ScheduleBatch, logits: torch.Tensor) -> InflightStep | None:
        """Queue the sampling of `batch` on the device; each sampling request gets a placeholder
        token (`Req.pending`) until `_resolve` reads the values."""
        for it in batch.items:
            prompt_len = len(it.req.prompt_ids)
            self.counters["prompt_tokens_computed"] += max(
                0, min(it.start + it.extend_len, prompt_len) - it.start
            )
            if it.extend_len > 1 and not it.sample:
                self.kv.cache_unfinished(it.req)  # a finished prefill chunk
        items = [it for it in batch.items if it.sample]
        if batch.embeds:  # an embedding request's prompt ends without sampling
            items = [it for it in items if it.req.pooling is None]
        cuda = logits.device.type == "cuda"
        # A prefill engine streams a prompt's pages as its chunks are computed: which, the step
        # says once it has run (every step of it is inflight, sampling or not).
        kv_computed = None
        if self.sender is not None:  # every request of a prefill engine has a KV target
            kv_computed = {it.req.rid: it.req.cached_len for it in batch.items}
        if not items:
            return None if kv_computed is None else InflightStep([], [], None, {}, cuda, kv_computed)
        reqs = [it.req for it in items]
        # Host work while the forward runs on the GPU: the grammar masks, then the batch tensors.
        vocab_mask = self.masks.build([r.grammar for r in reqs])
        sbatch = SamplingBatch.build(
            [r.params for r in reqs],
            [r.output_ids for r in reqs],
            [r.prompt_ids for r in reqs],
            # A grammar decides when its output may end: min_new_tokens must not ban its stop.
            [set(r.stop_ids) if r.grammar is None else set() for r in reqs],
            self.runner.vocab_size,
            logits.device,
            vocab_mask=vocab_mask,
        )
        top_k = max(r.top_logprobs_num for r in reqs)
        out = self.sampler.sample(logits, sbatch, top_k, any(r.return_logprob for r in reqs))
        slots = []
        for req in reqs:
            slots.append(len(req.output_ids))
            req.output_ids.append(PENDING)
            req.pending += 1
        return InflightStep(items, slots, out, {r: i for i, r in enumerate(reqs)}, cuda, kv_computed)

    def _finish_embeddings(self, embeddings: dict[Req, torch.Tensor]) -> None:
        """Embedding requests whose prompt ended this step: report the vector and finish (the
        prompt's K/V goes to the radix cache like a finished generation's). Reads the vectors
        from the device: a step with embeddings does not overlap."""
        for req, vec in embeddings.items():
            if req.finished:
                continue
            req.embedding = vec.tolist()
            self.counters["prompt_tokens"] += len(req.prompt_ids)
            self.counters["cached_tokens"] += req.cached_tokens or 0
            self.counters["embeddings"] += 1
            self.scheduler.remove(req)
            self._finish(req, FinishReason(FinishKind.STOP))

    def _resolve(self, launched: InflightStep) -> None:
        """Read a launched step's tokens (waiting only for them) and process them in order; a
        prefill engine then streams the pages of prompt chunks the step computed (a NIXL write
        reads them on a stream of its own, so only once the forward that wrote them is done)."""
        began = time.perf_counter()
        host = launched.to_host()
        self.step_stats.waited(time.perf_counter() - began)
        if host is not None:
            self._process_tokens(launched, host)
        if self.sender is not None:  # after the tokens: a prompt done sends the rest with its commit
            self.sender.stream_pages(launched.kv_computed)

    def _process_tokens(self, launched: InflightStep, host: SampleOutput) -> None:
        next_ids = host.next_token_ids.tolist()
        logprobs = host.logprobs.tolist() if host.logprobs is not None else None
        top_vals = host.top_logprob_vals.tolist() if host.top_logprob_vals is not None else None
        top_ids = host.top_logprob_ids.tolist() if host.top_logprob_ids is not None else None
        for i, (it, slot, token) in enumerate(zip(launched.items, launched.slots, next_ids)):
            req = it.req
            if req.finished:  # aborted, or it finished at the previous step: this token is extra
                continue
            assert req.output_ids[slot] == PENDING
            req.output_ids[slot] = token
            req.pending -= 1
            if req.return_logprob and logprobs is not None:
                req.output_logprobs.append(logprobs[i])
            if req.top_logprobs_num and top_vals is not None and top_ids is not None:
                k = req.top_logprobs_num
                req.output_top_logprobs.append(list(zip(top_vals[i][:k], top_ids[i][:k])))
            self._on_token(req, token, first=it.extend_len > 1 or it.start == 0)

    def _append_token(self, req: Req, token: int, first: bool) -> None:
        req.output_ids.append(token)
        self._on_token(req, token, first)

    def _on_token(self, req: Req, token: int, first: bool) -> None:
        """`token` is now in `req.output_ids` (maybe before a pending placeholder): count it,
        check the stops and report it."""
        self.counters["generated_tokens"] += 1
        if first:
            self.kv.cache_unfinished(req)  # the prompt's KV becomes shareable (n > 1, same prefix)
            self.counters["prompt_tokens"] += len(req.prompt_ids)
            self.counters["cached_tokens"] += req.cached_tokens or 0
        if req.kv_target is not None:
            assert self.sender is not None
            self.scheduler.park(req)  # holds its pages until they are written
            self.sender.on_first_token(req, token)
            self._kv_events()
            return
        reason = stop_after(req, token, self.max_context_len)
        if reason is not None:
            # A step launched after this token's (overlap) computed one more: drop it. This
            # token's K/V is being written by that step, so the cache may keep it.
            self._drop_pending(req)
            self.scheduler.remove(req)
            self._finish(req, reason)
        else:
            self._emit(req)

    @staticmethod
    def _drop_pending(req: Req) -> None:
        if req.pending:
            del req.output_ids[-req.pending :]
            req.pending = 0

    def _finish(self, req: Req, reason: FinishReason) -> None:
        req.finish_reason = final_reason(req, reason)
        self._emit(req)
        del self._requests[req.rid]

    def _emit(self, req: Req) -> None:
        out = RequestOutput.since_reported(req)
        if out is not None:
            self._pending_outputs.append(out)

    # ---- introspection -------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Load and counters since start (the workers' GetLoad)."""
        free, evictable, _locked, total = self.kv.usage()
        out = {
            "running_requests": len(self.scheduler.running),
            "waiting_requests": len(self.scheduler.waiting),
            "parked_requests": len(self.scheduler.parked),
            "kv_free_tokens": free,
            "kv_evictable_tokens": evictable,
            "kv_used_tokens": total - free - evictable,
            "kv_total_tokens": total,
            "num_retractions": self.scheduler.num_retractions,
        }
        out.update(self.counters)
        out.update(self.step_stats.counters)
        if self.sender is not None:
            out.update(
                kv_bytes_sent=self.sender.bytes_sent,
                kv_transfers=self.sender.transfers,
                kv_transfer_failures=self.sender.failures,
                kv_peers=len(self.sender.peers),  # a gauge: decode engines known (nixl)
            )
        if self.receiver is not None:
            out.update(
                kv_bytes_received=self.receiver.bytes_received,
                kv_reservations=self.receiver.reservations,
                kv_reservations_queued=self.receiver.queued,
                kv_reservations_expired=self.receiver.expired,
                kv_prompts_expected=self.receiver.pending,  # a gauge: KV not here yet
            )
        return out

    def check_idle(self) -> None:
        """At idle nothing is locked and nothing is private: everything is free or evictable."""
        assert not self.scheduler.has_work and not self.scheduler.parked, "not idle"
        self.kv.check_invariant([])
        free, evictable, locked, total = self.kv.usage()
        if locked != 0 or free + evictable != total:
            raise AssertionError(f"idle engine holds KV: free {free} evictable {evictable} locked {locked}")


__all__ = ["EngineCore", "RequestOutput", "ScheduledReq"]
