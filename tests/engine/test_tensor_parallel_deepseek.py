"""Tensor parallelism for DeepSeek (MLA + MoE) and FP8 weights on CPU: TP=2 through the engine
process (real gloo ranks) against HF float32 and against the TP=1 FP8 engine (DeepSeek-V3 and
Llama), and the sharded loaders (MLA heads, experts, FP8 block scales) against slices of the TP=1
model's parameters."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from shared.config import EngineConfig
from shared.distributed import parallel_state
from shared.models import ModelConfig, load_model
from shared.models.deepseek_v2 import DeepseekV2ForCausalLM
from shared.models.layers.moe import ExpertParallelMoE, FusedMoE
from shared.quant.checkpoint import write_fp8_checkpoint
from shared.quant.fp8 import Fp8Config
from tests.engine.hf_reference import hf_greedy
from tests.engine.test_tensor_parallel import GREEDY, PROMPTS, rank1_of_2, run_all, tp_client  # noqa: F401

# Every shard of every FP8 weight at TP=2 is whole 128 x 128 blocks: 8 heads (4 per rank) of
# q 32 + 32 rope (q_b: 256 rows per rank), kv_b 4 x (32 + 32) = 256 rows, o_proj 4 x 32 = 128
# columns; dense, routed and shared expert intermediate sizes 256 (128 per rank).
FP8_ALIGNED = {
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 32,
    "intermediate_size": 256,
    "moe_intermediate_size": 256,
}


# V3: q LoRA (q_a/q_b), sigmoid noaux_tc router; V2: a plain q_proj, softmax group-limited router.
# ep_size=2: the 8 routed experts partitioned 4 + 4 instead of each split in two; at tp_size=4,
# 2 + 2 + 2 + 2 experts, one MLA head a rank.
@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("deepseek_v3", {}),
        ("deepseek_v2", {}),
        ("deepseek_v3", {"ep_size": 2}),
        ("deepseek_v3", {"tp_size": 4, "ep_size": 4}),
    ],
    ids=["v3", "v2", "v3-ep2", "v3-tp4-ep4"],
)
def test_deepseek_tp_greedy_matches_hf(
    tiny_model_factory: Callable[..., Path], arch: str, options: dict[str, object]
) -> None:
    path = tiny_model_factory(arch)
    client = tp_client(path, **options)
    try:
        got = run_all(client, PROMPTS)
        again = run_all(client, PROMPTS[1:2])  # a radix-cache hit on rank 0; every rank has the latent
    finally:
        client.shutdown()
    for i, ids in enumerate(PROMPTS):
        assert got[str(i)] == hf_greedy(path, ids, GREEDY["max_new_tokens"]), i
    assert again["0"] == got["1"]


@pytest.mark.parametrize("checkpoint", ["quantize-while-loading", "fp8-checkpoint"])
def test_deepseek_v3_fp8_tp2_equals_tp1(
    tiny_model_factory: Callable[..., Path], tmp_path: Path, checkpoint: str
) -> None:
    path = tiny_model_factory("deepseek_v3", **FP8_ALIGNED)
    options: dict[str, object] = {"quantization": "fp8"}
    if checkpoint == "fp8-checkpoint":
        path, options = write_fp8_checkpoint(path, tmp_path / "fp8"), {}
    tokens = []
    for tp_size in (1, 2):
        client = tp_client(path, tp_size=tp_size, **options)
        try:
            tokens.append(run_all(client, PROMPTS))
        finally:
            client.shutdown()
    assert tokens[1] == tokens[0]


# A Llama whose every FP8 shard at TP=2 is whole 128 x 128 blocks: q, k and v 4 heads x 64 (128
# rows a rank each), o_proj 128 columns a rank, gate/up rows and down columns 128 a rank.
LLAMA_FP8_ALIGNED = {"hidden_size": 256, "num_key_value_heads": 4, "intermediate_size": 256}


def test_llama_fp8_tp2_equals_tp1(tiny_model_factory: Callable[..., Path]) -> None:
    path = tiny_model_factory("llama", **LLAMA_FP8_ALIGNED)
    tokens = []
    for tp_size in (1, 2):
        client = tp_client(path, tp_size=tp_size, quantization="fp8")
        try:
            tokens.append(run_all(client, PROMPTS))
            tokens.append(run_all(client, PROMPTS[1:2]))  # a prefix-cache hit
        finally:
            client.shutdown()
    assert tokens[2:] == tokens[:2]
    assert tokens[1]["0"] == tokens[0]["1"]


# ---- the sharded loaders, as rank 1 of 2 (loading runs no collective) ----


def _load(path: Path, quantization: str | None = None) -> DeepseekV2ForCausalLM:
    model, _ = load_model(path, torch.float32, "cpu", quantization)
    assert isinstance(model, DeepseekV2ForCausalLM)
    return model


def _halves(w: torch.Tensor, dim: int, parts: int = 1) -> torch.Tensor:
    """Rank 1's slice of `w` along `dim`: the second half of each of `parts` fused parts."""
    chunks = w.chunk(parts, dim=dim)
    return torch.cat([c.chunk(2, dim=dim)[1] for c in chunks], dim=dim)


