"""The attention layer models call; the configured backend does the work."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from shared.batch import ForwardBatch


class Attention(nn.Module):
    """Paged multi-head / grouped-query attention for one decoder layer (no parameters)."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scaling: float,
        layer_id: int,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.layer_id = layer_id
        # A query at position i sees keys j with i - sliding_window < j <= i (Mistral's rule).
        self.sliding_window = sliding_window
        # Scores become cap * tanh(scores / cap) before the mask and softmax (Gemma 2); not every
        # backend implements it (`AttentionBackend.supports_logit_softcap`).
        self.logit_softcap = logit_softcap

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq * D]
        k: torch.Tensor,  # [T, Hkv * D]
        v: torch.Tensor,  # [T, Hkv * D]
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [T, Hq * D]
        t = q.shape[0]
        out = batch.attn_backend.forward(
            q.view(t, self.num_heads, self.head_dim),
            k.view(t, self.num_kv_heads, self.head_dim),
            v.view(t, self.num_kv_heads, self.head_dim),
            self,
            batch,
        )
        return out.reshape(t, self.num_heads * self.head_dim)
