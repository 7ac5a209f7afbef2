"""Write a tiny, deterministic Hugging Face checkpoint directory for one supported architecture.

The weights come from the real transformers model class built from the config, re-initialised
from a seeded generator and written with `save_pretrained`, so HF loads exactly what we wrote
and can serve as the numerical oracle for our own model code. config.json is then rewritten in
the layout real checkpoints ship with (`rope_theta`, `rope_scaling`, `torch_dtype`), which both
HF and our loader must read.

Initialisation is wider than HF's default (std 0.15 instead of 0.02) so that logits are spread
out and greedy decoding has clear argmax margins: token-level comparisons between engines are
then stable against float rounding. The same width spreads MoE router logits (std ~1.2 over 8
experts), so expert choices are rarely near a tie either; DeepSeek-V3's routing bias
(`e_score_correction_bias`, a buffer) is drawn too, large enough to change choices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.tiny_model.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    IM_END_TOKEN,
    MODEL_MAX_LENGTH,
    build_tokenizer,
    special_token_ids,
    tokenizer_vocab_size,
)

ARCHS: tuple[str, ...] = (
    "llama",
    "llama3",
    "qwen2",
    "qwen3",
    "mistral",
    "deepseek_v2",
    "deepseek_v3",
    "gemma2",
)

_WEIGHT_STD = 0.15
_NORM_NOISE = 0.1
_BIAS_STD = 0.1

# Keys every override may touch besides the ones already in an architecture's base config.
_EXTRA_KEYS = {"head_dim", "sliding_window", "rope_scaling", "layer_types", "tie_word_embeddings"}


def make_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny `arch` checkpoint (config, generation config, weights, tokenizer) to `out_dir`.

    `overrides` are HF config keys (`hidden_size`, `num_hidden_layers`, `num_attention_heads`,
    `num_key_value_heads`, `head_dim`, `intermediate_size`, `max_position_embeddings`,
    `rope_theta`, `rope_scaling`, `tie_word_embeddings`, ...) plus two of our own:
    `vocab_size` (tokenizer size to train; the model's vocab equals the trained tokenizer's size),
    `shards` (split the weights into that many safetensors files with an index) and `embedding`
    (True: store it as an embedding checkpoint does: architectures `LlamaModel` etc., weight names
    without `model.`, no lm head).
    The same arguments always produce byte-identical files. Returns `out_dir`.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides)
    shards = int(overrides.pop("shards", 1))
    embedding = bool(overrides.pop("embedding", False))
    build_tokenizer(out_dir, int(overrides.pop("vocab_size", 512)))
    ids = special_token_ids(out_dir)

    config = _base_config(arch, tokenizer_vocab_size(out_dir), ids)
    unknown = set(overrides) - set(config) - _EXTRA_KEYS
    if unknown:
        raise ValueError(f"unknown config overrides for {arch}: {sorted(unknown)}")
    config.update(overrides)
    if arch == "qwen3" and "head_dim" not in overrides:
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]

    _remove_old_weights(out_dir)
    _write_json(out_dir / "config.json", config)
    model = _build_hf_model(out_dir, seed)
    _save_quietly(model, out_dir)
    # save_pretrained rewrites both configs in its own layout; put back the checkpoint layout.
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", _generation_config(arch, ids))
    if embedding:
        _to_embedding_layout(out_dir, config)
    if shards > 1:
        _reshard(out_dir, shards)
    return out_dir


def _base_config(arch: str, vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    bos, eos = ids[BOS_TOKEN], ids[EOS_TOKEN]
    common: dict[str, Any] = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": vocab_size,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
        "use_cache": True,
        "attention_dropout": 0.0,
    }
    if arch in ("llama", "llama3"):
        rope_scaling = None
        eos_ids: int | list[int] = eos
        if arch == "llama3":
            # original_max_position_embeddings is small so positions past it (and the
            # low/high-frequency split at head_dim 16) are exercised by short prompts.
            rope_scaling = {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            }
            # Llama 3 instruct lists several stop ids in config.json.
            eos_ids = [eos, ids[IM_END_TOKEN]]
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **common,
            "eos_token_id": eos_ids,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0 if arch == "llama3" else 10000.0,
            "rope_scaling": rope_scaling,
            "attention_bias": False,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "tie_word_embeddings": False,
        }
    if arch == "mistral":
        return {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            **common,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
        }
    if arch == "qwen2":
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            **common,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": common["num_hidden_layers"],
            "tie_word_embeddings": True,
        }
    if arch.startswith("deepseek"):
        return _deepseek_config(arch, common)
    if arch == "gemma2":
        return _gemma2_config(common)
    assert arch == "qwen3", arch
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **common,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": common["num_hidden_layers"],
        "tie_word_embeddings": True,
    }


def _deepseek_config(arch: str, common: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V2-Lite / V3 layouts at tiny sizes: 3 layers (the first dense, two MoE), MLA with
    a 32-wide latent, 8 routed experts (2 per token) in 4 groups, one shared expert, and YaRN
    rope whose original context (64) the test prompts cross."""
    config: dict[str, Any] = {
        **common,
        "num_hidden_layers": 3,
        "num_key_value_heads": common["num_attention_heads"],
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "moe_intermediate_size": 32,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_group": 4,
        "topk_group": 2,
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "tie_word_embeddings": False,
    }
    yarn = {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32,
        "beta_slow": 1,
    }
    if arch == "deepseek_v2":
        return {
            "architectures": ["DeepseekV2ForCausalLM"],
            "model_type": "deepseek_v2",
            **config,
            "q_lora_rank": None,
            # V2-Lite's mscale pair (equal, so only the softmax scale changes).
            "rope_scaling": {**yarn, "mscale": 0.707, "mscale_all_dim": 0.707},
            "topk_method": "group_limited_greedy",
            "scoring_func": "softmax",
            "norm_topk_prob": False,
            "routed_scaling_factor": 2.0,
        }
    assert arch == "deepseek_v3", arch
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        **config,
        "q_lora_rank": 24,
        # Unequal mscales (V3 ships 1.0 / 1.0) so the cos/sin attention factor is not 1 either.
        "rope_scaling": {**yarn, "mscale": 1.0, "mscale_all_dim": 0.8},
        "rope_interleave": True,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "num_nextn_predict_layers": 1,
    }


