"""Reference attention in plain torch (SDPA with explicit masks): runs on CPU, computes in float32.

It is the numerical oracle for the GPU backends and the default where Triton is unavailable.
Extend batches (ragged prefixes and chunks) loop over requests, which keeps the masking
obvious; decode batches, the steady state, gather every request's keys into one padded tensor
so a step costs a few large ops instead of a few per request. Multi-head latent attention
(`forward_mla_*`) follows the same two shapes over the latent pool.

Per-layer options of `Attention`: a sliding window is part of the mask (keys outside it stay in
the pool, only masked out, so paging, chunked prefill and prefix reuse see nothing different);
logit soft-capping (Gemma 2) forms the scores explicitly instead of calling SDPA, for the layers
that set it only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from shared.attention.base import AttentionBackend, ExpandLatent, register_backend
from shared.batch import ForwardMode
from shared.mem import MHAKVPool, MLAKVPool

if TYPE_CHECKING:
    from shared.attention.layer import Attention
    from shared.attention.mla import MLAAttention
    from shared.batch import ForwardBatch


@register_backend("torch")
class TorchAttentionBackend(AttentionBackend):
    supports_logit_softcap = True

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
        _mha_pool(batch).set_kv(layer.layer_id, batch.out_cache_loc, k, v)
        if self._slots is not None:
            return self._decode(q, layer, batch)
        return self._extend(q, layer, batch)

    def _decode(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        assert self._slots is not None and self._key_pos is not None and self._seq_lens is not None
        k_buf, v_buf = _mha_pool(batch).get_kv(layer.layer_id)
        b, s = self._slots.shape
        flat = self._slots.reshape(-1)
        keys = k_buf.index_select(0, flat).view(b, s, layer.num_kv_heads, layer.head_dim)  # [B, S, Hkv, D]
        values = v_buf.index_select(0, flat).view(b, s, layer.num_kv_heads, layer.head_dim)
        # The query is the last token, at position seq_len - 1.
        hidden = self._key_pos >= self._seq_lens  # [B, S]
        if layer.sliding_window is not None:
            hidden |= self._key_pos <= self._seq_lens - 1 - layer.sliding_window
        out = _sdpa(
            q.unsqueeze(2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            ~hidden[:, None, None, :],
            layer,
            layer.logit_softcap,
        )
        return out.squeeze(2).to(q.dtype)  # [B, Hq, D]

    def _extend(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        k_buf, v_buf = _mha_pool(batch).get_kv(layer.layer_id)
        out = torch.empty_like(q)
        for qi, slots, visible, rows in _per_request(q, batch, layer.sliding_window):
            keys = k_buf[slots].transpose(0, 1)  # [Hkv, S, D]
            values = v_buf[slots].transpose(0, 1)  # [Hkv, S, D]
            res = _sdpa(qi, keys, values, visible, layer, layer.logit_softcap)  # [Hq, E, D]
            out[rows] = res.transpose(0, 1).to(q.dtype)
        return out

    # ---- multi-head latent attention (docstrings in AttentionBackend) ----

    def forward_mla_decode(
        self,
        q_abs: torch.Tensor,  # [B, H, Dk]
        latent: torch.Tensor,  # [B, Dk]
        layer: MLAAttention,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [B, H, Dl]
        buf = self._store_latent(latent, layer, batch)
        if self._slots is None:  # a caller that skipped init_forward_metadata
            self.init_forward_metadata(batch)
        assert self._slots is not None and self._key_pos is not None and self._seq_lens is not None
        b, s = self._slots.shape
        keys = buf.index_select(0, self._slots.reshape(-1)).view(b, 1, s, -1)  # [B, 1, S, Dk]
        visible = self._key_pos < self._seq_lens  # [B, S]
        out = _sdpa(
            q_abs.unsqueeze(2), keys, keys[..., : layer.kv_lora_rank], visible[:, None, None, :], layer
        )
        return out.squeeze(2).to(q_abs.dtype)  # [B, H, Dl]

    def forward_mla_extend_absorbed(
        self,
        q_abs: torch.Tensor,  # [T, H, Dk]
        latent: torch.Tensor,  # [T, Dk]
        layer: MLAAttention,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [T, H, Dl]
        buf = self._store_latent(latent, layer, batch)
        out = q_abs.new_empty(*q_abs.shape[:2], layer.kv_lora_rank)
        for qi, slots, visible, rows in _per_request(q_abs, batch):
            keys = buf[slots].transpose(0, 1)  # [1, S, Dk]: one latent head shared by all
            res = _sdpa(qi, keys, keys[..., : layer.kv_lora_rank], visible, layer)  # [H, E, Dl]
            out[rows] = res.transpose(0, 1).to(out.dtype)
        return out

    def forward_mla_extend_expanded(
        self,
        q: torch.Tensor,  # [T, H, nope + rope]
        latent: torch.Tensor,  # [T, Dk]
        expand: ExpandLatent,
        layer: MLAAttention,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [T, H, v]
        buf = self._store_latent(latent, layer, batch)
        out = q.new_empty(*q.shape[:2], layer.v_head_dim)
        for qi, slots, visible, rows in _per_request(q, batch):
            entries = buf[slots].squeeze(1)  # [S, Dk]
            c, k_rope = entries.split([layer.kv_lora_rank, layer.rope_dim], dim=-1)
            k_nope, values = expand(c.to(q.dtype))  # [S, H, nope], [S, H, v]
            k_rope = k_rope.to(q.dtype).unsqueeze(1).expand(-1, layer.num_heads, -1)  # [S, H, rope]
            keys = torch.cat([k_nope, k_rope], dim=-1).transpose(0, 1)  # [H, S, nope + rope]
            res = _sdpa(qi, keys, values.transpose(0, 1), visible, layer)  # [H, E, v]
            out[rows] = res.transpose(0, 1).to(out.dtype)
        return out

    @staticmethod
    def _store_latent(latent: torch.Tensor, layer: MLAAttention, batch: ForwardBatch) -> torch.Tensor:
        pool = batch.kv_pool
        assert isinstance(pool, MLAKVPool), "MLA layers need an MLAKVPool"
        pool.set_latent(layer.layer_id, batch.out_cache_loc, latent)
        return pool.get_latent(layer.layer_id)  # [slots, 1, Dk]


def _mha_pool(batch: ForwardBatch) -> MHAKVPool:
    assert isinstance(batch.kv_pool, MHAKVPool), "MHA layers need an MHAKVPool"
    return batch.kv_pool


def _per_request(
    q: torch.Tensor, batch: ForwardBatch, sliding_window: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, slice]]:
    """Per request of an extend batch: (its queries [H, E, D], its slots [S], visibility [E, S],
    its rows of q). New token j sits at position prefix_len + j and sees keys up to there (and,
    with a window w, only the last w of them)."""
    req_to_token = batch.req_to_token_pool.req_to_token
    start = 0
    for row, seq_len, ext_len in zip(
        batch.req_pool_indices_cpu, batch.seq_lens_cpu, batch.extend_seq_lens_cpu
    ):
        prefix_len = seq_len - ext_len
        q_pos = torch.arange(prefix_len, seq_len, device=q.device).unsqueeze(1)  # [E, 1]
        k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)  # [1, S]
        visible = k_pos <= q_pos  # [E, S]
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        rows = slice(start, start + ext_len)
        yield q[rows].transpose(0, 1), req_to_token[row, :seq_len], visible, rows
        start += ext_len


def _sdpa(
    q: torch.Tensor,  # [..., Hq, E, D]
    k: torch.Tensor,  # [..., Hkv, S, D]
    v: torch.Tensor,  # [..., Hkv, S, Dv]
    visible: torch.Tensor,  # bool, broadcastable to [..., Hq, E, S]
    layer: Attention | MLAAttention,
    softcap: float | None = None,
) -> torch.Tensor:  # [..., Hq, E, Dv], float32
    """Softmax attention in float32; `softcap` (Gemma 2) bounds the scaled scores to
    softcap * tanh(scores / softcap) before the mask, which SDPA cannot do, so the scores are
    then formed explicitly."""
    if softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=visible, scale=layer.scaling, enable_gqa=True
        )
    group = q.shape[-3] // k.shape[-3]  # query heads per KV head
    k = k.float().repeat_interleave(group, dim=-3)  # [..., Hq, S, D]
    v = v.float().repeat_interleave(group, dim=-3)  # [..., Hq, S, Dv]
    scores = q.float() @ k.transpose(-1, -2) * layer.scaling  # [..., Hq, E, S]
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
