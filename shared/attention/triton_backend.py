"""Attention on the Triton kernels in `kernels/`: split-K paged decode and ragged extend.

Same contract and results as the torch backend. Per layer, `forward` stores the new tokens' K/V
in the pool (`kernels.kv_store`, at `batch.out_cache_loc`), then runs
`kernels.decode_attention` on a decode step or `kernels.extend_attention` otherwise; both read
every key, the new ones included, from the pool through `req_to_token`. `init_forward_metadata`
plans once per step what all layers share: the per-request index vectors and the host-side
maxima that size the kernels' grids, so no layer syncs with the device.

CUDA graphs: `init_forward_metadata_graph` plans a decode step from the batch size and an upper
bound on sequence length (the engine's max context) instead of this batch's lengths; a prompt
step (shared/cuda_graph.py's `PromptGraphRunner`) from its token count, the extend kernel's
programs past a request's new tokens returning at once. The split
count of the decode kernel, the only host-side choice, then depends on those two alone, and the
kernels read every length and index from the batch's static tensors at replay. Graphs split the
keys more finely than eager steps (`_graph_kv_splits`): a small batch otherwise leaves most of
the GPU idle while a few programs walk the whole context (measured on an H100, Llama-3-8B shape,
batch 1 at 1k context: 11.4 us per layer with the eager plan's 6 splits, 7.7 us with 16).

MLA (DeepSeek): decode runs `kernels.mla_decode` (absorbed; a program takes several query heads
over the shared latent, read once). The absorbed extend is the extend kernel with one KV head of
width Dk whose values are a view of the same entries' first Dl columns. The expanded extend
gathers the step's latents (prefix and new tokens, request after request), expands them with
the model's callable into per-head keys and values, and runs the extend kernel over that scratch
through a request table whose rows are consecutive scratch rows.

Registered as "triton" only where Triton is installed. The kernels are imported when the backend
is built, not when this module is: importing `shared.attention` does not import Triton, and
`TRITON_INTERPRET=1` (which Triton reads when a kernel is defined) set by a test before it builds
an engine still takes effect. On CPU the kernels run only under that interpreter.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from shared.attention.base import AttentionBackend, register_backend
from shared.batch import ForwardBatch, ForwardMode
from shared.mem.kv_pool import MHAKVPool, MLAKVPool

if TYPE_CHECKING:
    from shared.attention.base import ExpandLatent
    from shared.attention.layer import Attention
    from shared.attention.mla import MLAAttention


@dataclass(frozen=True)
class _StepPlan:
    """What every layer of one forward step shares, beyond the batch's own tensors."""

    batch: ForwardBatch  # the step it was planned for
    extend_starts: torch.Tensor | None  # [B] int64, on the device: first row of each request in q
    max_seq_len: int  # host-side maxima (or bounds): grid sizes without a device sync
    max_extend_len: int
    graph: bool = False  # planned for a CUDA graph: from bounds, not this batch's lengths


# Graph decode plan: about this many stage-1 programs, each over at least one key block, at most
# the kernel's usual cap of splits. (1024 programs made batch 16 slower on the H100, 7.47 vs 7.33 ms.)
_GRAPH_TARGET_PROGRAMS = 512
_GRAPH_MIN_TOKENS_PER_SPLIT = 64
_GRAPH_MAX_KV_SPLITS = 16


