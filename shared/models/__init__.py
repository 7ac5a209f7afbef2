"""Model implementations (Llama, Mistral, Qwen2, Qwen3, DeepSeek-V2/V3, Gemma 2) and loading of HF
checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

_LAZY = {
    "CausalLM": "base",
    "MLAConfig": "config",
    "ModelConfig": "config",
    "resolve_dtype": "config",
    "load_model": "loader",
}


def __getattr__(name: str) -> Any:
    # Lazy (they import torch): `tandem up` reads the registry before it starts anything.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"shared.models.{_LAZY[name]}"), name)
    raise AttributeError(name)
