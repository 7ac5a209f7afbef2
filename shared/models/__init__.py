"""Model implementations (Llama, Mistral, Qwen2, Qwen3, DeepSeek-V2/V3, Gemma 2) and loading of HF
checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.lazy import lazy_attributes
from shared.models.registry import get_model_class, supported_architectures

if TYPE_CHECKING:
    from shared.models.base import CausalLM
    from shared.models.config import MLAConfig, ModelConfig, resolve_dtype
    from shared.models.loader import load_model

__all__ = [
    "CausalLM",
    "MLAConfig",
    "ModelConfig",
    "get_model_class",
    "load_model",
    "resolve_dtype",
    "supported_architectures",
]

# They import torch: `tandem up` reads the registry before it starts anything.
__getattr__ = lazy_attributes(
    __name__,
    {
        "CausalLM": "base",
        "MLAConfig": "config",
        "ModelConfig": "config",
        "resolve_dtype": "config",
        "load_model": "loader",
    },
)
