"""The model's shape and numerics, read once from a Hugging Face checkpoint directory.

`ModelConfig` is what model code and the model runner see; the raw config.json stays available
as `hf_config` for anything architecture-specific. Both rope layouts are accepted: the one real
checkpoints ship with (`rope_theta` + `rope_scaling`) and transformers 5's `rope_parameters`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.quant.fp8 import Fp8Config

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_DTYPE_OPTIONS = ("auto", "bfloat16", "float16", "float32")

# Keys a model type's config.json may leave out, with the value transformers' config class then
# uses (released Gemma 2 checkpoints omit tie_word_embeddings, and their weights are tied).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": {
        "tie_word_embeddings": True,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
}


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention shapes (DeepSeek-V2/V3), read when config.json has kv_lora_rank.

    Per token the KV cache holds one latent vector `[kv_lora_rank + qk_rope_head_dim]`: the
    compressed KV (normed) and the rotated rope key shared by all heads.
    """

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: q is one projection (q_proj), else q_a_proj -> q_b_proj

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one token's cache entry: the latent then the rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of one checkpoint (immutable)."""

    architectures: tuple[str, ...]
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = dataclasses.field(default=None, hash=False)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    torch_dtype: str | None = None  # the checkpoint's dtype name, e.g. "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: frozenset[int] = frozenset()
    # FP8 weights (a FP8 checkpoint, or quantization="fp8" while loading); None: unquantized.
    # Every linear and MoE layer is built with it (`quant=config.quant`).
    quant: Fp8Config | None = None
    # Multi-head latent attention (DeepSeek); None: MHA/GQA with `num_key_value_heads` x `head_dim`.
    mla: MLAConfig | None = None
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=False)

    @property
    def architecture(self) -> str:
        """The first listed architecture: the one the registry dispatches on."""
        return self.architectures[0] if self.architectures else ""

    @classmethod
    def from_model_path(cls, model_path: str | Path) -> ModelConfig:
        """Read config.json (and generation_config.json when present) from a model directory.

        A missing directory or config.json is a `FileNotFoundError` naming the path.
        """
        path = Path(model_path)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory not found: {path}")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"config.json not found in model directory {path}")
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
        gen_file = path / "generation_config.json"
        gen_config = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.is_file() else None
        return cls.from_dict(hf_config, gen_config)

    @classmethod
    def from_dict(
        cls, hf_config: dict[str, Any], generation_config: dict[str, Any] | None = None
    ) -> ModelConfig:
        """Build from a parsed config.json (and optional generation_config.json) dict."""
        c = {**_HF_DEFAULTS.get(str(hf_config.get("model_type")), {}), **hf_config}
        try:
            hidden_size = int(c["hidden_size"])
            num_heads = int(c["num_attention_heads"])
            rope_theta, rope_scaling = _rope(c)
            return cls(
                architectures=tuple(c.get("architectures") or ()),
                model_type=str(c.get("model_type", "")),
                hidden_size=hidden_size,
                num_hidden_layers=int(c["num_hidden_layers"]),
                num_attention_heads=num_heads,
                num_key_value_heads=int(c.get("num_key_value_heads") or num_heads),
                head_dim=int(c.get("head_dim") or hidden_size // num_heads),
                intermediate_size=int(c["intermediate_size"]),
                vocab_size=int(c["vocab_size"]),
                rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                attention_bias=bool(c.get("attention_bias", False)),
                mlp_bias=bool(c.get("mlp_bias", False)),
                hidden_act=str(c.get("hidden_act", "silu")),
                sliding_window=_sliding_window(c),
                torch_dtype=c.get("torch_dtype") or c.get("dtype"),
                bos_token_id=c.get("bos_token_id"),
                eos_token_ids=frozenset(
                    _ids(c.get("eos_token_id")) | _ids((generation_config or {}).get("eos_token_id"))
                ),
                mla=_mla(c),
                hf_config=dict(c),
            )
        except KeyError as e:
            raise ValueError(f"config.json is missing required key {e.args[0]!r}") from None


def resolve_dtype(option: str, config: ModelConfig) -> torch.dtype:
    """Weight/activation dtype for an engine `dtype` option.

    "auto" takes the checkpoint's `torch_dtype` (float32 when absent) unchanged, also on CPU;
    "bfloat16", "float16", "float32" force that dtype. Anything else is a `ValueError`.
    """
    if option not in _DTYPE_OPTIONS:
        raise ValueError(f"unknown dtype option {option!r}; choose one of {', '.join(_DTYPE_OPTIONS)}")
    name = option if option != "auto" else (config.torch_dtype or "float32")
    name = name.removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"checkpoint dtype {name!r} is not supported; pass an explicit dtype option")
    return _DTYPES[name]


def _rope(c: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = c.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is not None:
        scaling = dict(scaling)
        # Older checkpoints spell the key "type".
        rope_type = scaling.pop("type", None)
        scaling.setdefault("rope_type", rope_type or "default")
        scaling.pop("rope_theta", None)
        if scaling["rope_type"] == "default":
            scaling = None
    return float(theta), scaling


def _mla(c: dict[str, Any]) -> MLAConfig | None:
    if c.get("kv_lora_rank") is None:
        return None
    q_lora_rank = c.get("q_lora_rank")
    return MLAConfig(
        kv_lora_rank=int(c["kv_lora_rank"]),
        qk_nope_head_dim=int(c["qk_nope_head_dim"]),
        qk_rope_head_dim=int(c["qk_rope_head_dim"]),
        v_head_dim=int(c["v_head_dim"]),
        q_lora_rank=int(q_lora_rank) if q_lora_rank is not None else None,
    )


def _sliding_window(c: dict[str, Any]) -> int | None:
    # Qwen2/Qwen3 carry a window size but only use it when use_sliding_window is true, and then
    # only on layers past max_window_layers: not implemented, so refuse it loudly.
    if "use_sliding_window" in c:
        if c["use_sliding_window"]:
            raise ValueError(f"{c.get('model_type')} with use_sliding_window=true is not supported")
        return None
    window = c.get("sliding_window")
    return int(window) if window else None


def _ids(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}
