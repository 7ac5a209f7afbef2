"""CUDA graphs for decode steps: capture the forward once per batch size, replay it every step.

A decode step launches a few hundred small kernels; at batch 1 launching them costs more than
running them. The graph runner captures the whole forward (embedding to logits) at a set of batch
sizes when the engine starts, and a decode step of B requests replays the smallest captured size
>= B with the step's inputs copied into the graph's static input tensors:

    static inputs (device, int64)  [5, max_bs]  one H2D copy per step from a pinned twin
        row 0  input_ids        the request's last token
        row 1  positions        its position (seq_len - 1)
        row 2  out_cache_loc    the slot its K/V goes to
        row 3  req_pool_indices its req_to_token row
        row 4  seq_lens         keys after this step
    output                         [bs, vocab] float32 logits, one tensor per captured size

Rows past B pad the batch: token 0 at position 0, K/V written to slot 0 (page 0 is the pool's
padding page and may hold garbage), attending over row 0's first key (seq_len 1, always a valid
slot). Their logits are never read.

What makes replay correct is that nothing captured depends on host values of the capture batch:
the attention backend plans from the batch size and `max_seq_len` alone (see
`AttentionBackend.init_forward_metadata_graph`), and the model's ops read lengths and indices
from the static tensors. The sampler runs after the graph, on its output, eagerly.

`capture=False` runs the same static-buffer forward eagerly instead of replaying a graph: the
padding and buffer logic can then be tested on CPU.

Prompt chunks (`PromptGraphRunner`, `EngineConfig.cuda_graph_prompt_tokens`, off by default:
on an H100 they are level at 1-128 clients and worth at most ~6% of one client's TTFT,
docs/benchmarks.md r31) serve prompt-only steps; a split mixed step runs its prompts eagerly.
A lone prompt's eager forward is bound by the host's launches (a 1024-token Llama-3-8B
prompt: 22 ms of GPU work in 33 ms, docs/benchmarks.md r28). The same
scheme captures EXTEND forwards at a set of token counts for up to `PROMPT_GRAPH_MAX_REQS`
requests: static `[T]` token rows and `[R]` request rows, padding tokens written to slot 0 and
padding requests of no new tokens, whose attention programs return at once; the extend
kernel's grid comes from the token count T (no request has more new tokens), its start rows
from the static lengths on the device. Logits come for the sampling requests' last tokens, the
first rows of the graph's output (a view, as decode's).
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from shared.batch import ForwardBatch, ForwardMode, to_device

if TYPE_CHECKING:
    from shared.attention.base import AttentionBackend
    from shared.mem import KVPool, ReqToTokenPool
    from shared.models.base import CausalLM
    from shared.scheduler.request import Req
    from shared.scheduler.scheduler import ScheduleBatch

logger = logging.getLogger(__name__)

# Rows of the static input buffer.
_IDS, _POS, _LOC, _ROW, _LEN = range(5)
# What a padding row holds in each of them.
_PAD_COLUMN = (0, 0, 0, 0, 1)


def _token_at(req: Req, pos: int) -> int:
    # Req.all_ids builds a new list of the whole sequence; one token needs no copy.
    prompt_len = len(req.prompt_ids)
    return req.prompt_ids[pos] if pos < prompt_len else req.output_ids[pos - prompt_len]


def capture_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to `max_bs` (and `max_bs` itself)."""
    sizes = [bs for bs in (1, 2, 4) if bs < max_bs] + list(range(8, max_bs + 1, 8))
    if not sizes or sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


