"""Runs the model: owns the weights, the KV memory and the attention backend on one device.

The scheduler hands it a `ScheduleBatch` each step; it builds the device-side `ForwardBatch`,
runs the forward and returns logits for the requests that sample this step. On CUDA, decode-only
steps of up to `cuda_graph_max_bs` requests replay a captured CUDA graph (shared/cuda_graph.py);
prefill and larger steps run eagerly. A mixed step's leading decode rows replay their graph on a
second stream while its prompt chunks run eagerly on the first (unless
`disable_split_mixed_steps`): the bandwidth-bound decode forward beside the compute-bound
prompts, as a prefill and a decode engine sharing one GPU run theirs. With
`cuda_graph_prompt_tokens` (off by default until measured) prompt steps of up to that many
tokens replay a captured graph too (`PromptGraphRunner`): the eager forward of a lone prompt waits
on the host's launches. Prompt chunks beside split decode rows stay eager.

With tensor parallelism (`tp_size > 1`, shared/distributed/) every rank has a runner holding its
shard of the weights and of the KV pool. Rank 0's `forward` first broadcasts the step's inputs;
the other ranks run `follow()`, which receives them and runs the same forward, its collectives
included. Logits reach rank 0 only. CUDA graphs are off with tensor parallelism for now.

With DP attention (`enable_dp_attention`, shared/distributed/dp_attention.py) every rank's runner
serves its own engine's batches instead: no broadcast, whole attention and KV per rank, and each
forward first exchanges the step's token counts (`ForwardBatch.dp`) for the gathered MLP layers;
a rank whose engine ran no forward in a step joins the others' through `dp_step_end`.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from shared.attention import create_backend, resolve_backend_name
from shared.attention.mla import MLAAttention
from shared.batch import ForwardBatch, ForwardMode, to_device, to_device_int64
from shared.config import EngineConfig
from shared.cuda_graph import CudaGraphRunner, PromptGraphRunner, capture_batch_sizes, prompt_token_counts
from shared.distributed import dp_attention, parallel_state
from shared.distributed.step_sync import StepBroadcast, StepInputs, TransferOps
from shared.mem import PageAllocator, ReqToTokenPool, make_kv_pool
from shared.models.config import ModelConfig, resolve_dtype
from shared.models.layers.moe import FusedMoE
from shared.models.loader import load_model
from shared.pooling import pool_chunk
from shared.quant.fp8 import FP8_DTYPE
from shared.scheduler.request import Req
from shared.scheduler.scheduler import ScheduleBatch

if TYPE_CHECKING:
    from shared.transfer.shard_follower import FollowerTransfer

logger = logging.getLogger(__name__)

_CPU_DEFAULT_TOKENS = 32768


def resolve_device(option: str, base_gpu_id: int = 0, local_rank: int = 0) -> torch.device:
    """The device of `option`; on CUDA, a node's k-th tensor-parallel rank (`local_rank`) takes GPU
    `base_gpu_id + k` (counted from the index in `option`, if any)."""
    if option == "auto":
        option = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(option)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {option!r} requested but CUDA is not available")
    if device.type == "cuda" and (base_gpu_id or local_rank):
        device = torch.device("cuda", (device.index or 0) + base_gpu_id + local_rank)
    return device


@dataclass(frozen=True)
class PrevTokens:
    """Overlap scheduling: the tokens the previous step sampled, still on the device. A request
    with a pending placeholder (`Req.pending`) takes its input token from here."""

    ids: torch.Tensor  # [B_prev] int64, on the device
    rows: dict[Req, int]  # request -> its row in `ids`

    def patch(self, batch: ScheduleBatch, device: torch.device) -> tuple[list[int], torch.Tensor] | None:
        """(items of `batch` whose input is a pending token, those tokens on the device)."""
        items = [i for i, it in enumerate(batch.items) if it.req.pending]
        if not items:
            return None
        rows = [self.rows[batch.items[i].req] for i in items]
        return items, self.ids.index_select(0, to_device(rows, device))


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tp_size = parallel_state.tp_size()
        if self.tp_size != config.tp_size:
            raise ValueError(
                f"tp_size={config.tp_size} but this process is in a group of {self.tp_size}: tensor"
                " parallelism runs through the engine process (shared/engine_process.py), which"
                " starts the ranks"
            )
        self.device = resolve_device(
            config.device, config.base_gpu_id, config.local_rank(parallel_state.tp_rank())
        )
        model_config = ModelConfig.from_model_path(Path(config.model_path))
        dp = config.enable_dp_attention
        if dp:
            dp_attention.check_support(model_config, self.tp_size, config.ep_size)
        else:
            parallel_state.check_tp_support(model_config, self.tp_size, config.ep_size)
        dtype = resolve_dtype(config.dtype, model_config)
        with dp_attention.building(dp):
            self.model, self.model_config = load_model(
                config.model_path, dtype, self.device, config.quantization
            )
        self.dtype = dtype
        self.backend = create_backend(resolve_backend_name(config.attention_backend, self.device))
        if config.attention_backend == "auto" and (missing := self.backend.missing(self.model)):
            logger.warning(
                "attention backend torch, not %s: %s needs %s, which %s lacks (no CUDA graphs,"
                " slower attention)",
                self.backend.name,
                self.model_config.architecture,
                ", ".join(missing),
                self.backend.name,
            )
            self.backend = create_backend("torch")
        if self.device.type == "cuda":  # process-wide: each engine sets it before its graphs
            from kernels import pdl

            pdl.enable(not config.disable_pdl)
        # Before the KV pool takes its memory: refuse a model whose attention layers need what the
        # backend named lacks (Gemma 2's soft-capping on triton).
        self.backend.check_supports(self.model, self.model_config.architecture)
        # KV storage: the model dtype, or E4M3 (scale 1.0) for kv_cache_dtype="fp8_e4m3".
        self.kv_dtype = FP8_DTYPE if config.kv_cache_dtype == "fp8_e4m3" else self.dtype
        mc = self.model_config
        page_size = config.page_size
        num_tokens = config.max_total_tokens or self._tokens_that_fit()
        if self.tp_size > 1:  # every rank's pool has as many slots as rank 0's allocator hands out
            num_tokens = parallel_state.min_across_ranks(num_tokens, self.device)
        num_pages = max(1, -(-num_tokens // page_size))
        self.allocator = PageAllocator(num_pages, page_size)
        pool_config = self._pool_config()  # this rank's KV heads
        self.kv_pool = make_kv_pool(pool_config, self.allocator.pool_slots, self.kv_dtype, self.device)
        # A request must always fit alone in the pool, or retraction could not make progress.
        self.max_context_len = min(
            config.max_context_len or mc.max_position_embeddings, self.allocator.num_slots
        )
        self.req_pool = ReqToTokenPool(
            config.max_running_requests,
            self.max_context_len,
            self.device,
            record_writes=self.tp_size > 1 and not dp,
        )
        logger.info(
            "KV pool: %d pages x %d tokens (%.1f MiB), max context %d, attention backend %s",
            num_pages,
            page_size,
            self.kv_pool.total_bytes() / 2**20,
            self.max_context_len,
            self.backend.name,
        )
        self.graph_runner = self._make_graph_runner()
        self.prompt_graphs = self._make_prompt_graph_runner(dp)
        self._side_stream: torch.cuda.Stream | None = None  # split mixed steps, made on first use
        self.split_steps = 0  # mixed steps run split (a count for tests and benchmarks)
        # Tensor parallelism: rank 0 sends each step's inputs, the other ranks receive them.
        self.step_sync = StepBroadcast(self.device) if self.tp_size > 1 and not dp else None
        # DP attention: each rank its own batches; the step's token counts are exchanged.
        self.dp_tokens = dp_attention.StepTokens(self.device) if dp else None
        if self.tp_size > 1:
            parallel_state.serving_started()

    def _pool_config(self) -> ModelConfig:
        """The model config as this rank's KV pool sees it: its own share of the KV heads."""
        if self.tp_size == 1:
            return self.model_config
        heads = parallel_state.kv_heads_per_rank(self.model_config, self.tp_size)
        return dataclasses.replace(self.model_config, num_key_value_heads=heads)

    def _make_graph_runner(self) -> CudaGraphRunner | None:
        config = self.config
        if self.device.type != "cuda" or config.disable_cuda_graph:
            return None
        if self.tp_size > 1:
            logger.info("CUDA graphs off: not yet captured with tensor parallelism")
            return None
        if not self.backend.supports_cuda_graph:
            logger.info("CUDA graphs off: attention backend %r cannot replay them", self.backend.name)
            return None
        max_bs = min(config.cuda_graph_max_bs, config.max_running_requests)
        return CudaGraphRunner(
            self.model,
            self.kv_pool,
            self.req_pool,
            self.backend,
            self.device,
            capture_batch_sizes(max_bs),
            self.max_context_len,
        )

    def _make_prompt_graph_runner(self, dp: bool) -> PromptGraphRunner | None:
        config = self.config
        if config.cuda_graph_prompt_tokens is None or self.graph_runner is None or dp:
            return None  # off, or no graphs at all here (CPU, tensor parallelism, the backend)
        layers = {type(m) for m in self.model.modules()}
        if MLAAttention in layers or any(issubclass(t, FusedMoE) for t in layers):
            logger.info("CUDA graphs for prompt chunks off: MLA and MoE layers plan from host values")
            return None
        max_tokens = config.cuda_graph_prompt_tokens
        if config.chunked_prefill_size > 0:  # no prompt step is larger than the budget
            max_tokens = min(max_tokens, config.chunked_prefill_size)
        return PromptGraphRunner(
            self.model,
            self.kv_pool,
            self.req_pool,
            self.backend,
            self.device,
            prompt_token_counts(max_tokens),
            self.max_context_len,
        )

    def _tokens_that_fit(self) -> int:
        if self.device.type != "cuda":
            return _CPU_DEFAULT_TOKENS
        # Memory of engines this process dropped (reference cycles, the allocator's cache)
        # would otherwise count as used.
        gc.collect()
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(self.device)
        # The pool's own formula, from a one-slot pool on the meta device (allocates nothing).
        per_token = make_kv_pool(self._pool_config(), 1, self.kv_dtype, "meta").bytes_per_token()
        return max(self.config.page_size, int(free * self.config.mem_fraction_static) // per_token)

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def is_embedding(self) -> bool:
        """The model has no lm head: it serves embeddings only (shared/pooling.py)."""
        return self.model.is_embedding

    @torch.inference_mode()
    def forward(self, batch: ScheduleBatch, prev: PrevTokens | None = None) -> torch.Tensor:
        """Logits [N, V] (float32) for the items that sample, in batch order. Items whose
        request has a pending token take it from `prev` (overlap scheduling). A batch with
        embedding requests goes through `forward_embed` instead."""
        writes = self.req_pool.flush()
        patch = prev.patch(batch, self.device) if prev is not None else None
        if self.graph_runner is not None and self.graph_runner.can_run(batch):
            return self.graph_runner.run(batch, patch)  # every item of a decode batch samples
        if split := self._decode_rows_apart(batch, patch):
            return self._run_split(batch, split, patch, writes)
        return self._run_rest(batch, patch, writes)

    def _run_rest(
        self, batch: ScheduleBatch, patch: tuple[list[int], torch.Tensor] | None, writes: torch.Tensor | None
    ) -> torch.Tensor:
        """Logits of a step no decode graph takes: its prompt graph's replay where one was
        captured for it, else the eager forward."""
        if self.prompt_graphs is not None and self.prompt_graphs.can_run(batch):
            return self.prompt_graphs.run(batch, patch)
        return self._run(self._eager_batch(batch, patch, writes))

    def _decode_rows_apart(self, batch: ScheduleBatch, patch: tuple[list[int], torch.Tensor] | None) -> int:
        """How many leading items of a mixed step run as a decode graph apart from the rest (the
        scheduler puts decoding requests first); 0: the step runs whole."""
        graphs = self.graph_runner
        if (
            graphs is None
            or self.config.disable_split_mixed_steps
            or batch.embeds
            or self.step_sync is not None
            or self.dp_tokens is not None
        ):
            return 0
        items = batch.items
        # Decode rows that sample: their logits are then the graph's output rows, as they are.
        d = next(
            (i for i, it in enumerate(items) if not (it.extend_len == 1 and it.start > 0 and it.sample)), 0
        )
        if d == 0 or not graphs.can_run_size(d):
            return 0
        if patch is not None and max(patch[0]) >= d:  # a pending input among the prompts' rows
            return 0
        return d

    def _run_split(
        self,
        batch: ScheduleBatch,
        d: int,
        patch: tuple[list[int], torch.Tensor] | None,
        writes: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits of a mixed step whose first `d` items (decoding) replay their CUDA graph on the
        side stream while the rest (prompt chunks) run eagerly on the current one, prompt graphs
        or not (a prompt graph replayed beside the decode graph made the step slower than the two
        halves one after the other; eager launches overlap them: docs/benchmarks.md, r31); joined
        in batch order. Their KV writes go to disjoint slots, and each row reads only its own request's
        keys. On a CPU (tests) the two halves run one after the other."""
        graphs = self.graph_runner
        assert graphs is not None
        decode, prompts = ScheduleBatch(batch.items[:d]), ScheduleBatch(batch.items[d:])
        self.split_steps += 1
        if self.device.type != "cuda":
            head = graphs.run(decode, patch)
            return torch.cat([head, self._run(self._eager_batch(prompts, None, writes))])
        main = torch.cuda.current_stream(self.device)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        side = self._side_stream
        side.wait_stream(main)  # this step's table writes and pending tokens, the last step's reads
        if patch is not None:
            patch[1].record_stream(side)  # made on the main stream, read on the side one
        with torch.cuda.stream(side):
            head = graphs.run(decode, patch)  # [d, V]: a view of the graph's static output
        try:
            tail = self._run(self._eager_batch(prompts, None, writes))
        finally:  # also when the prompts' forward fails (OOM): nothing may outrun the decode rows'
            main.wait_stream(side)  # KV writes into pages the failed step's requests give back
        return torch.cat([head, tail])

    @torch.inference_mode()
    def forward_embed(
        self, batch: ScheduleBatch, prev: PrevTokens | None = None
    ) -> tuple[torch.Tensor, dict[Req, torch.Tensor]]:
        """`forward` for a batch holding embedding requests (`batch.embeds`), always eager:
        (logits [N, V] for the items that sample, excluding embedding requests; the finished
        embeddings [dims] float32 of the embedding requests whose prompt ends this step).
        Mean pooling's partial sums of unfinished prompts stay on their requests."""
        writes = self.req_pool.flush()
        patch = prev.patch(batch, self.device) if prev is not None else None
        fb = self._eager_batch(batch, patch, writes)
        self.backend.init_forward_metadata(fb)
        hidden = self.model(fb.input_ids, fb.positions, fb)  # [T, hidden], after the final norm
        embeddings: dict[Req, torch.Tensor] = {}
        end = 0
        for it in batch.items:
            start, end = end, end + it.extend_len
            req = it.req
            if req.pooling is None:
                continue
            if req.pooling.pooling == "mean" and it.start == 0:
                req.pool_partial = None  # a recompute from scratch (after a retraction)
            vec, req.pool_partial = pool_chunk(hidden[start:end], req.pooling, req.pool_partial, it.sample)
            if vec is not None:
                embeddings[req] = vec
        return self.model.compute_logits(hidden[fb.logits_indices]), embeddings

    def _eager_batch(
        self,
        batch: ScheduleBatch,
        patch: tuple[list[int], torch.Tensor] | None,
        writes: torch.Tensor | None,
    ) -> ForwardBatch:
        fb = self.build_forward_batch(batch)
        if patch is not None:
            items, tokens = patch
            # A pending request runs one decode token: the last input of its item.
            ends = list(itertools.accumulate(it.extend_len for it in batch.items))
            fb.input_ids.index_copy_(0, to_device([ends[i] - 1 for i in items], self.device), tokens)
        if self.step_sync is not None:
            self.step_sync.send(fb, writes)
        if self.dp_tokens is not None:
            fb.dp = self.dp_tokens.exchange(fb.num_tokens)
        return fb

    def _run(self, fb: ForwardBatch) -> torch.Tensor:
        self.backend.init_forward_metadata(fb)
        hidden = self.model(fb.input_ids, fb.positions, fb)  # [T, hidden]
        return self.model.compute_logits(hidden[fb.logits_indices])

    @torch.inference_mode()
    def follow(self, transfer: FollowerTransfer | None = None) -> None:
        """A follower rank's loop: run each forward rank 0 broadcasts, until it stops. A collective
        with a dead rank raises (the caller exits). A prefill/decode engine's follower moves its
        KV shard as rank 0 instructs (`transfer`, shared/transfer/shards.py)."""
        assert self.step_sync is not None and parallel_state.tp_rank() > 0
        while (inputs := self.step_sync.recv()) is not None:
            if isinstance(inputs, TransferOps):
                assert transfer is not None, "KV-transfer instructions for an engine without PD"
                transfer.run(inputs.words)
                continue
            if inputs.writes.shape[1]:
                self.req_pool.apply(inputs.writes)
            self._run(self._forward_batch_from(inputs))  # logits stay on rank 0
            if transfer is not None:
                transfer.progress()  # NIXL writes into or out of our shard progress as we poll

    @torch.inference_mode()
    def dp_step_end(self) -> bool:
        """DP attention, after every engine step on every rank: a rank whose step ran no forward
        still exchanges its count (0) and runs its MLP shards on the others' tokens, so every
        rank runs the same collectives. Returns whether it ran such an idle forward."""
        assert self.dp_tokens is not None
        layout = self.dp_tokens.end_step()
        if layout is None:
            return False
        assert isinstance(self.model, dp_attention.DpAttentionModel)
        self.model.forward_idle(layout)
        return True

    def stop_followers(self) -> None:
        """Rank 0, shutting down: release the followers from `follow`."""
        if self.step_sync is not None:
            self.step_sync.stop()

    def ping_followers(self) -> None:
        """Rank 0, idle: raises when a rank died."""
        if self.step_sync is not None:
            self.step_sync.ping()

    def _forward_batch_from(self, inputs: StepInputs) -> ForwardBatch:
        rows, seq_lens, prefix_lens, ext_lens = inputs.host
        return ForwardBatch(
            mode=inputs.mode,
            input_ids=inputs.input_ids,
            positions=inputs.positions,
            out_cache_loc=inputs.out_cache_loc,
            req_pool_indices=inputs.req_pool_indices,
            seq_lens=inputs.seq_lens,
            extend_prefix_lens=inputs.extend_prefix_lens,
            extend_seq_lens=inputs.extend_seq_lens,
            logits_indices=inputs.logits_indices,
            req_pool_indices_cpu=rows,
            seq_lens_cpu=seq_lens,
            extend_prefix_lens_cpu=prefix_lens,
            extend_seq_lens_cpu=ext_lens,
            req_to_token_pool=self.req_pool,
            kv_pool=self.kv_pool,
            attn_backend=self.backend,
        )

    def build_forward_batch(self, batch: ScheduleBatch) -> ForwardBatch:
        ids: list[int] = []
        positions: list[int] = []
        logits_rows: list[int] = []
        embeds = batch.embeds  # embedding requests end their prompt without a next token
        for it in batch.items:
            ids += it.req.all_ids[it.start : it.start + it.extend_len]
            positions += range(it.start, it.start + it.extend_len)
            if it.sample and not (embeds and it.req.pooling is not None):
                logits_rows.append(len(ids) - 1)
        rows = [row for it in batch.items if (row := it.req.row) is not None]
        seq_lens = [it.start + it.extend_len for it in batch.items]
        prefix_lens = [it.start for it in batch.items]
        ext_lens = [it.extend_len for it in batch.items]
        assert len(rows) == len(batch.items), "a scheduled request without a row"
        slots = torch.cat([it.slots for it in batch.items])
        # One pinned, non-blocking copy: a pageable one per field would each wait for the GPU to
        # drain, so the host would stop for the step still running before launching this one.
        on_device = to_device_int64(
            [ids, positions, slots, rows, seq_lens, prefix_lens, ext_lens, logits_rows], self.device
        )
        return ForwardBatch(
            mode=ForwardMode.DECODE if batch.is_decode else ForwardMode.EXTEND,
            input_ids=on_device[0],
            positions=on_device[1],
            out_cache_loc=on_device[2],
            req_pool_indices=on_device[3],
            seq_lens=on_device[4],
            extend_prefix_lens=on_device[5],
            extend_seq_lens=on_device[6],
            logits_indices=on_device[7],
            req_pool_indices_cpu=rows,
            seq_lens_cpu=seq_lens,
            extend_prefix_lens_cpu=prefix_lens,
            extend_seq_lens_cpu=ext_lens,
            req_to_token_pool=self.req_pool,
            kv_pool=self.kv_pool,
            attn_backend=self.backend,
        )
