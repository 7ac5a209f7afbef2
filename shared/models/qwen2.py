"""Qwen2 / Qwen2.5: Llama's decoder with a bias on the q/k/v projections (none on o_proj)."""

from __future__ import annotations

from typing import ClassVar

from shared.models.config import ModelConfig
from shared.models.layers.rotary import RotaryEmbedding
from shared.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class Qwen2Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer_id: int, rotary_emb: RotaryEmbedding) -> None:
        # Qwen2 fixes the biases in code; its config has no attention_bias key.
        super().__init__(config, layer_id, rotary_emb, qkv_bias=True, o_bias=False)


class Qwen2DecoderLayer(LlamaDecoderLayer):
    attention_cls: ClassVar[type[LlamaAttention]] = Qwen2Attention


class Qwen2Model(LlamaModel):
    decoder_layer_cls: ClassVar[type[LlamaDecoderLayer]] = Qwen2DecoderLayer


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 causal LM (same interface and weight names as Llama, plus q/k/v biases)."""

    model_cls: ClassVar[type[LlamaModel]] = Qwen2Model
