"""Gemma 2: Llama's attention and rope with Gemma's own numerics around them.

What differs from Llama (HF's `modeling_gemma2.py` is the reference):
- the embedding is scaled by sqrt(hidden_size) and tied to the lm head;
- RMSNorm is `(1 + weight) * x / rms(x)` in float32 (`GemmaRMSNorm`), four per layer: before and
  after attention, before and after the MLP, each "after" norm applied to the block's output
  before it joins the residual stream;
- the MLP is gelu-tanh gated (`hidden_activation: gelu_pytorch_tanh`);
- attention scores are scaled by `query_pre_attn_scalar ** -0.5`, not head_dim's, and soft-capped
  to `attn_logit_softcapping * tanh(s / attn_logit_softcapping)` before the mask and softmax;
- layers alternate sliding-window (`sliding_window`, 4096) and full attention: `layer_types` in
  newer configs, otherwise even layers slide (the rule of the released checkpoints);
- logits are soft-capped with `final_logit_softcapping`, here in `compute_logits`.

The window is a mask in the attention backend: every token's K/V stays in the pool (no memory
saving on the sliding layers), so paging, chunked prefill and the radix cache are unchanged.
Only the torch attention backend implements the soft-capping; the model runner refuses the
others at start-up (`AttentionBackend.check_supports`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shared.attention.layer import Attention
from shared.models.base import CausalLM
from shared.models.config import ModelConfig
from shared.models.layers.activation import gelu_tanh_and_mul
from shared.models.layers.embedding import LMHead, ScaledVocabEmbedding
from shared.models.layers.norm import GemmaRMSNorm
from shared.models.layers.rotary import RotaryEmbedding, get_rope
from shared.models.llama import STACKED_PARAMS, DecoderStack, LlamaAttention, LlamaMLP
from shared.models.weights import load_named_weights

if TYPE_CHECKING:
    from shared.batch import ForwardBatch

_ACTIVATIONS = ("gelu_pytorch_tanh",)


def layer_is_sliding(hf_config: dict[str, Any], layer_id: int) -> bool:
    """Whether decoder layer `layer_id` attends through the sliding window."""
    layer_types = hf_config.get("layer_types")
    if layer_types is not None:
        return bool(layer_types[layer_id] == "sliding_attention")
    return layer_id % 2 == 0


class Gemma2Attention(LlamaAttention):
    """Llama's qkv -> rope -> attention -> o, with Gemma 2's scaling, window and soft-cap."""

    def __init__(self, config: ModelConfig, layer_id: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__(config, layer_id, rotary_emb)
        c = config.hf_config
        softcap = c.get("attn_logit_softcapping")
        # Replaces the Llama-configured layer (it holds no parameters).
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            scaling=float(c["query_pre_attn_scalar"]) ** -0.5,
            layer_id=layer_id,
            sliding_window=config.sliding_window if layer_is_sliding(c, layer_id) else None,
            logit_softcap=float(softcap) if softcap is not None else None,
        )


class Gemma2MLP(LlamaMLP):
    """down(gelu_tanh(gate(x)) * up(x)); gate and up fused into one matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        return self.down_proj(gelu_tanh_and_mul(self.gate_up_proj(x)))


class Gemma2DecoderLayer(nn.Module):
    """Sandwich norms: each block's input and output are normed, the output before the residual
    add. Residual carried as in `PreNormDecoderLayer`: the stream is `hidden + residual`."""

    def __init__(self, config: ModelConfig, layer_id: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        act = config.hf_config["hidden_activation"]
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_activation {act!r} is not supported (only gelu_pytorch_tanh)")
        self.self_attn = Gemma2Attention(config, layer_id, rotary_emb)
        self.mlp = Gemma2MLP(config.hidden_size, config.intermediate_size, quant=config.quant)
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps=eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps=eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps=eps)

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        hidden: torch.Tensor,  # [T, hidden]
        residual: torch.Tensor | None,  # [T, hidden]; None before the first layer
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, batch))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2Model(DecoderStack):
    """Gemma 2's stack: scaled embedding, sandwich-norm layers, one shared rotary table."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.hf_config.get("use_bidirectional_attention"):
            raise ValueError("Gemma 2 with use_bidirectional_attention=true is not supported")
        self.embed_tokens = ScaledVocabEmbedding(config.vocab_size, config.hidden_size)
        rotary_emb = get_rope(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.layers = nn.ModuleList(
            Gemma2DecoderLayer(config, i, rotary_emb) for i in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class Gemma2ForCausalLM(CausalLM):
    """Gemma 2 causal LM; the `CausalLM` interface (docstrings there), HF parameter names except
    Llama's fused `qkv_proj` / `gate_up_proj`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.model = Gemma2Model(config)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)
        cap = config.hf_config.get("final_logit_softcapping")
        self.final_logit_softcap = float(cap) if cap is not None else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)  # [N, vocab] float32
        if self.final_logit_softcap is None:
            return logits
        cap = self.final_logit_softcap
        return torch.tanh(logits / cap) * cap

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ("lm_head.",) if self.config.tie_word_embeddings else ()
        return load_named_weights(self, weights, STACKED_PARAMS, skip_prefixes=skip)
