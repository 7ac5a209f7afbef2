"""Model implementations (Llama, Mistral, Qwen2, Qwen3) and loading of HF checkpoint directories."""

from __future__ import annotations

from shared.models.base import CausalLM
from shared.models.config import ModelConfig, resolve_dtype
from shared.models.loader import load_model
from shared.models.registry import get_model_class, supported_architectures

__all__ = [
    "CausalLM",
    "ModelConfig",
    "get_model_class",
    "load_model",
    "resolve_dtype",
    "supported_architectures",
]