@contextmanager
def garbage_collected_first() -> Iterator[None]:
    """Collect the process's garbage, then keep the cyclic collector off until the block ends.

    A finalizer that frees or unregisters device memory (the pinned buffers, NIXL registrations
    and CUDA events of an engine this process dropped, still in a reference cycle) invalidates a
    stream capture if the collector happens to run it mid-capture: the capture fails with
    `cudaErrorStreamCaptureInvalidated`, or the process aborts inside the collector (both seen
    on the H200 with engines built one after another in one process). torch's own capture
    context no longer collects by default, so the runner does it before capturing.
    """
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@torch.inference_mode()
def capture_graphs(
    batches: dict[int, ForwardBatch], run: Callable[[ForwardBatch], torch.Tensor], stream: torch.cuda.Stream
) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, torch.Tensor]]:
    """One graph of `run(batch)` per key, in one memory pool, in the dict's order (largest first:
    smaller graphs then fit in the memory the largest one left in the pool); with their outputs.

    Warmed up and captured on `stream`, which must be this set of graphs' own. cuBLAS keeps one
    workspace per stream, and a captured GEMM keeps its address: graphs captured on one stream
    share it (torch's default capture stream is one for the whole process, pytorch#193402).
    Replayed at once on two streams, graphs sharing a workspace race on it: split mixed steps
    that replayed a prompt graph beside the decode graph hung on an H100 until each set had its
    own (docs/benchmarks.md r30, r31). Such steps now run their prompts eagerly (faster), but no
    two graph sets share a stream.
    """
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, torch.Tensor] = {}
    device = stream.device
    with garbage_collected_first():
        pool = torch.cuda.graph_pool_handle()
        for key, fb in batches.items():
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile Triton kernels and settle cuBLAS outside the capture
                    run(fb)
            torch.cuda.current_stream(device).wait_stream(stream)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                outputs[key] = run(fb)
            graphs[key] = graph
    torch.cuda.synchronize(device)
    return graphs, outputs


