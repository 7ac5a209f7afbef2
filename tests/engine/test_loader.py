"""Checkpoint loading: files, errors, dtypes, tied embeddings, and config parsing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.models import ModelConfig, load_model, resolve_dtype, supported_architectures


@pytest.fixture(scope="session")
def checkpoints(tiny_model_factory: Callable[..., Path]) -> dict[str, Path]:
    # Built once per session by tests/conftest.py; tests copy a checkpoint before editing it.
    return {
        "llama": tiny_model_factory("llama"),
        "llama_sharded": tiny_model_factory("llama", shards=3),
        "qwen2": tiny_model_factory("qwen2"),
    }


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_single_and_sharded_load_identically(checkpoints: dict[str, Path]) -> None:
    single, _ = load_model(checkpoints["llama"], torch.float32, "cpu")
    sharded, config = load_model(checkpoints["llama_sharded"], torch.float32, "cpu")
    a, b = single.state_dict(), sharded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    names = set(a)
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.1.mlp.gate_up_proj.weight" in names
    assert not single.training and config.architecture == "LlamaForCausalLM"


def test_weights_are_the_checkpoint_tensors(checkpoints: dict[str, Path]) -> None:
    model, config = load_model(checkpoints["qwen2"], torch.float32, "cpu")
    with safe_open(str(checkpoints["qwen2"] / "model.safetensors"), framework="pt") as f:
        q_bias = f.get_tensor("model.layers.1.self_attn.q_proj.bias")
        v_weight = f.get_tensor("model.layers.1.self_attn.v_proj.weight")
        up = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    attn = model.model.layers[1].self_attn  # type: ignore[index, union-attr]
    q_size, kv_size = (
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
    )
    assert torch.equal(attn.qkv_proj.bias[:q_size], q_bias)
    assert torch.equal(attn.qkv_proj.weight[q_size + kv_size :], v_weight)
    assert attn.o_proj.bias is None
    assert torch.equal(model.model.layers[0].mlp.gate_up_proj.weight[config.intermediate_size :], up)  # type: ignore[index, union-attr]


def test_tied_embeddings_share_the_weight(checkpoints: dict[str, Path]) -> None:
    tied, config = load_model(checkpoints["qwen2"], torch.float32, "cpu")
    assert config.tie_word_embeddings
    assert tied.lm_head.weight is tied.model.embed_tokens.weight  # type: ignore[union-attr]
    untied, _ = load_model(checkpoints["llama"], torch.float32, "cpu")
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight  # type: ignore[union-attr]
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)  # type: ignore[union-attr, arg-type]


def test_load_in_bfloat16(checkpoints: dict[str, Path]) -> None:
    model, config = load_model(checkpoints["llama"], torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # The rotary table stays float32 whatever the weights' dtype.
    assert model.model.layers[0].self_attn.rotary_emb.cos_sin_cache.dtype == torch.float32  # type: ignore[index, union-attr]
    assert torch.get_default_dtype() == torch.float32  # restored after construction
    logits = model.compute_logits(torch.randn(3, config.hidden_size, dtype=torch.bfloat16))
    assert logits.dtype == torch.float32 and logits.shape == (3, config.vocab_size)


def test_unsupported_architecture(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(checkpoints["llama"], tmp_path / "gpt")
    _edit_config(path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as info:
        load_model(path, torch.float32, "cpu")
    for name in supported_architectures():
        assert name in str(info.value)


def test_missing_directory_config_and_weights(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_model(missing, torch.float32, "cpu")

    no_config = _copy(checkpoints["llama"], tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json") as info:
        load_model(no_config, torch.float32, "cpu")
    assert str(no_config) in str(info.value)

    no_weights = _copy(checkpoints["llama"], tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors") as info:
        load_model(no_weights, torch.float32, "cpu")
    assert str(no_weights) in str(info.value)

    no_shard = _copy(checkpoints["llama_sharded"], tmp_path / "no_shard")
    (no_shard / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00003\.safetensors") as info:
        load_model(no_shard, torch.float32, "cpu")
    assert str(no_shard) in str(info.value)


def _rewrite_weights(path: Path, edit: dict[str, torch.Tensor | None]) -> None:
    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    for name, tensor in edit.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_incomplete_or_mismatched_weights(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    missing_k = _copy(checkpoints["llama"], tmp_path / "missing_k")
    _rewrite_weights(missing_k, {"model.layers.1.self_attn.k_proj.weight": None})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        load_model(missing_k, torch.float32, "cpu")

    missing_norm = _copy(checkpoints["llama"], tmp_path / "missing_norm")
    _rewrite_weights(missing_norm, {"model.norm.weight": None})
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        load_model(missing_norm, torch.float32, "cpu")

    extra = _copy(checkpoints["llama"], tmp_path / "extra")
    _rewrite_weights(extra, {"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match=r"o_proj\.bias"):
        load_model(extra, torch.float32, "cpu")

    wrong_shape = _copy(checkpoints["llama"], tmp_path / "wrong_shape")
    _rewrite_weights(wrong_shape, {"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 64)})
    with pytest.raises(ValueError, match="shape mismatch"):
        load_model(wrong_shape, torch.float32, "cpu")

    # Rotary caches some checkpoints carry are ignored.
    with_inv_freq = _copy(checkpoints["llama"], tmp_path / "inv_freq")
    _rewrite_weights(with_inv_freq, {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    load_model(with_inv_freq, torch.float32, "cpu")


def test_tied_checkpoint_with_lm_head_tensor_loads(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(checkpoints["qwen2"], tmp_path / "tied_with_head")
    _rewrite_weights(path, {"lm_head.weight": torch.zeros(512, 64)})
    model, _ = load_model(path, torch.float32, "cpu")
    # The embedding stays the single source of truth.
    assert model.lm_head.weight.abs().sum() > 0  # type: ignore[union-attr, operator]


def _config(**changes: object) -> ModelConfig:
    base: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 512,
    }
    return ModelConfig.from_dict({**base, **changes})


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", _config()) == torch.float32
    assert resolve_dtype("auto", _config(torch_dtype="bfloat16")) == torch.bfloat16
    assert resolve_dtype("auto", _config(dtype="float16")) == torch.float16
    assert resolve_dtype("float32", _config(torch_dtype="bfloat16")) == torch.float32
    assert resolve_dtype("bfloat16", _config()) == torch.bfloat16
    assert resolve_dtype("float16", _config()) == torch.float16
    with pytest.raises(ValueError, match="fp64"):
        resolve_dtype("fp64", _config())
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("auto", _config(torch_dtype="int8"))


def test_model_config_parsing(checkpoints: dict[str, Path]) -> None:
    config = ModelConfig.from_model_path(checkpoints["qwen2"])
    assert (config.num_key_value_heads, config.head_dim, config.vocab_size) == (2, 16, 512)
    assert config.eos_token_ids == {1, 3}  # config.json's eos plus generation_config.json's
    assert config.bos_token_id == 0 and config.rope_theta == 1e6 and config.sliding_window is None
    assert config.hf_config["model_type"] == "qwen2"

    defaults = _config()
    assert (defaults.num_key_value_heads, defaults.head_dim, defaults.rope_scaling) == (4, 16, None)
    assert defaults.rope_theta == 10000.0 and defaults.eos_token_ids == frozenset()
    # transformers 5 layout and the old "type" spelling both normalise to rope_type.
    v5 = _config(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        }
    )
    assert v5.rope_theta == 5e5 and v5.rope_scaling is not None and v5.rope_scaling["rope_type"] == "llama3"
    assert "rope_theta" not in v5.rope_scaling
    old = _config(rope_scaling={"type": "linear", "factor": 2.0})
    assert old.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert _config(rope_parameters={"rope_type": "default", "rope_theta": 1e4}).rope_scaling is None
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig.from_dict(
            {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 8}
        )