def _graph_kv_splits(batch_size: int, num_kv_heads: int, max_kv_len: int) -> int:
    by_occupancy = -(-_GRAPH_TARGET_PROGRAMS // max(batch_size * num_kv_heads, 1))
    by_length = -(-max(max_kv_len, 1) // _GRAPH_MIN_TOKENS_PER_SPLIT)
    return max(1, min(_GRAPH_MAX_KV_SPLITS, by_occupancy, by_length))


class TritonAttentionBackend(AttentionBackend):
    supports_cuda_graph = True

    def __init__(self) -> None:
        # Deferred imports (see the module docstring).
        from kernels.decode_attention import decode_attention
        from kernels.extend_attention import extend_attention
        from kernels.kv_store import store_kv, store_latent
        from kernels.mla_decode import mla_decode_attention

        self._decode_attention = decode_attention
        self._extend_attention = extend_attention
        self._store_kv = store_kv
        self._store_latent = store_latent
        self._mla_decode = mla_decode_attention
        self._plan: _StepPlan | None = None

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        extend_lens = batch.extend_seq_lens
        self._plan = _StepPlan(
            batch=batch,
            extend_starts=torch.cumsum(extend_lens, 0) - extend_lens,
            max_seq_len=max(batch.seq_lens_cpu, default=0),
            max_extend_len=max(batch.extend_seq_lens_cpu, default=0),
        )

    def init_forward_metadata_graph(self, batch: ForwardBatch, max_seq_len: int) -> None:
        if batch.mode == ForwardMode.DECODE:
            self._plan = _StepPlan(
                batch=batch, extend_starts=None, max_seq_len=max_seq_len, max_extend_len=1, graph=True
            )
            return
        # A prompt graph: no request has more new tokens than the batch has rows, and the start
        # rows come from the lengths on the device (padding requests have none).
        extend_lens = batch.extend_seq_lens
        self._plan = _StepPlan(
            batch=batch,
            extend_starts=torch.cumsum(extend_lens, 0) - extend_lens,
            max_seq_len=max_seq_len,
            max_extend_len=batch.num_tokens,
            graph=True,
        )

    def _plan_for(self, batch: ForwardBatch) -> _StepPlan:
        if self._plan is None or self._plan.batch is not batch:
            # A caller that runs the model outside the runner (tests) may skip the planning hook.
            self.init_forward_metadata(batch)
        assert self._plan is not None
        return self._plan

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        layer: Attention,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [T, Hq, D]
        plan = self._plan_for(batch)
        pool = batch.kv_pool
        assert isinstance(pool, MHAKVPool), "MHA layers need an MHA pool"
        # get_kv returns the live buffers, so writing them is the pool's set_kv.
        k_buf, v_buf = pool.get_kv(layer.layer_id)
        self._store_kv(k, v, k_buf, v_buf, batch.out_cache_loc)
        req_to_token = batch.req_to_token_pool.req_to_token
        if batch.mode == ForwardMode.DECODE:
            num_kv_splits = None  # eager: the kernel plans from max_seq_len
            if plan.graph:
                window = layer.sliding_window
                max_kv_len = min(plan.max_seq_len, window) if window else plan.max_seq_len
                num_kv_splits = _graph_kv_splits(q.shape[0], layer.num_kv_heads, max_kv_len)
            # The decode kernel is specialised to one query per request: q is [B, Hq, D].
            return self._decode_attention(
                q,
                k_buf,
                v_buf,
                req_to_token,
                batch.req_pool_indices,
                batch.seq_lens,
                layer.scaling,
                layer.sliding_window,
                max_seq_len=plan.max_seq_len,
                num_kv_splits=num_kv_splits,
            )
        assert plan.extend_starts is not None
        return self._extend_attention(
            q,
            k_buf,
            v_buf,
            req_to_token,
            batch.req_pool_indices,
            batch.extend_prefix_lens,
            batch.extend_seq_lens,
            layer.scaling,
            layer.sliding_window,
            extend_starts=plan.extend_starts,
            max_extend_len=plan.max_extend_len,
        )

    # ---- multi-head latent attention (DeepSeek; contracts in the base class) ----------------

    def forward_mla_decode(
        self,
        q_abs: torch.Tensor,  # [B, H, Dk]
        latent: torch.Tensor,  # [B, Dk]
        layer: MLAAttention,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [B, H, Dl]
        plan = self._plan_for(batch)
        kv_buffer = _mla_store(latent, layer, batch, self._store_latent)
        num_kv_splits = None  # eager: the kernel plans from max_seq_len
        if plan.graph:
            from kernels.mla_decode import choose_mla_kv_splits

            num_kv_splits = choose_mla_kv_splits(
                plan.max_seq_len, q_abs.shape[0], q_abs.shape[1], kv_buffer.dtype
            )
        return self._mla_decode(
            q_abs,
            kv_buffer,
            batch.req_to_token_pool.req_to_token,
            batch.req_pool_indices,
            batch.seq_lens,
            layer.scaling,
            layer.kv_lora_rank,
            max_seq_len=plan.max_seq_len,
            num_kv_splits=num_kv_splits,
        )

    def forward_mla_extend_absorbed(
        self,
        q_abs: torch.Tensor,  # [T, H, Dk]
        latent: torch.Tensor,  # [T, Dk]
        layer: MLAAttention,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [T, H, Dl]
        plan = self._plan_for(batch)
        kv_buffer = _mla_store(latent, layer, batch, self._store_latent)
        return self._extend_attention(
            q_abs,
            kv_buffer,
            kv_buffer[..., : layer.kv_lora_rank],  # values: the c part of each entry (a view)
            batch.req_to_token_pool.req_to_token,
            batch.req_pool_indices,
            batch.extend_prefix_lens,
            batch.extend_seq_lens,
            layer.scaling,
            None,
            extend_starts=plan.extend_starts,
            max_extend_len=plan.max_extend_len,
        )

    def forward_mla_extend_expanded(
        self,
        q: torch.Tensor,  # [T, H, nope + rope]
        latent: torch.Tensor,  # [T, Dk]
        expand: ExpandLatent,
        layer: MLAAttention,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [T, H, v_head_dim]
        plan = self._plan_for(batch)
        kv_buffer = _mla_store(latent, layer, batch, self._store_latent)
        device = q.device
        seq_lens = batch.seq_lens_cpu
        total, max_len, num_reqs = sum(seq_lens), max(seq_lens, default=0), len(seq_lens)
        # Scratch row of each request's position j: starts[b] + j (request after request).
        starts = torch.cumsum(batch.seq_lens, 0) - batch.seq_lens  # [B]
        scratch_table = starts[:, None] + torch.arange(max(max_len, 1), device=device)[None, :]  # [B, L]
        # Slots of every (request, position) in the same order: the pool rows to gather.
        req_rows = torch.repeat_interleave(batch.req_pool_indices, batch.seq_lens, output_size=total)
        positions = torch.arange(total, device=device) - torch.repeat_interleave(
            starts, batch.seq_lens, output_size=total
        )
        slots = batch.req_to_token_pool.req_to_token[req_rows, positions]  # [S]
        entries = kv_buffer[slots, 0].to(q.dtype)  # [S, Dk]
        k_nope, v = expand(entries[:, : layer.kv_lora_rank])  # [S, H, nope], [S, H, v]
        k_rope = entries[:, None, layer.kv_lora_rank :].expand(-1, layer.num_heads, -1)
        keys = torch.cat([k_nope, k_rope], dim=-1)  # [S, H, nope + rope]
        return self._extend_attention(
            q,
            keys,
            v,
            scratch_table.to(batch.req_to_token_pool.req_to_token.dtype),
            torch.arange(num_reqs, device=device),
            batch.extend_prefix_lens,
            batch.extend_seq_lens,
            layer.scaling,
            None,
            extend_starts=plan.extend_starts,
            max_extend_len=plan.max_extend_len,
        )


def _mla_store(
    latent: torch.Tensor, layer: MLAAttention, batch: ForwardBatch, store: Callable[..., None]
) -> torch.Tensor:
    """Write the new tokens' latents; the layer's live pool buffer `[num_slots, 1, Dk]`."""
    pool = batch.kv_pool
    assert isinstance(pool, MLAKVPool), "MLA layers need an MLA pool"
    kv_buffer = pool.get_latent(layer.layer_id)
    store(latent, kv_buffer, batch.out_cache_loc)
    return kv_buffer


if importlib.util.find_spec("triton") is not None:
    register_backend("triton")(TritonAttentionBackend)
