"""Architecture name (config.json `architectures[0]`) -> model class.

The table names each class by module and name, imported when a model is built: `tandem up`
checks a checkpoint's architecture before it starts anything, without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.models.base import CausalLM
    from shared.models.config import ModelConfig

MODEL_REGISTRY: dict[str, str] = {
    "DeepseekV2ForCausalLM": "deepseek_v2.DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM": "deepseek_v3.DeepseekV3ForCausalLM",
    "Gemma2ForCausalLM": "gemma2.Gemma2ForCausalLM",
    "LlamaForCausalLM": "llama.LlamaForCausalLM",
    "MistralForCausalLM": "llama.MistralForCausalLM",
    "Qwen2ForCausalLM": "qwen2.Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "qwen3.Qwen3ForCausalLM",
    # Embedding checkpoints: the bare decoder stack, no lm head (shared/models/embedding.py).
    "Gemma2Model": "embedding.Gemma2Embedder",
    "LlamaModel": "embedding.LlamaEmbedder",
    "MistralModel": "embedding.LlamaEmbedder",
    "Qwen2Model": "embedding.Qwen2Embedder",
    "Qwen3Model": "embedding.Qwen3Embedder",
}
# A causal-LM architecture whose checkpoint is stored as the bare stack (Qwen3-Embedding ships
# `Qwen3ForCausalLM` with names lacking `model.` and no lm head) is served as its embedder.
EMBEDDER_OF: dict[str, str] = {
    "Gemma2ForCausalLM": "embedding.Gemma2Embedder",
    "LlamaForCausalLM": "embedding.LlamaEmbedder",
    "MistralForCausalLM": "embedding.LlamaEmbedder",
    "Qwen2ForCausalLM": "embedding.Qwen2Embedder",
    "Qwen3ForCausalLM": "embedding.Qwen3Embedder",
}


def supported_architectures() -> list[str]:
    """Names accepted in config.json's `architectures`."""
    return sorted(MODEL_REGISTRY)


def architecture_problem(arch: str) -> str | None:
    """Why a checkpoint whose config.json lists `arch` first cannot be served, or None."""
    if arch in MODEL_REGISTRY:
        return None
    supported = ", ".join(supported_architectures())
    return f"model architecture {arch or '(none)'!r} is not supported; supported: {supported}"


def get_model_class(config: ModelConfig, bare_stack: bool = False) -> type[CausalLM]:
    """The class implementing `config.architecture`; an unknown one is a `ValueError`.
    `bare_stack`: the checkpoint's weight names lack the `model.` prefix (an embedding layout)."""
    arch = config.architecture
    if bare_stack and arch in EMBEDDER_OF:
        return _load(EMBEDDER_OF[arch])
    if problem := architecture_problem(arch):
        raise ValueError(problem)
    return _load(MODEL_REGISTRY[arch])


def _load(where: str) -> type[CausalLM]:
    module, name = where.rsplit(".", 1)
    cls: type[CausalLM] = getattr(importlib.import_module(f"shared.models.{module}"), name)
    return cls
