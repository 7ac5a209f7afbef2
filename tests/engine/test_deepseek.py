"""DeepSeek-V2/V3 (MLA + MoE) against HF transformers on tiny checkpoints, float32 on CPU.

Continuous batching over page sizes and chunking is covered by test_parity.py (the arches are in
ARCHS); here: logits of both MLA extend forms, each form forced through whole runs, the automatic
choice over a cached prefix, decode past YaRN's original context, V2's plain greedy routing,
retraction, MTP tensors, and the rope / router pieces against HF's own functions.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.attention.mla import MLAAttention
from shared.attention.testing import single_sequence_batch
from shared.batch import ForwardBatch
from shared.mem import MLAKVPool
from shared.models import ModelConfig, load_model
from shared.models.deepseek_v2 import DeepseekV2ForCausalLM
from shared.models.layers.moe import FusedMoE, expert_param_name
from shared.models.layers.moe_router import NoAuxTCRouter, SoftmaxTopKRouter, make_router
from shared.models.layers.rotary import get_rope, yarn_parameters, yarn_softmax_scale
from tests.engine.hf_reference import _hf_model
from tests.engine.test_parity import (
    NEW_TOKENS,
    build_core,
    hf_greedy_cached,
    make_prompts,
    run_alone,
    run_staggered,
)

MLA_ARCHS = ("deepseek_v2", "deepseek_v3")
PROMPT = [5, 17, 250, 33, 101, 7, 480, 12, 12, 99, 300, 5, 64, 128, 2, 3, 77, 415, 256, 1, 9, 42] * 4  # 88


def set_extend_form(model: torch.nn.Module, form: str) -> None:
    for module in model.modules():
        if isinstance(module, MLAAttention):
            module.extend_form = form  # type: ignore[assignment]


@pytest.fixture
def chosen_forms(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Records the extend form every MLA layer uses (forced or chosen) during the test."""
    seen: list[str] = []
    choose = MLAAttention.choose_extend_form

    def spy(self: MLAAttention, batch: ForwardBatch) -> Any:
        form = choose(self, batch)
        seen.append(form)
        return form

    monkeypatch.setattr(MLAAttention, "choose_extend_form", spy)
    yield seen


@pytest.mark.parametrize("form", ["absorbed", "expanded"])
@pytest.mark.parametrize("arch", MLA_ARCHS)
def test_prefill_logits_match_hf(tiny_model_factory: Callable[..., Path], arch: str, form: str) -> None:
    path = tiny_model_factory(arch)
    model, config = load_model(path, torch.float32, "cpu")
    assert isinstance(model, DeepseekV2ForCausalLM)  # load_model ran process_weights_after_loading
    set_extend_form(model, form)
    ids = torch.tensor(PROMPT)  # 88 tokens: past the original context (64)
    batch = single_sequence_batch(ids, config)
    with torch.inference_mode():
        ours = model.compute_logits(model(ids, batch.positions, batch))  # [T, V]
        ref = _hf_model(str(path))(ids[None], use_cache=False).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", ["absorbed", "expanded"])
@pytest.mark.parametrize("arch", MLA_ARCHS)
def test_each_extend_form_alone_matches_hf(
    tiny_model_factory: Callable[..., Path], arch: str, form: str, chosen_forms: list[str]
) -> None:
    """Every extend step in one form, over chunks, cached prefixes and mixed batches."""
    path = tiny_model_factory(arch)
    core = build_core(path, page_size=4, chunked_prefill_size=16)
    set_extend_form(core.runner.model, form)
    prompts = make_prompts(core.runner.vocab_size, seed=3)
    prompts += [prompts[1] + [7, 8, 9], prompts[6] + [10]]  # share cached prefixes with earlier ones
    outputs = run_staggered(core, prompts)
    assert set(chosen_forms) == {form}
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy_cached(path, ids, NEW_TOKENS), f"prompt {i}"