def _gemma2_config(common: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2's layout (the keys google/gemma-2-9b's config.json has: no tie_word_embeddings,
    tied all the same; no layer_types, so even layers slide). Sizes differ from the real ones
    where that tests something: head_dim 32 != hidden / heads, query_pre_attn_scalar (24) !=
    head_dim, a window of 8 that the test prompts cross, and caps small enough to bend random
    weights' scores (attention 5.0) and logits (3.0)."""
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        **common,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "head_dim": 32,
        "query_pre_attn_scalar": 24,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "sliding_window": 8,
        "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 3.0,
        "pad_token_id": 4,
        "cache_implementation": "hybrid",
    }


def _generation_config(arch: str, ids: dict[str, int]) -> dict[str, Any]:
    eos: int | list[int] = ids[EOS_TOKEN]
    if arch in ("llama3", "qwen2", "qwen3"):
        # Chat models stop on the end-of-turn token too, as their real generation configs say.
        eos = [ids[EOS_TOKEN], ids[IM_END_TOKEN]]
    return {"bos_token_id": ids[BOS_TOKEN], "eos_token_id": eos}


def _build_hf_model(out_dir: Path, seed: int) -> torch.nn.Module:
    # Imported here: transformers is slow to import and only the maker needs it.
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    hf_config = AutoConfig.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Sorted names keep the draw order independent of module registration order.
        for name, param in sorted(model.named_parameters()):
            param.copy_(_init_value(name, param.shape, generator))
        for name, buf in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's routing bias: saved
                buf.copy_(_BIAS_STD * torch.randn(buf.shape, generator=generator, dtype=torch.float32))
    return model


def _save_quietly(model: torch.nn.Module, out_dir: Path) -> None:
    from transformers.utils import logging as hf_logging

    # A progress bar per tiny save only clutters test and CLI output.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir, safe_serialization=True)  # type: ignore[operator]
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _init_value(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if name.endswith("norm.weight"):
        return 1.0 + _NORM_NOISE * noise
    if name.endswith(".bias"):
        return _BIAS_STD * noise
    return _WEIGHT_STD * noise


def _to_embedding_layout(out_dir: Path, config: dict[str, Any]) -> None:
    """Rewrite a causal-LM checkpoint as its bare decoder stack (e5-mistral's layout)."""
    single = out_dir / "model.safetensors"
    with safe_open(str(single), framework="pt") as f:
        tensors = {
            name.removeprefix("model."): f.get_tensor(name)
            for name in sorted(f.keys())
            if not name.startswith("lm_head.")
        }
    save_file(tensors, str(single), metadata={"format": "pt"})
    config["architectures"] = [config["architectures"][0].replace("ForCausalLM", "Model")]
    _write_json(out_dir / "config.json", config)


def _remove_old_weights(out_dir: Path) -> None:
    # A previous build into the same directory may have used a different shard count.
    for path in out_dir.glob("model*.safetensors"):
        path.unlink()
    index = out_dir / "model.safetensors.index.json"
    if index.exists():
        index.unlink()


def _reshard(out_dir: Path, shards: int) -> None:
    single = out_dir / "model.safetensors"
    with safe_open(str(single), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in sorted(f.keys())}
    if shards > len(tensors):
        raise ValueError(f"cannot split {len(tensors)} tensors into {shards} shards")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    names = list(tensors)
    weight_map: dict[str, str] = {}
    start = 0
    for i in range(shards):
        # Contiguous groups of roughly total/shards bytes; every shard gets at least one tensor.
        end, size = start, 0
        remaining_shards = shards - i - 1
        while end < len(names) - remaining_shards and (end == start or size < total / shards):
            size += tensors[names[end]].numel() * tensors[names[end]].element_size()
            end += 1
        if i == shards - 1:
            end = len(names)
        file_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        group = {n: tensors[n].contiguous() for n in names[start:end]}
        save_file(group, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file_name))
        start = end
    single.unlink()
    _write_json(
        out_dir / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
