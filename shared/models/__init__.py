"""Model implementations (Llama, Mistral, Qwen2, Qwen3, DeepSeek-V2/V3, Gemma 2) and loading of HF
checkpoints."""

from __future__ import annotations

from shared.models.base import CausalLM
from shared.models.config import MLAConfig, ModelConfig, resolve_dtype
from shared.models.loader import load_model
from shared.models.registry import get_model_class, supported_architectures

__all__ = [
    "CausalLM",
    "MLAConfig",
    "ModelConfig",
    "get_model_class",
    "load_model",
    "resolve_dtype",
    "supported_architectures",
]
