"""Architecture name (config.json `architectures[0]`) -> model class."""

from __future__ import annotations

from shared.models.base import CausalLM
from shared.models.config import ModelConfig
from shared.models.deepseek_v2 import DeepseekV2ForCausalLM
from shared.models.deepseek_v3 import DeepseekV3ForCausalLM
from shared.models.embedding import Gemma2Embedder, LlamaEmbedder, Qwen2Embedder, Qwen3Embedder
from shared.models.gemma2 import Gemma2ForCausalLM
from shared.models.llama import LlamaForCausalLM, MistralForCausalLM
from shared.models.qwen2 import Qwen2ForCausalLM
from shared.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    # Embedding checkpoints: the bare decoder stack, no lm head (shared/models/embedding.py).
    "Gemma2Model": Gemma2Embedder,
    "LlamaModel": LlamaEmbedder,
    "MistralModel": LlamaEmbedder,
    "Qwen2Model": Qwen2Embedder,
    "Qwen3Model": Qwen3Embedder,
}
# A causal-LM architecture whose checkpoint is stored as the bare stack (Qwen3-Embedding ships
# `Qwen3ForCausalLM` with names lacking `model.` and no lm head) is served as its embedder.
EMBEDDER_OF: dict[str, type[CausalLM]] = {
    "Gemma2ForCausalLM": Gemma2Embedder,
    "LlamaForCausalLM": LlamaEmbedder,
    "MistralForCausalLM": LlamaEmbedder,
    "Qwen2ForCausalLM": Qwen2Embedder,
    "Qwen3ForCausalLM": Qwen3Embedder,
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
        return EMBEDDER_OF[arch]
    if problem := architecture_problem(arch):
        raise ValueError(problem)
    return MODEL_REGISTRY[arch]