@pytest.mark.parametrize("arch", MLA_ARCHS)
def test_prefix_reuse_picks_absorbed_and_decodes_past_the_original_context(
    tiny_model_factory: Callable[..., Path], arch: str, chosen_forms: list[str]
) -> None:
    """A fresh 75-token prompt prefills expanded; a second one sharing 70 tokens hits the radix
    cache and extends absorbed (few new tokens over a long prefix). Both decode at positions past
    YaRN's original_max_position_embeddings (64) and equal HF."""
    path = tiny_model_factory(arch)
    core = build_core(path, page_size=16)
    rng = random.Random(7)
    shared_prefix = [rng.randrange(5, core.runner.vocab_size) for _ in range(70)]
    first = shared_prefix + [rng.randrange(5, core.runner.vocab_size) for _ in range(5)]
    second = shared_prefix + [rng.randrange(5, core.runner.vocab_size) for _ in range(9)]
    out1, cached1 = run_alone(core, "a", first)
    forms_first, chosen_forms[:] = list(chosen_forms), []
    out2, cached2 = run_alone(core, "b", second)
    assert (cached1, cached2) == (0, 64)
    assert set(forms_first) == {"expanded"} and set(chosen_forms) == {"absorbed"}
    assert out1 == hf_greedy_cached(path, first, NEW_TOKENS)
    assert out2 == hf_greedy_cached(path, second, NEW_TOKENS)
    core.check_idle()


def test_v2_plain_greedy_routing_matches_hf(tiny_model_factory: Callable[..., Path]) -> None:
    path = tiny_model_factory("deepseek_v2", topk_method="greedy")
    core = build_core(path, page_size=16, chunked_prefill_size=16)
    model: Any = core.runner.model
    router = model.model.layers[1].mlp.gate
    assert isinstance(router, SoftmaxTopKRouter) and router.topk_method == "greedy"
    prompts = make_prompts(core.runner.vocab_size)
    outputs = run_staggered(core, prompts)
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy_cached(path, ids, NEW_TOKENS), f"prompt {i}"


def test_retraction_keeps_parity(tiny_model_factory: Callable[..., Path]) -> None:
    path = tiny_model_factory("deepseek_v3")
    core = build_core(path, page_size=1, max_total_tokens=80, chunked_prefill_size=32)
    prompts = [p[:30] for p in make_prompts(core.runner.vocab_size, seed=1)]
    outputs = run_staggered(core, prompts, max_new_tokens=20)
    assert core.scheduler.num_retractions > 0
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy_cached(path, ids, 20), f"prompt {i}"


def test_engine_uses_an_mla_pool(tiny_model_factory: Callable[..., Path]) -> None:
    core = build_core(tiny_model_factory("deepseek_v2"), max_total_tokens=64)
    pool = core.runner.kv_pool
    assert isinstance(pool, MLAKVPool)
    assert len(pool.buffers()) == 3 and pool.buffers()[0].shape[1:] == (1, 32 + 8)
    assert pool.bytes_per_token() == 3 * 40 * 4  # float32: a tenth of MHA's 2 * 4 heads * 24 * 3 layers


@pytest.mark.parametrize("arch", MLA_ARCHS)
def test_model_builds_under_another_default_device(
    tiny_model_factory: Callable[..., Path], arch: str
) -> None:
    # The loader builds models under `torch.device(target)`: host-side tables (rope, the rope
    # row permutation) must not land there by default (the meta device stands in for CUDA).
    config = ModelConfig.from_model_path(tiny_model_factory(arch))
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config)
    assert next(model.parameters()).device.type == "meta"


