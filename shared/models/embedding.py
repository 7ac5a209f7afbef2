"""Decoder embedders: a decoder stack with no lm head, whose final hidden states get pooled.

e5-mistral-7b-instruct (`MistralModel`), Qwen3-Embedding, bge-multilingual-gemma2 (`Gemma2Model`)
and other `LlamaModel`/`Qwen2Model`-shaped checkpoints store the bare stack: weight names without
the `model.` prefix (`embed_tokens.weight`, `layers.0.self_attn.q_proj.weight`, `norm.weight`)
and no `lm_head`. Here the stack keeps our usual `model.` parameter names and loading adds the
prefix. Such a model answers embedding requests only (shared/pooling.py); the engine refuses
generation for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

import torch

from shared.models.base import CausalLM
from shared.models.config import ModelConfig
from shared.models.gemma2 import Gemma2Model
from shared.models.llama import STACKED_PARAMS, LlamaModel
from shared.models.qwen2 import Qwen2Model
from shared.models.qwen3 import Qwen3Model
from shared.models.weights import load_named_weights

if TYPE_CHECKING:
    from shared.batch import ForwardBatch

PREFIX = "model."


class DecoderEmbedder(CausalLM):
    """The `CausalLM` interface without logits: `forward` gives the hidden states to pool."""

    is_embedding: ClassVar[bool] = True
    model_cls: ClassVar[type[LlamaModel | Gemma2Model]] = LlamaModel

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.model = self.model_cls(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """No lm head: only an empty row set (a step where nothing samples) has logits."""
        if hidden.shape[0]:
            raise RuntimeError("an embedding model has no lm head: it cannot sample")
        return hidden.new_empty((0, self.config.vocab_size), dtype=torch.float32)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # A causal-LM layout (`model.` names, an lm_head) loads too: the head is dropped.
        renamed = (
            (name if name.startswith(PREFIX) else PREFIX + name, tensor)
            for name, tensor in weights
            if not name.startswith("lm_head.")
        )
        return load_named_weights(self, renamed, STACKED_PARAMS)


class LlamaEmbedder(DecoderEmbedder):
    """`LlamaModel` / `MistralModel` checkpoints (e5-mistral)."""


class Qwen2Embedder(DecoderEmbedder):
    model_cls: ClassVar[type[LlamaModel]] = Qwen2Model


class Qwen3Embedder(DecoderEmbedder):
    """`Qwen3Model` checkpoints (Qwen3-Embedding)."""

    model_cls: ClassVar[type[LlamaModel]] = Qwen3Model


class Gemma2Embedder(DecoderEmbedder):
    """`Gemma2Model` checkpoints (bge-multilingual-gemma2)."""

    model_cls: ClassVar[type[Gemma2Model]] = Gemma2Model