def _check_rank1_slices(full: DeepseekV2ForCausalLM, rank1: DeepseekV2ForCausalLM, scales: bool) -> None:
    suffixes = ("weight", "weight_scale_inv") if scales else ("weight",)
    for f, r in zip(full.model.layers, rank1.model.layers, strict=True):
        fa, ra = f.self_attn, r.self_attn
        assert ra.num_heads == fa.num_heads // 2 and ra.attn.num_heads == fa.attn.num_heads // 2
        for suffix in suffixes:
            same = (fa.q_a_proj, ra.q_a_proj), (fa.kv_a_proj_with_mqa, ra.kv_a_proj_with_mqa)
            for fl, rl in same:  # replicated: the latent and the q LoRA input
                assert torch.equal(getattr(rl, suffix).float(), getattr(fl, suffix).float())
            for fl, rl in ((fa.q_b_proj, ra.q_b_proj), (fa.kv_b_proj, ra.kv_b_proj)):  # heads
                assert torch.equal(getattr(rl, suffix).float(), _halves(getattr(fl, suffix).float(), 0))
            assert torch.equal(
                getattr(ra.o_proj, suffix).float(), _halves(getattr(fa.o_proj, suffix).float(), 1)
            )
        # The absorbed decode weights are this rank's heads of W_UK / W_UV.
        assert ra.attn.w_uk is not None and fa.attn.w_uk is not None
        assert torch.equal(ra.attn.w_uk.float(), _halves(fa.attn.w_uk.float(), 0))
        if hasattr(f.mlp, "experts"):
            fm, rm = f.mlp, r.mlp
            assert torch.equal(rm.gate.weight, fm.gate.weight)  # the router is replicated
            for suffix in suffixes:
                w13, w2 = f"w13_{suffix}", f"w2_{suffix}"
                assert torch.equal(
                    getattr(rm.experts, w13).float(), _halves(getattr(fm.experts, w13).float(), 1, 2)
                )
                assert torch.equal(
                    getattr(rm.experts, w2).float(), _halves(getattr(fm.experts, w2).float(), 2)
                )
                fs, rs = fm.shared_experts.gate_up_proj, rm.shared_experts.gate_up_proj
                assert torch.equal(getattr(rs, suffix).float(), _halves(getattr(fs, suffix).float(), 0, 2))