def test_mtp_layer_tensors_are_skipped(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model_factory("deepseek_v3")
    for file in src.iterdir():
        shutil.copy(file, tmp_path / file.name)
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    # What a real checkpoint's multi-token-prediction layer (model.layers.{num_hidden_layers}) holds.
    mtp = {n.replace(".layers.2.", ".layers.3."): t.clone() for n, t in tensors.items() if ".layers.2." in n}
    mtp["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    mtp["model.layers.3.enorm.weight"] = torch.ones(64)
    save_file({**tensors, **mtp}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours, _ = load_model(tmp_path, torch.float32, "cpu")
    ref, _ = load_model(src, torch.float32, "cpu")
    ref_params = dict(ref.named_parameters())
    assert all(torch.equal(p, ref_params[n]) for n, p in ours.named_parameters())
    # Unknown tensors of served layers still fail loudly.
    save_file({**tensors, "model.layers.1.bogus.weight": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="bogus"):
        load_model(tmp_path, torch.float32, "cpu")


# ---- pieces against HF's own functions --------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [{}, {"truncate": False}, {"factor": None}, {"mscale": None, "mscale_all_dim": None}, {"beta_fast": 4}],
    ids=["tiny", "no-truncate", "implicit-factor", "no-mscale", "beta-fast"],
)
def test_yarn_matches_transformers(tiny_model_factory: Callable[..., Path], change: dict[str, Any]) -> None:
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path = tiny_model_factory("deepseek_v3")
    hf_config = AutoConfig.from_pretrained(path)
    hf_config.rope_parameters.update(change)
    if change.get("factor", 1) is None:
        hf_config.max_position_embeddings = 512  # implicit factor 512 / 64 = 8
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config)
    scaling = {k: v for k, v in hf_config.rope_parameters.items() if k != "rope_theta"}
    inv_freq, factor = yarn_parameters(8, 10000.0, hf_config.max_position_embeddings, scaling)
    assert torch.equal(inv_freq, hf_inv_freq) and factor == hf_factor
    rope = get_rope(8, hf_config.max_position_embeddings, 10000.0, scaling)
    cos = rope.cos_sin_cache[:, :4]
    positions = torch.arange(hf_config.max_position_embeddings, dtype=torch.float32)
    torch.testing.assert_close(cos, (positions[:, None] * hf_inv_freq).cos() * hf_factor, atol=0, rtol=0)


@pytest.mark.parametrize("arch", MLA_ARCHS)
def test_softmax_scale_matches_transformers(tiny_model_factory: Callable[..., Path], arch: str) -> None:
    path = tiny_model_factory(arch)
    config = ModelConfig.from_model_path(path)
    assert config.mla is not None and config.mla.qk_head_dim == 24
    assert config.mla.q_lora_rank == (None if arch == "deepseek_v2" else 24)
    hf_model: Any = _hf_model(str(path))
    hf_attn = hf_model.model.layers[0].self_attn
    assert yarn_softmax_scale(24, config.rope_scaling) == hf_attn.scaling != 24**-0.5


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy", "noaux_tc"])
def test_routers_match_transformers(tiny_model_factory: Callable[..., Path], method: str) -> None:
    from transformers import AutoConfig
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    arch = "deepseek_v3" if method == "noaux_tc" else "deepseek_v2"
    path = tiny_model_factory(arch)
    hf_config = AutoConfig.from_pretrained(path)
    hf_config.topk_method = method
    ours = make_router({**ModelConfig.from_model_path(path).hf_config, "topk_method": method}, 64, "greedy")
    assert isinstance(ours, NoAuxTCRouter if method == "noaux_tc" else SoftmaxTopKRouter)
    hf: Any = DeepseekV3TopkRouter(hf_config) if method == "noaux_tc" else DeepseekV2TopkRouter(hf_config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hf.weight.copy_(0.15 * torch.randn(8, 64, generator=generator))
        ours.weight.copy_(hf.weight)
        if isinstance(ours, NoAuxTCRouter):
            hf.e_score_correction_bias.copy_(0.1 * torch.randn(8, generator=generator))
            ours.e_score_correction_bias.copy_(hf.e_score_correction_bias)
    x = torch.randn(256, 64, generator=generator)
    _, hf_weights, hf_ids = hf(x)
    weights, ids = ours(x)
    # topk(sorted=False) may order the k picks differently; compare them sorted by expert id.
    order, hf_order = ids.argsort(dim=-1), hf_ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), hf_ids.gather(1, hf_order))
    assert torch.equal(weights.gather(1, order), hf_weights.gather(1, hf_order))


def test_expert_names_and_loader() -> None:
    assert expert_param_name("model.layers.4.mlp.experts.17.up_proj.weight") == (
        "model.layers.4.mlp.experts.w13_weight",
        17,
        "up",
    )
    assert expert_param_name("model.layers.4.mlp.experts.3.down_proj.weight_scale_inv") == (
        "model.layers.4.mlp.experts.w2_weight_scale_inv",
        3,
        "down",
    )
    assert expert_param_name("model.layers.4.mlp.shared_experts.up_proj.weight") is None
    moe = FusedMoE(num_experts=2, hidden_size=3, intermediate_size=2)
    gate, up, down = torch.full((2, 3), 1.0), torch.full((2, 3), 2.0), torch.full((3, 2), 3.0)
    moe.weight_loader(moe.w13_weight, gate, 1, "gate")
    moe.weight_loader(moe.w13_weight, up, 1, "up")
    moe.weight_loader(moe.w2_weight, down, 1, "down")
    assert torch.equal(moe.w13_weight[1], torch.cat([gate, up])) and torch.equal(moe.w2_weight[1], down)
    assert len(getattr(moe.w13_weight, "shard_ids")) == 4  # noqa: B009
    with pytest.raises(ValueError, match="shape mismatch"):
        moe.weight_loader(moe.w2_weight, gate, 0, "down")
