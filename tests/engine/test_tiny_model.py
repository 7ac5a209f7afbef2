"""The tiny-model maker: deterministic files, a working tokenizer and chat template, a CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from shared.tiny_model import ARCHS, build_tokenizer, make_tiny_model
from shared.tiny_model.tokenizer import SPECIAL_TOKENS

REPO_ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "héllo wörld 你好 🙂",
    "The quick brown fox jumps over the lazy dog.",
    '{"key": [1, 2.5, null], "ok": true}',
    "def f(x):\n\treturn x ** 2  # square\n",
    "  leading spaces, trailing  ",
    "日本語 ✅ Ünïcödé — “quotes” ❤️",
    "",
]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_tokenizer_is_deterministic(tmp_path: Path, tokenizer_dir: Path) -> None:
    build_tokenizer(tmp_path)
    assert _files(tmp_path) == _files(tokenizer_dir)


def test_tokenizer_loads_with_special_tokens(tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) == 512
    assert [tok.bos_token, tok.eos_token, tok.pad_token] == [*SPECIAL_TOKENS[0:2], SPECIAL_TOKENS[4]]
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    # Encoding prepends BOS like Llama 3; each special token is one id.
    assert tok.encode("hi")[0] == tok.bos_token_id
    assert tok.encode("<|im_start|>user", add_special_tokens=False)[0] == 2


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_text(tokenizer_dir: Path, text: str) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_vocab_size_option(tmp_path: Path) -> None:
    build_tokenizer(tmp_path, vocab_size=1000)
    assert len(AutoTokenizer.from_pretrained(tmp_path)) == 1000
    with pytest.raises(ValueError, match="at least"):
        build_tokenizer(tmp_path, vocab_size=100)


def test_chat_template_renders(tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 🙂"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 🙂<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert isinstance(no_prompt, str) and no_prompt.endswith("Hi 🙂<|im_end|>\n")
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    # transformers 5 returns a BatchEncoding, 4.x a list of ids.
    encoded: Any = tok.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=True)
    ids: list[int] = list(encoded if isinstance(encoded, list) else encoded["input_ids"])
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids) == prompt


def test_model_is_deterministic(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", "qwen2", seed=3)
    b = make_tiny_model(tmp_path / "b", "qwen2", seed=3)
    c = make_tiny_model(tmp_path / "c", "qwen2", seed=4)
    assert _files(a) == _files(b)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.parametrize("arch", ARCHS)
def test_model_files_per_arch(tmp_path: Path, arch: str) -> None:
    out = make_tiny_model(tmp_path, arch)
    config = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    expected_arch = {
        "llama": "Llama",
        "llama3": "Llama",
        "mistral": "Mistral",
        "qwen2": "Qwen2",
        "qwen3": "Qwen3",
        "deepseek_v2": "DeepseekV2",
        "deepseek_v3": "DeepseekV3",
        "gemma2": "Gemma2",
    }
    assert config["architectures"] == [f"{expected_arch[arch]}ForCausalLM"]
    assert config["vocab_size"] == len(AutoTokenizer.from_pretrained(out)) == 512
    assert config["torch_dtype"] == "float32" and config["bos_token_id"] == 0
    assert 1 in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    tied = arch.startswith("qwen") or arch == "gemma2"
    assert config.get("tie_word_embeddings", True) == tied  # Gemma 2's config omits it: tied
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert ("lm_head.weight" in names) != tied
    # transformers picks the tokenizer class by model type (Qwen2Tokenizer for qwen2); every
    # class must produce the ids of the plain tokenizer.json.
    tok, raw = AutoTokenizer.from_pretrained(out), Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS:
        assert tok.encode(text) == raw.encode(text).ids
    if arch == "llama3":
        assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_theta"] == 500000.0
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in names
    if arch == "qwen3":
        assert config["head_dim"] == 16 and "model.layers.1.self_attn.k_norm.weight" in names
    if arch == "mistral":
        assert config["sliding_window"] is None
    if arch == "gemma2":
        assert "tie_word_embeddings" not in config and "layer_types" not in config
        assert config["sliding_window"] == 8 and config["attn_logit_softcapping"] == 5.0
        assert "model.layers.1.post_feedforward_layernorm.weight" in names
    if arch.startswith("deepseek"):
        # The layout DeepSeek's checkpoints ship: legacy rope_scaling, one tensor per expert.
        assert config["rope_scaling"]["type"] == "yarn" and config["kv_lora_rank"] == 32
        assert "model.layers.0.mlp.gate_up_proj.weight" not in names
        assert "model.layers.0.mlp.gate_proj.weight" in names  # first_k_dense_replace = 1
        assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
        assert "model.layers.2.mlp.shared_experts.up_proj.weight" in names
        assert ("model.layers.1.self_attn.q_proj.weight" in names) == (arch == "deepseek_v2")
        bias = "model.layers.1.mlp.gate.e_score_correction_bias"
        assert (bias in names) == (arch == "deepseek_v3")
        if bias in names:
            with safe_open(str(out / "model.safetensors"), framework="pt") as f:
                assert f.get_tensor(bias).abs().min() > 0  # drawn, so the routing bias matters


def test_sharded_model_holds_the_same_tensors(tmp_path: Path) -> None:
    single = make_tiny_model(tmp_path / "single", "llama")
    sharded = make_tiny_model(tmp_path / "sharded", "llama", shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert shard_files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (sharded / "model.safetensors").exists()
    with safe_open(str(single / "model.safetensors"), framework="pt") as f:
        reference = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    seen = {}
    for name in shard_files:
        with safe_open(str(sharded / name), framework="pt") as f:
            seen.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    assert seen.keys() == reference.keys() == index["weight_map"].keys()
    assert all((seen[k] == reference[k]).all() for k in reference)
    # Rebuilding unsharded into the same directory leaves no stale shards behind.
    make_tiny_model(sharded, "llama")
    assert sorted(p.name for p in sharded.glob("model*")) == ["model.safetensors"]


def test_overrides_and_errors(tmp_path: Path) -> None:
    out = make_tiny_model(tmp_path, "qwen3", hidden_size=32, num_hidden_layers=1, head_dim=32)
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (32, 1, 32)
    with pytest.raises(ValueError, match="unknown arch"):
        make_tiny_model(tmp_path, "gpt2")
    with pytest.raises(ValueError, match="hidden_sise"):
        make_tiny_model(tmp_path, "llama", hidden_sise=8)


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "shared.tiny_model", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_help() -> None:
    result = _run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "--arch" in result.stdout and "--hidden-size" in result.stdout


def test_cli_builds_a_model(tmp_path: Path) -> None:
    result = _run_cli(
        "--arch", "mistral", "--out", str(tmp_path), "--layers", "1", "--shards", "2", "--seed", "7"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["model_type"] == "mistral"
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert (tmp_path / "tokenizer.json").is_file()
    bad = _run_cli("--arch", "nope", "--out", str(tmp_path))
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