def test_mla_and_moe_loaders_take_this_ranks_heads_and_expert_slices(
    tiny_model_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_model_factory("deepseek_v3")
    full = _load(path)
    monkeypatch.setattr(parallel_state, "_state", parallel_state._State(rank=1, size=2))
    _check_rank1_slices(full, _load(path), scales=False)


@pytest.mark.parametrize("checkpoint", ["quantize-while-loading", "fp8-checkpoint"])
def test_fp8_block_scales_slice_in_whole_blocks(
    tiny_model_factory: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoint: str
) -> None:
    """Block-aligned shards: rank 1's E4M3 weights and scales are exactly slices of TP=1's,
    whether the checkpoint is FP8 or quantized while loading (each rank its own slice)."""
    path = tiny_model_factory("deepseek_v3", **FP8_ALIGNED)
    quantization: str | None = "fp8"
    if checkpoint == "fp8-checkpoint":
        path, quantization = write_fp8_checkpoint(path, tmp_path / "fp8"), None
    full = _load(path, quantization)
    monkeypatch.setattr(parallel_state, "_state", parallel_state._State(rank=1, size=2))
    _check_rank1_slices(full, _load(path, quantization), scales=True)


@pytest.mark.parametrize("checkpoint", ["unquantized", "fp8-checkpoint"])
def test_expert_parallel_loader_takes_whole_experts(
    tiny_model_factory: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoint: str
) -> None:
    path = tiny_model_factory("deepseek_v3", **FP8_ALIGNED)
    names = ["w13_weight", "w2_weight"]
    if checkpoint == "fp8-checkpoint":
        path = write_fp8_checkpoint(path, tmp_path / "fp8")
        names += ["w13_weight_scale_inv", "w2_weight_scale_inv"]
    full = _load(path)
    monkeypatch.setattr(parallel_state, "_state", parallel_state._State(rank=1, size=2, ep_size=2))
    rank1 = _load(path)
    for f, r in zip(full.model.layers[1:], rank1.model.layers[1:], strict=True):  # the MoE layers
        assert isinstance(r.mlp.experts, ExpertParallelMoE) and r.mlp.experts.expert_start == 4
        for name in names:  # experts 4..7 of 8, whole
            assert torch.equal(getattr(r.mlp.experts, name).float(), getattr(f.mlp.experts, name)[4:].float())


def test_expert_parallel_contributions_add_up_to_all_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two ranks' ExpertParallelMoE outputs (no group needed: no collective inside) sum to
    the output of one FusedMoE holding every expert."""
    torch.manual_seed(0)
    experts, hidden, inter = 4, 8, 6
    gate, up = torch.randn(experts, inter, hidden), torch.randn(experts, inter, hidden)
    down = torch.randn(experts, hidden, inter)

    def build(cls: type[FusedMoE]) -> FusedMoE:
        moe = cls(experts, hidden, inter)
        for e in range(experts):
            for param, tensor, shard in (
                (moe.w13_weight, gate, "gate"),
                (moe.w13_weight, up, "up"),
                (moe.w2_weight, down, "down"),
            ):
                param.weight_loader(param, tensor[e], e, shard)  # type: ignore[attr-defined]
        return moe

    x = torch.randn(5, hidden)
    weights, ids = torch.rand(5, 2), torch.tensor([[0, 3], [1, 2], [2, 3], [0, 1], [3, 1]])
    expected = build(FusedMoE)(x, weights, ids)
    parts = []
    for rank in range(2):
        monkeypatch.setattr(parallel_state, "_state", parallel_state._State(rank=rank, size=2, ep_size=2))
        parts.append(build(ExpertParallelMoE)(x, weights, ids))
    torch.testing.assert_close(parts[0] + parts[1], expected)


def test_fp8_shards_off_block_boundaries_are_refused(rank1_of_2: None) -> None:  # noqa: F811
    from shared.models.layers.linear import ColumnParallelLinear, MergedLinear, RowParallelLinear
    from shared.models.layers.moe import FusedMoE

    fp8 = Fp8Config()
    ColumnParallelLinear(64, 512, quant=fp8)  # 256 rows per rank: two whole blocks
    RowParallelLinear(256, 64, quant=fp8)
    for build in (
        lambda: ColumnParallelLinear(64, 192, quant=fp8),  # 96 rows per rank
        lambda: RowParallelLinear(128, 64, quant=fp8),  # 64 columns per rank
        lambda: MergedLinear(64, [128, 128], quant=fp8),  # each half 64 rows per rank
        lambda: FusedMoE(4, 64, 128, quant=fp8),
    ):
        with pytest.raises(ValueError, match="FP8 block scales split only on block boundaries"):
            build()
    ColumnParallelLinear(64, 192)  # unquantized: any even split


def test_deepseek_tp_support_is_checked(tiny_model_factory: Callable[..., Path]) -> None:
    model = ModelConfig.from_model_path(tiny_model_factory("deepseek_v3"))  # 4 heads
    parallel_state.check_tp_support(model, 4)
    with pytest.raises(ValueError, match="num_attention_heads"):
        parallel_state.check_tp_support(model, 3)
    odd = dataclasses.replace(model, hf_config={**model.hf_config, "moe_intermediate_size": 30})
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        parallel_state.check_tp_support(odd, 4)
    parallel_state.check_tp_support(model, 4, ep_size=4)  # 8 experts, 2 per rank
    six = dataclasses.replace(model, hf_config={**model.hf_config, "n_routed_experts": 6})
    with pytest.raises(ValueError, match="n_routed_experts"):
        parallel_state.check_tp_support(six, 4, ep_size=4)
    llama = tiny_model_factory("llama")
    with pytest.raises(ValueError, match="no routed experts"):
        parallel_state.check_tp_support(ModelConfig.from_model_path(llama), 2, ep_size=2)
    with pytest.raises(ValueError, match="ep_size must be 1 or equal tp_size"):
        EngineConfig.from_options(str(llama), tp_size=2, ep_size=4)
