"""Our model implementations against HF transformers on the same tiny checkpoints."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from shared.attention.base import create_backend
from shared.attention.testing import single_sequence_batch
from shared.batch import ForwardBatch, ForwardMode
from shared.mem import MHAKVPool, ReqToTokenPool
from shared.models import ModelConfig, load_model
from shared.models.base import CausalLM
from shared.models.layers.linear import MergedLinear, QKVLinear
from shared.models.layers.rotary import get_rope
from shared.models.registry import get_model_class
from shared.models.weights import get_weight_loader
from tests.engine.hf_reference import load_hf

# name -> (arch, overrides). qwen3_wide has head_dim != hidden / heads, as real Qwen3 models do;
# gemma2 (window 8, shorter than PROMPT) slides on layer 0, gemma2_layer_types on layer 1.
MODELS = {
    "llama": ("llama", {}),
    "llama3": ("llama3", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "qwen3_wide": ("qwen3", {"head_dim": 32}),
    "gemma2": ("gemma2", {}),
    "gemma2_layer_types": ("gemma2", {"layer_types": ("full_attention", "sliding_attention")}),
}
PROMPT = torch.tensor(
    [0, 17, 250, 33, 101, 7, 480, 12, 12, 99, 300, 5, 64, 128, 2, 3, 77, 415, 256, 1, 9, 42]
)


@pytest.fixture(scope="session")
def model_dirs(tiny_model_factory: Callable[..., Path]) -> dict[str, Path]:
    return {name: tiny_model_factory(arch, **kw) for name, (arch, kw) in MODELS.items()}


def _positions(name: str) -> torch.Tensor:
    t = PROMPT.shape[0]
    # llama3 starts past original_max_position_embeddings (128) so the scaled low frequencies
    # rotate far from where plain RoPE would put them.
    start = 300 if name == "llama3" else 0
    return torch.arange(start, start + t)


def _our_logits(model: CausalLM, config: ModelConfig, positions: torch.Tensor) -> torch.Tensor:
    batch = single_sequence_batch(PROMPT, config)
    with torch.inference_mode():
        return model.compute_logits(model(PROMPT, positions, batch))  # [T, V]


def _hf_logits(path: Path, positions: torch.Tensor) -> torch.Tensor:
    hf = load_hf(path)
    with torch.inference_mode():
        return hf(PROMPT[None], position_ids=positions[None]).logits[0].float()  # [T, V]


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_hf(model_dirs: dict[str, Path], name: str) -> None:
    model, config = load_model(model_dirs[name], torch.float32, "cpu")
    positions = _positions(name)
    ours = _our_logits(model, config, positions)
    ref = _hf_logits(model_dirs[name], positions)
    assert ours.dtype == torch.float32 and ours.shape == (PROMPT.shape[0], config.vocab_size)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_llama3_inv_freq_matches_hf_and_scaling_matters(model_dirs: dict[str, Path]) -> None:
    path = model_dirs["llama3"]
    model, config = load_model(path, torch.float32, "cpu")
    assert config.rope_scaling is not None and config.rope_scaling["rope_type"] == "llama3"
    hf = load_hf(path)
    ours = get_rope(config.head_dim, 8, config.rope_theta, config.rope_scaling)
    plain = get_rope(config.head_dim, 8, config.rope_theta, None)
    hf_inv_freq = hf.get_buffer("model.rotary_emb.inv_freq")  # [D/2]
    # cos_sin_cache row 1 holds cos(inv_freq) | sin(inv_freq).
    assert torch.equal(ours.cos_sin_cache[1, : config.head_dim // 2], hf_inv_freq.cos())
    assert not torch.equal(plain.cos_sin_cache[1], ours.cos_sin_cache[1])

    # The same weights without the scaling give visibly different logits.
    unscaled = dataclasses.replace(config, rope_scaling=None)
    plain_model = get_model_class(unscaled)(unscaled)
    plain_model.load_state_dict(model.state_dict())
    positions = _positions("llama3")
    diff = (_our_logits(plain_model, unscaled, positions) - _our_logits(model, config, positions)).abs().max()
    assert diff > 1e-2


def _batch(
    model_config: ModelConfig,
    req_pool: ReqToTokenPool,
    kv_pool: MHAKVPool,
    rows: list[int],
    prefix_lens: list[int],
    seq_lens: list[int],
    tokens: list[torch.Tensor],
) -> ForwardBatch:
    """Extend each request `rows[i]` from `prefix_lens[i]` to `seq_lens[i]` with `tokens[i]`."""
    # Slot of token j of request r is r * 64 + j: each request owns a private slot range.
    out_cache_loc = torch.cat(
        [torch.arange(r * 64 + p, r * 64 + s) for r, p, s in zip(rows, prefix_lens, seq_lens)]
    )
    for r, s in zip(rows, seq_lens):
        req_pool.req_to_token[r, :s] = torch.arange(r * 64, r * 64 + s)
    positions = torch.cat([torch.arange(p, s) for p, s in zip(prefix_lens, seq_lens)])
    ext = [s - p for p, s in zip(prefix_lens, seq_lens)]
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int64)
    ends = torch.cumsum(as_tensor(ext), 0)
    return ForwardBatch(
        mode=ForwardMode.DECODE if all(e == 1 for e in ext) else ForwardMode.EXTEND,
        input_ids=torch.cat(tokens),
        positions=positions,
        out_cache_loc=out_cache_loc,
        req_pool_indices=as_tensor(rows),
        seq_lens=as_tensor(seq_lens),
        extend_prefix_lens=as_tensor(prefix_lens),
        extend_seq_lens=as_tensor(ext),
        logits_indices=ends - 1,
        req_pool_indices_cpu=rows,
        seq_lens_cpu=seq_lens,
        extend_prefix_lens_cpu=prefix_lens,
        extend_seq_lens_cpu=ext,
        req_to_token_pool=req_pool,
        kv_pool=kv_pool,
        attn_backend=create_backend("torch"),
    )


@pytest.mark.parametrize("name", ["llama", "qwen3_wide", "gemma2"])
def test_cached_prefix_decode_and_ragged_batches_match_full_forward(
    model_dirs: dict[str, Path], name: str
) -> None:
    model, config = load_model(model_dirs[name], torch.float32, "cpu")
    full = _our_logits(model, config, torch.arange(PROMPT.shape[0]))  # [T, V]
    other = PROMPT.flip(0)[:9]
    other_full = _our_logits_for(model, config, other)  # [9, V]

    req_pool = ReqToTokenPool(2, 64, "cpu")
    kv_pool = MHAKVPool(
        128, config.num_hidden_layers, config.num_key_value_heads, config.head_dim, torch.float32, "cpu"
    )
    rows = [row for row in (req_pool.alloc(), req_pool.alloc()) if row is not None]
    assert rows == [0, 1]  # _batch's slot layout assumes these rows
    step_logits = []
    with torch.inference_mode():
        # Step 1, ragged prefill: request 0 its first 12 tokens, request 1 its first 5.
        batch = _batch(config, req_pool, kv_pool, rows, [0, 0], [12, 5], [PROMPT[:12], other[:5]])
        hidden = model(batch.input_ids, batch.positions, batch)
        torch.testing.assert_close(model.compute_logits(hidden[:12]), full[:12], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.compute_logits(hidden[12:]), other_full[:5], atol=1e-5, rtol=0)
        # Step 2, extend after a cached prefix: 12 -> 18 and 5 -> 9.
        batch = _batch(config, req_pool, kv_pool, rows, [12, 5], [18, 9], [PROMPT[12:18], other[5:9]])
        hidden = model(batch.input_ids, batch.positions, batch)
        torch.testing.assert_close(model.compute_logits(hidden[:6]), full[12:18], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.compute_logits(hidden[6:]), other_full[5:9], atol=1e-5, rtol=0)
        # Then decode request 0 one token per step.
        for pos in range(18, PROMPT.shape[0]):
            batch = _batch(config, req_pool, kv_pool, [0], [pos], [pos + 1], [PROMPT[pos : pos + 1]])
            hidden = model(batch.input_ids, batch.positions, batch)
            step_logits.append(model.compute_logits(hidden[batch.logits_indices]))
    torch.testing.assert_close(torch.cat(step_logits), full[18:], atol=1e-5, rtol=0)


def _our_logits_for(model: CausalLM, config: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    batch = single_sequence_batch(ids, config)
    with torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(ids.shape[0]), batch))


def test_fused_weight_loaders_place_shards() -> None:
    qkv = QKVLinear(hidden_size=8, head_dim=2, num_heads=4, num_kv_heads=2, bias=True)
    q, k, v = torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)
    for shard_id, tensor in (("v", v), ("q", q), ("k", k)):
        get_weight_loader(qkv.weight)(qkv.weight, tensor, shard_id)
    assert torch.equal(qkv.weight, torch.cat([q, k, v]))
    assert qkv.bias is not None
    get_weight_loader(qkv.bias)(qkv.bias, torch.ones(4), "k")
    assert torch.equal(qkv.bias[8:12], torch.ones(4))
    with pytest.raises(ValueError, match="shape mismatch"):
        get_weight_loader(qkv.weight)(qkv.weight, torch.randn(4, 7), "k")

    gate_up = MergedLinear(8, [3, 5])
    gate, up = torch.randn(3, 8), torch.randn(5, 8)
    get_weight_loader(gate_up.weight)(gate_up.weight, up, 1)
    get_weight_loader(gate_up.weight)(gate_up.weight, gate, 0)
    assert torch.equal(gate_up.weight, torch.cat([gate, up]))
