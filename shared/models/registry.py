"""Architecture name (config.json `architectures[0]`) -> model class."""

from __future__ import annotations

from shared.models.base import CausalLM
from shared.models.config import ModelConfig
from shared.models.deepseek_v2 import DeepseekV2ForCausalLM
from shared.models.deepseek_v3 import DeepseekV3ForCausalLM
from shared.models.llama import LlamaForCausalLM, MistralForCausalLM
from shared.models.qwen2 import Qwen2ForCausalLM
from shared.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def supported_architectures() -> list[str]:
    """Names accepted in config.json's `architectures`."""
    return sorted(MODEL_REGISTRY)


def get_model_class(config: ModelConfig) -> type[CausalLM]:
    """The class implementing `config.architecture`; an unknown one is a `ValueError`."""
    arch = config.architecture
    if arch not in MODEL_REGISTRY:
        raise ValueError(
            f"model architecture {arch or '(none)'!r} is not supported; "
            f"supported: {', '.join(supported_architectures())}"
        )
    return MODEL_REGISTRY[arch]
