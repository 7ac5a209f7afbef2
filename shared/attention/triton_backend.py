"""Attention on the Triton kernels in `kernels/`: split-K paged decode and ragged extend.

Same contract and results as the torch backend. Per layer, `forward` stores the new tokens' K/V
in the pool (`kernels.kv_store`, at `batch.out_cache_loc`), then runs
`kernels.decode_attention` on a decode step or `kernels.extend_attention` otherwise; both read
every key, the new ones included, from the pool through `req_to_token`. `init_forward_metadata`
plans once per step what all layers share: the per-request index vectors and the host-side
maxima that size the kernels' grids, so no layer syncs with the device.

CUDA graphs: `init_forward_metadata_graph` plans a decode step from the batch size and an upper
bound on sequence length (the engine's max context) instead of this batch's lengths. The split
count of the decode kernel, the only host-side choice, then depends on those two alone, and the
kernels read every length and index from the batch's static tensors at replay. Graphs split the
keys more finely than eager steps (`_graph_kv_splits`): a small batch otherwise leaves most of
the GPU idle while a few programs walk the whole context (measured on an H100, Llama-3-8B shape,
batch 1 at 1k context: 11.4 us per layer with the eager plan's 6 splits, 7.7 us with 16).

Registered as "triton" only where Triton is installed. The kernels are imported when the backend
is built, not when this module is: importing `shared.attention` does not import Triton, and
`TRITON_INTERPRET=1` (which Triton reads when a kernel is defined) set by a test before it builds
an engine still takes effect. On CPU the kernels run only under that interpreter.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from shared.attention.base import AttentionBackend, register_backend
from shared.batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from shared.attention.layer import Attention


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
        from kernels.kv_store import store_kv

        self._decode_attention = decode_attention
        self._extend_attention = extend_attention
        self._store_kv = store_kv
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
        if batch.mode != ForwardMode.DECODE:
            raise ValueError("CUDA graphs capture decode steps only")
        self._plan = _StepPlan(
            batch=batch, extend_starts=None, max_seq_len=max_seq_len, max_extend_len=1, graph=True
        )

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        layer: Attention,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [T, Hq, D]
        if self._plan is None or self._plan.batch is not batch:
            # A caller that runs the model outside the runner (tests) may skip the planning hook.
            self.init_forward_metadata(batch)
        plan = self._plan
        assert plan is not None
        # get_kv returns the live buffers, so writing them is the pool's set_kv.
        k_buf, v_buf = batch.kv_pool.get_kv(layer.layer_id)
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


if importlib.util.find_spec("triton") is not None:
    register_backend("triton")(TritonAttentionBackend)
