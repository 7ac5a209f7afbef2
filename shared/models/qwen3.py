"""Qwen3 (dense): Llama's decoder plus a per-head RMSNorm on q and k before rope.

head_dim comes from the config and need not equal hidden_size / num_heads (Qwen3-0.6B: 1024
hidden, 16 heads, head_dim 128).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from shared.models.config import ModelConfig
from shared.models.layers.norm import RMSNorm
from shared.models.layers.rotary import RotaryEmbedding
from shared.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer_id: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__(config, layer_id, rotary_emb)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = q.shape[0]
        q = self.q_norm(q.reshape(t, self.num_heads, self.head_dim))  # [T, Hq, D], norm over D
        k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim))  # [T, Hkv, D]
        return q.reshape(t, self.q_size), k.reshape(t, self.kv_size)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls: ClassVar[type[LlamaAttention]] = Qwen3Attention


class Qwen3Model(LlamaModel):
    decoder_layer_cls: ClassVar[type[LlamaDecoderLayer]] = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 causal LM (Llama interface and weight names, plus self_attn.q_norm / k_norm)."""

    model_cls: ClassVar[type[LlamaModel]] = Qwen3Model
