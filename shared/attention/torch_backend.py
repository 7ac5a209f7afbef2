"""Reference attention in plain torch (SDPA with explicit masks): runs on CPU, computes in float32.

It is the numerical oracle for the GPU backends and the default where Triton is unavailable.
Extend batches (ragged prefixes and chunks) loop over requests, which keeps the masking
obvious; decode batches, the steady state, gather every request's keys into one padded tensor
so a step costs a few large ops instead of a few per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from shared.attention.base import AttentionBackend, register_backend
from shared.batch import ForwardMode

if TYPE_CHECKING:
    from shared.attention.layer import Attention
    from shared.batch import ForwardBatch


@register_backend("torch")
class TorchAttentionBackend(AttentionBackend):
    def __init__(self) -> None:
        # Decode-step plan shared by all layers: padded slot table and key positions.
        self._slots: torch.Tensor | None = None  # [B, S] int64
        self._key_pos: torch.Tensor | None = None  # [1, S]
        self._seq_lens: torch.Tensor | None = None  # [B, 1]

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        if batch.mode != ForwardMode.DECODE:
            self._slots = None
            return
        max_len = max(batch.seq_lens_cpu)
        self._slots = batch.req_to_token_pool.req_to_token[batch.req_pool_indices, :max_len]
        self._key_pos = torch.arange(max_len, device=batch.seq_lens.device).unsqueeze(0)
        self._seq_lens = batch.seq_lens.unsqueeze(1)

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        layer: Attention,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [T, Hq, D]
        batch.kv_pool.set_kv(layer.layer_id, batch.out_cache_loc, k, v)
        if self._slots is not None:
            return self._decode(q, layer, batch)
        return self._extend(q, layer, batch)

    def _decode(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        assert self._slots is not None and self._key_pos is not None and self._seq_lens is not None
        k_buf, v_buf = batch.kv_pool.get_kv(layer.layer_id)
        b, s = self._slots.shape
        flat = self._slots.reshape(-1)
        keys = k_buf.index_select(0, flat).view(b, s, layer.num_kv_heads, layer.head_dim)  # [B, S, Hkv, D]
        values = v_buf.index_select(0, flat).view(b, s, layer.num_kv_heads, layer.head_dim)
        # The query is the last token, at position seq_len - 1.
        hidden = self._key_pos >= self._seq_lens  # [B, S]
        if layer.sliding_window is not None:
            hidden |= self._key_pos <= self._seq_lens - 1 - layer.sliding_window
        out = _sdpa(
            q.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2), ~hidden[:, None, None, :], layer
        )
        return out.squeeze(2).to(q.dtype)  # [B, Hq, D]

    def _extend(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        k_buf, v_buf = batch.kv_pool.get_kv(layer.layer_id)
        req_to_token = batch.req_to_token_pool.req_to_token
        out = torch.empty_like(q)
        start = 0
        for row, seq_len, ext_len in zip(
            batch.req_pool_indices_cpu, batch.seq_lens_cpu, batch.extend_seq_lens_cpu
        ):
            prefix_len = seq_len - ext_len
            slots = req_to_token[row, :seq_len]
            keys = k_buf[slots].transpose(0, 1)  # [Hkv, S, D]
            values = v_buf[slots].transpose(0, 1)  # [Hkv, S, D]
            # New token j sits at absolute position prefix_len + j and sees keys 0..prefix_len + j.
            q_pos = torch.arange(prefix_len, seq_len, device=q.device).unsqueeze(1)  # [E, 1]
            k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)  # [1, S]
            hidden = k_pos > q_pos  # [E, S]
            if layer.sliding_window is not None:
                hidden |= k_pos <= q_pos - layer.sliding_window
            qi = q[start : start + ext_len].transpose(0, 1)  # [Hq, E, D]
            out[start : start + ext_len] = _sdpa(qi, keys, values, ~hidden, layer).transpose(0, 1).to(q.dtype)
            start += ext_len
        return out


def _sdpa(
    q: torch.Tensor,  # [..., Hq, E, D]
    k: torch.Tensor,  # [..., Hkv, S, D]
    v: torch.Tensor,  # [..., Hkv, S, D]
    visible: torch.Tensor,  # bool, broadcastable to [..., Hq, E, S]
    layer: Attention,
) -> torch.Tensor:  # [..., Hq, E, D], float32
    return torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=visible, scale=layer.scaling, enable_gqa=True
    )