class _GraphRunner:
    """What the decode and prompt graph runners share: the model and pools a forward runs on, one
    host buffer (pinned on CUDA) uploaded whole each step into the graphs' static inputs, and per
    size its batch over those inputs and its captured graph (or, with `capture=False`, its
    forward rerun eagerly on the same buffers). A subclass builds `_forward_batch(size)` and
    `_run(batch)`, then calls `_prepare`.

    Owned by the model runner; single-threaded like it. The KV pool, request table and backend
    must outlive it (the graphs hold their addresses).
    """

    what = ""  # the log line's name for the sizes

    def __init__(
        self,
        model: CausalLM,
        kv_pool: KVPool,
        req_pool: ReqToTokenPool,
        backend: AttentionBackend,
        device: torch.device,
        sizes: list[int],
        max_seq_len: int,
        host: torch.Tensor,  # int64, the static inputs' initial values
        capture: bool,
    ) -> None:
        if not backend.supports_cuda_graph:
            raise ValueError(f"attention backend {backend.name!r} does not support CUDA graphs")
        self.model = model
        self.kv_pool = kv_pool
        self.req_pool = req_pool
        self.backend = backend
        self.device = device
        self.sizes = sorted(sizes)
        self.max_seq_len = max_seq_len
        self.capture_graphs = capture
        pin = device.type == "cuda"
        self._host = host.pin_memory() if pin else host
        self._host_np = self._host.numpy()
        self._inputs = self._host.to(device, copy=True)  # the graphs' static inputs
        # The host buffer must not be rewritten while its last copy may still be reading it.
        self._copied = torch.cuda.Event() if pin else None
        self._batches: dict[int, ForwardBatch] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        # Each runner's own (`capture_graphs`). torch hands streams out from a pool of 32, round
        # robin: the decode and prompt runners, built one after the other, get different ones.
        self.capture_stream = torch.cuda.Stream(device) if capture else None
        self.replays = 0  # forwards served (a count for tests and stats)

    def _forward_batch(self, size: int) -> ForwardBatch:
        raise NotImplementedError

    def _static_batch(
        self,
        mode: ForwardMode,
        tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # ids, positions, KV slots: [T]
        requests: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],  # rows, lengths: [B]
        logits_indices: torch.Tensor,
        pad_len: int,  # a padding request's seq_len and extend_len, for the host copies
    ) -> ForwardBatch:
        (ids, positions, slots), (rows, seq_lens, prefix_lens, extend_lens) = tokens, requests
        n = rows.shape[0]
        return ForwardBatch(
            mode=mode,
            input_ids=ids,
            positions=positions,
            out_cache_loc=slots,
            req_pool_indices=rows,
            seq_lens=seq_lens,
            extend_prefix_lens=prefix_lens,
            extend_seq_lens=extend_lens,
            logits_indices=logits_indices,
            # Host copies describe the padding only: graph plans must not read them.
            req_pool_indices_cpu=[0] * n,
            seq_lens_cpu=[pad_len] * n,
            extend_prefix_lens_cpu=[0] * n,
            extend_seq_lens_cpu=[pad_len] * n,
            req_to_token_pool=self.req_pool,
            kv_pool=self.kv_pool,
            attn_backend=self.backend,
        )

    def _run(self, fb: ForwardBatch) -> torch.Tensor:  # [rows, vocab] float32
        self.backend.init_forward_metadata_graph(fb, self.max_seq_len)
        hidden = self.model(fb.input_ids, fb.positions, fb)  # [T, hidden]
        # A decode batch: every row's logits; a prompt batch: its logits rows'.
        rows = hidden if fb.mode == ForwardMode.DECODE else hidden[fb.logits_indices]
        return self.model.compute_logits(rows)

    def _prepare(self) -> None:
        start = time.perf_counter()
        for size in reversed(self.sizes):
            self._batches[size] = self._forward_batch(size)
        if self.capture_stream is not None:
            self._graphs, self._outputs = capture_graphs(self._batches, self._run, self.capture_stream)
        logger.info(
            "CUDA graphs for %s: %s %d sizes up to %d in %.1f s",
            self.what,
            "captured" if self.capture_graphs else "prepared (eager)",
            len(self.sizes),
            self.sizes[-1],
            time.perf_counter() - start,
        )

    def _host_buffer(self) -> np.ndarray:
        """The host buffer, once its last upload has read it (normally long done)."""
        if self._copied is not None:
            self._copied.synchronize()
        return self._host_np

    def _upload(self) -> None:
        # The whole buffer: a contiguous copy stays one async memcpy (a strided one would not).
        self._inputs.copy_(self._host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def _replay(self, size: int) -> torch.Tensor:
        """The forward of `size` on the static inputs: its graph's output (a view, valid until
        its next replay)."""
        self.replays += 1
        if self.capture_graphs:
            self._graphs[size].replay()
            return self._outputs[size]
        return self._run(self._batches[size])


class CudaGraphRunner(_GraphRunner):
    """Captured decode forwards for a set of batch sizes, and the per-step replay."""

    what = "decode batch sizes"

    def __init__(
        self,
        model: CausalLM,
        kv_pool: KVPool,
        req_pool: ReqToTokenPool,
        backend: AttentionBackend,
        device: torch.device,
        batch_sizes: list[int],
        max_seq_len: int,
        capture: bool = True,
    ) -> None:
        max_bs = max(batch_sizes)
        host = torch.tensor(_PAD_COLUMN, dtype=torch.int64)[:, None].repeat(1, max_bs)  # [5, max_bs]
        super().__init__(model, kv_pool, req_pool, backend, device, batch_sizes, max_seq_len, host, capture)
        self.batch_sizes = self.sizes
        self.max_bs = max_bs
        self._prepare()

    # ---- capture -----------------------------------------------------------------------------

    def _forward_batch(self, bs: int) -> ForwardBatch:
        """The decode batch over the first `bs` columns of the static inputs."""
        inp = self._inputs
        ones = torch.ones(bs, dtype=torch.int64, device=self.device)
        return self._static_batch(
            ForwardMode.DECODE,
            (inp[_IDS, :bs], inp[_POS, :bs], inp[_LOC, :bs]),
            # extend_prefix_lens: seq_len - 1, the position of the new token
            (inp[_ROW, :bs], inp[_LEN, :bs], inp[_POS, :bs], ones),
            torch.arange(bs, dtype=torch.int64, device=self.device),
            pad_len=1,
        )

    # ---- replay ------------------------------------------------------------------------------

    def can_run(self, batch: ScheduleBatch) -> bool:
        return batch.is_decode and self.can_run_size(len(batch.items))

    def can_run_size(self, bs: int) -> bool:
        return 0 < bs <= self.max_bs

    def padded_size(self, bs: int) -> int:
        return next(size for size in self.batch_sizes if size >= bs)

    @torch.inference_mode()
    def run(self, batch: ScheduleBatch, patch: tuple[list[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [B, vocab] (float32) for a decode batch of B <= max_bs requests. `patch`:
        (items, their input tokens on the device) for inputs the host does not know yet."""
        items = batch.items
        bs = len(items)
        padded = self.padded_size(bs)
        host = self._host_buffer()
        host[_IDS, :bs] = [_token_at(it.req, it.start) for it in items]
        host[_POS, :bs] = [it.start for it in items]
        host[_LOC, :bs] = torch.cat([it.slots for it in items]).numpy()
        host[_ROW, :bs] = [it.req.row for it in items]
        host[_LEN, :bs] = [it.start + 1 for it in items]
        for row, pad in enumerate(_PAD_COLUMN):
            host[row, bs:padded] = pad
        self._upload()
        if patch is not None:
            columns, tokens = patch
            self._inputs[_IDS].index_copy_(0, to_device(columns, self.device), tokens)
        logits = self._replay(padded)
        sampling = [i for i, it in enumerate(items) if it.sample]
        if len(sampling) == bs:
            return logits[:bs]
        # A one-token prefill chunk that does not end its prompt looks like decode but samples nothing.
        return logits[torch.tensor(sampling, dtype=torch.int64, device=self.device)]

    def replay_fn(self, bs: int) -> Callable[[], torch.Tensor]:
        """Replay (or, without graphs, rerun) the captured size `bs` on whatever the static inputs
        hold: for timing the forward alone (bench/gpu_bench.py)."""
        if self.capture_graphs:
            graph, out = self._graphs[bs], self._outputs[bs]

            def replay() -> torch.Tensor:
                graph.replay()
                return out

            return replay
        fb = self._batches[bs]
        return lambda: self._run(fb)

    def eager_fn(self, bs: int) -> Callable[[], torch.Tensor]:
        """The captured size's forward run eagerly (same kernels, launched one by one): for
        profiling per kernel, which a graph replay hides."""
        fb = self._batches[bs]
        return lambda: self._run(fb)


# Requests one prompt graph takes: the step's prompt chunks (a step budget of a few thousand
# tokens holds a handful of prompts at a time; more run eagerly).
PROMPT_GRAPH_MAX_REQS = 16
# Rows of the prompt graphs' static token and request inputs.
_T_IDS, _T_POS, _T_LOC = range(3)
_R_ROW, _R_LEN, _R_PREFIX, _R_EXTEND, _R_LOGIT = range(5)


def prompt_token_counts(max_tokens: int) -> list[int]:
    """The token counts prompt graphs are captured at: 64, 128, 256, then every multiple of 256
    up to `max_tokens` (and `max_tokens` itself); a chunk pads up to the next one."""
    counts = [t for t in (64, 128) if t < max_tokens] + list(range(256, max_tokens + 1, 256))
    if not counts or counts[-1] != max_tokens:
        counts.append(max_tokens)
    return counts


class PromptGraphRunner(_GraphRunner):
    """Captured prompt (EXTEND) forwards at a set of token counts, for up to
    `PROMPT_GRAPH_MAX_REQS` requests, and their replay (module docstring). Multi-head attention
    models on a backend that plans extend graphs (not MLA, not MoE: their layers plan from host
    values)."""

    what = "prompt token counts"

    def __init__(
        self,
        model: CausalLM,
        kv_pool: KVPool,
        req_pool: ReqToTokenPool,
        backend: AttentionBackend,
        device: torch.device,
        token_counts: list[int],
        max_seq_len: int,
        capture: bool = True,
    ) -> None:
        t, r = max(token_counts), PROMPT_GRAPH_MAX_REQS
        # One flat buffer, one upload a step: [3, T] token rows then [5, R] request rows.
        host = torch.zeros(3 * t + 5 * r, dtype=torch.int64)
        super().__init__(model, kv_pool, req_pool, backend, device, token_counts, max_seq_len, host, capture)
        self.token_counts = self.sizes
        self.max_tokens = t
        self._tok = self._inputs[: 3 * t].view(3, t)
        self._req = self._inputs[3 * t :].view(5, r)
        self._prepare()

    def _forward_batch(self, count: int) -> ForwardBatch:
        """The prompt batch over the first `count` token columns and every request column."""
        tok, req = self._tok, self._req
        return self._static_batch(
            ForwardMode.EXTEND,
            (tok[_T_IDS, :count], tok[_T_POS, :count], tok[_T_LOC, :count]),
            (req[_R_ROW], req[_R_LEN], req[_R_PREFIX], req[_R_EXTEND]),
            req[_R_LOGIT],
            pad_len=0,
        )

    def can_run(self, batch: ScheduleBatch) -> bool:
        return (
            not batch.embeds
            and 0 < len(batch.items) <= PROMPT_GRAPH_MAX_REQS
            and 0 < batch.num_tokens <= self.max_tokens
            and not batch.is_decode
        )

    @torch.inference_mode()
    def run(self, batch: ScheduleBatch, patch: tuple[list[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [N, vocab] (float32) of the batch's sampling items, in batch order (a view of the
        graph's static output, valid until the next replay, as decode's). `patch`:
        (items, their input tokens on the device) for inputs the host does not know yet (each
        the last input of its item)."""
        items = batch.items
        n, total = len(items), batch.num_tokens
        count = next(c for c in self.token_counts if c >= total)
        t, r = self.max_tokens, PROMPT_GRAPH_MAX_REQS
        host = self._host_buffer()
        tok, req = host[: 3 * t].reshape(3, t), host[3 * t :].reshape(5, r)
        ends = list(itertools.accumulate(it.extend_len for it in items))
        tok[_T_IDS, :total] = [i for it in items for i in it.req.all_ids[it.start : it.start + it.extend_len]]
        tok[_T_POS, :total] = [p for it in items for p in range(it.start, it.start + it.extend_len)]
        tok[_T_LOC, :total] = torch.cat([it.slots for it in items]).numpy()
        tok[:, total:count] = 0  # padding tokens: token 0 at position 0, K/V to the padding slot
        req[_R_ROW, :n] = [it.req.row for it in items]
        req[_R_LEN, :n] = [it.start + it.extend_len for it in items]
        req[_R_PREFIX, :n] = [it.start for it in items]
        req[_R_EXTEND, :n] = [it.extend_len for it in items]
        req[:, n:] = 0  # padding requests: no new tokens, so their attention programs return
        # Logits rows: the sampling items' last tokens, in batch order, first (the rest unread).
        sampling = [end - 1 for it, end in zip(items, ends) if it.sample]
        req[_R_LOGIT, : len(sampling)] = sampling
        req[_R_LOGIT, len(sampling) :] = 0
        self._upload()
        if patch is not None:
            columns, tokens = patch
            rows = to_device([ends[i] - 1 for i in columns], self.device)
            self._tok[_T_IDS].index_copy_(0, rows, tokens)
        logits = self._replay(count)
        return logits[: len(sampling)]  # a view of the graph's static output, as decode's
