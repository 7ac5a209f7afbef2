"""Llama 2 / 3 / 3.1 and Mistral: the decoder every other dense model here builds on.

Parameter names mirror Hugging Face's except the fused projections: `self_attn.qkv_proj` holds
q_proj/k_proj/v_proj and `mlp.gate_up_proj` holds gate_proj/up_proj (see `STACKED_PARAMS`).
The residual stream is carried beside the hidden states and added inside the next RMSNorm,
which is the same arithmetic as HF's explicit adds.

Sliding-window attention (Mistral 7B v0.1's `sliding_window: 4096`) is applied by the attention
backend; every token's K/V stays in the pool, so prefix caching is unaffected.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from shared.attention.layer import Attention
from shared.models.base import CausalLM
from shared.models.config import ModelConfig
from shared.models.layers.embedding import LMHead, VocabEmbedding
from shared.models.layers.linear import LinearBase, MergedLinear, QKVLinear, RowParallelLinear
from shared.models.layers.norm import RMSNorm
from shared.models.layers.rotary import RotaryEmbedding, get_rope
from shared.models.weights import StackedParams, load_named_weights
from shared.quant.fp8 import Fp8Config

if TYPE_CHECKING:
    from shared.batch import ForwardBatch

# Checkpoint projection -> (fused parameter, shard id).
STACKED_PARAMS: StackedParams = [
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
]


class LlamaAttention(nn.Module):
    """qkv projection -> rope -> paged attention -> output projection.

    `qkv_bias`/`o_bias` default to the config's `attention_bias` (Llama puts it on all four
    projections); subclasses pass their architecture's fixed choice.
    """

    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        rotary_emb: RotaryEmbedding,
        qkv_bias: bool | None = None,
        o_bias: bool | None = None,
    ) -> None:
        super().__init__()
        qkv_bias = config.attention_bias if qkv_bias is None else qkv_bias
        o_bias = config.attention_bias if o_bias is None else o_bias
        self.head_dim = config.head_dim
        self.qkv_proj = QKVLinear(
            config.hidden_size,
            config.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=qkv_bias,
            quant=config.quant,
        )
        # This rank's head counts, as the fused projection laid them out.
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.qkv_proj.q_size
        self.kv_size = self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * config.head_dim, config.hidden_size, bias=o_bias, quant=config.quant
        )
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            scaling=self.head_dim**-0.5,
            layer_id=layer_id,
            sliding_window=config.sliding_window,
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [T, (Hq + 2 * Hkv) * D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.normalize_qk(q, k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, batch)  # [T, Hq * D]
        return self.o_proj(out)  # [T, hidden]

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook before rope; Llama leaves q and k as projected."""
        return q, k


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, bias: bool = False, quant: Fp8Config | None = None
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(
            hidden_size, [intermediate_size, intermediate_size], bias=bias, quant=quant
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, quant=quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        # silu(gate) * up feeds the down projection: one kernel for both at a single token.
        return self.down_proj.forward_silu_mul(self.gate_up_proj(x))


class PreNormDecoderLayer(nn.Module):
    """Pre-norm attention block then pre-norm MLP block, residual carried between them.

    Subclasses build `input_layernorm`, `self_attn(positions, hidden, batch)`,
    `post_attention_layernorm` and `mlp(hidden)`; the dataflow is this class's (Llama's and
    DeepSeek's decoder layers alike).
    """

    input_layernorm: RMSNorm
    post_attention_layernorm: RMSNorm
    self_attn: nn.Module
    mlp: nn.Module

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
        hidden = self.self_attn(positions, hidden, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def process_weights_after_loading(self) -> None:
        """With FP8 linears and `kernels.fp8_quant.FUSE_INTO_PRODUCERS`: the norm before Llama's
        attention quantizes its output for the qkv projection, the one before its MLP for
        gate_up, and the MLP's SiLU-and-mul for down, each in its own launch (three launches
        fewer a layer). Other attention and MLP blocks (MLA, MoE) keep their float inputs, and
        so does a layer with a dataflow of its own (DP attention gathers the MLP's input)."""
        if type(self).forward is not PreNormDecoderLayer.forward:
            return
        norms: list[tuple[RMSNorm, LinearBase]] = []
        if isinstance(self.self_attn, LlamaAttention):
            norms.append((self.input_layernorm, self.self_attn.qkv_proj))
        down = None
        if isinstance(self.mlp, LlamaMLP):
            norms.append((self.post_attention_layernorm, self.mlp.gate_up_proj))
            down = self.mlp.down_proj if self.mlp.down_proj.weight_scale_inv is not None else None
        norms = [(n, lin) for n, lin in norms if lin.weight_scale_inv is not None and type(n) is RMSNorm]
        if not (norms or down) or not _fuse_into_producers():
            return
        for norm, linear in norms:
            assert linear.quant is not None
            norm.fp8_group = linear.quant.weight_block[1]
        if down is not None:
            down.silu_mul_quantizes = True


def _fuse_into_producers() -> bool:
    from kernels.fp8_quant import FUSE_INTO_PRODUCERS  # FP8 models only: imports triton

    return FUSE_INTO_PRODUCERS


class LlamaDecoderLayer(PreNormDecoderLayer):
    """Llama's decoder layer: GQA attention and a SwiGLU MLP."""

    attention_cls: ClassVar[type[LlamaAttention]] = LlamaAttention

    def __init__(self, config: ModelConfig, layer_id: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
        self.self_attn = self.attention_cls(config, layer_id, rotary_emb)
        self.mlp = LlamaMLP(
            config.hidden_size, config.intermediate_size, bias=config.mlp_bias, quant=config.quant
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DecoderStack(nn.Module):
    """Embedding, then the decoder layers with the residual carried between them, then the final
    norm. Subclasses build `embed_tokens`, `layers` (of `PreNormDecoderLayer`s) and `norm`."""

    embed_tokens: VocabEmbedding
    layers: nn.ModuleList
    norm: RMSNorm

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaModel(DecoderStack):
    """Llama's stack; one rotary table shared by all layers."""

    decoder_layer_cls: ClassVar[type[LlamaDecoderLayer]] = LlamaDecoderLayer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        # Shared, not per layer: at 128k positions the table is tens of MB.
        rotary_emb = get_rope(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.layers = nn.ModuleList(
            self.decoder_layer_cls(config, i, rotary_emb) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    """Llama causal LM; the `CausalLM` interface (docstrings there)."""

    model_cls: ClassVar[type[LlamaModel]] = LlamaModel

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.model = self.model_cls(config)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # A tied checkpoint may still ship lm_head.weight; the embedding is the one copy we keep.
        skip = ("lm_head.",) if self.config.tie_word_embeddings else ()
        return load_named_weights(self, weights, STACKED_PARAMS, skip_prefixes=skip)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral 7B and its successors: Llama-shaped (GQA, RoPE, SwiGLU, RMSNorm)."""
