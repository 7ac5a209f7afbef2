"""FP8 weights end to end on CPU: quantization while loading, FP8 checkpoints in DeepSeek-V3's
layout, the engine options, and how far FP8 logits stray from the unquantized model's.

On CPU the FP8 layers run `kernels.fp8_gemm.fp8_linear_ref`: activations rounded to E4M3 per
128-wide group exactly as the GPU kernel does, weights as stored, float32 products. So these
tests check the real quantization, not a float stand-in.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shared.attention.testing import single_sequence_batch
from shared.models import load_model
from shared.models.base import CausalLM
from shared.models.config import ModelConfig
from shared.models.layers.linear import LinearBase
from shared.quant.checkpoint import quantization_config, write_fp8_checkpoint
from shared.quant.fp8 import FP8_DTYPE, Fp8Config, resolve_fp8

PROMPT = torch.tensor([7, 91, 3, 200, 45, 17, 301, 8, 66, 120, 9, 250])


def _logits(model: CausalLM, config: ModelConfig, ids: torch.Tensor) -> torch.Tensor:  # [T, V]
    batch = single_sequence_batch(ids, config)
    with torch.inference_mode():
        return model.compute_logits(model(ids, batch.positions, batch))


def _linears(model: torch.nn.Module) -> list[LinearBase]:
    return [m for m in model.modules() if isinstance(m, LinearBase)]


@pytest.fixture(scope="module")
def llama(tiny_model_factory: Callable[..., Path]) -> Path:
    # q, k, v 256/128/128 rows and gate/up 256 each: every fused shard starts on a 128-row block,
    # as in real checkpoints (an FP8 checkpoint's scales could not be split otherwise); K = 256
    # gives each row two activation groups.
    return tiny_model_factory(
        "llama", hidden_size=256, num_attention_heads=8, num_key_value_heads=4, intermediate_size=256
    )


@pytest.fixture(scope="module")
def fp8_checkpoint(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fp8_checkpoint(llama, tmp_path_factory.mktemp("llama-fp8"))


def test_quantization_while_loading_makes_every_linear_fp8(llama: Path) -> None:
    model, config = load_model(llama, torch.float32, "cpu", quantization="fp8")
    assert config.quant == Fp8Config(checkpoint_is_fp8=False)
    linears = _linears(model)
    assert len(linears) == 4 * config.num_hidden_layers  # qkv, o, gate_up, down
    for layer in linears:
        assert layer.weight.dtype == FP8_DTYPE
        assert layer.weight_scale_inv is not None and layer.weight_scale_inv.dtype == torch.float32
        rows, cols = layer.weight.shape
        assert tuple(layer.weight_scale_inv.shape) == (-(-rows // 128), -(-cols // 128))
    # Embedding, lm head and norms stay in the model dtype.
    assert model.lm_head.weight.dtype == torch.float32


def test_fp8_checkpoint_has_deepseek_v3_layout(fp8_checkpoint: Path) -> None:
    config = json.loads((fp8_checkpoint / "config.json").read_text())
    assert config["quantization_config"] == quantization_config()
    with safe_open(str(fp8_checkpoint / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        q_proj = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        scale = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale_inv")
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
    assert q_proj.dtype == FP8_DTYPE and scale.dtype == torch.float32 and norm.dtype == torch.float32
    assert "model.embed_tokens.weight_scale_inv" not in names and "lm_head.weight_scale_inv" not in names
    assert sum(n.endswith("_scale_inv") for n in names) == 7 * 2  # 7 projections x 2 layers
    assert (fp8_checkpoint / "tokenizer.json").is_file()


def test_fp8_checkpoint_loads_as_it_is_and_equals_quantizing_while_loading(
    llama: Path, fp8_checkpoint: Path
) -> None:
    direct, config = load_model(fp8_checkpoint, torch.float32, "cpu")  # no option: the config says FP8
    assert config.quant is not None and config.quant.checkpoint_is_fp8
    online, _ = load_model(llama, torch.float32, "cpu", quantization="fp8")
    direct_params, online_params = dict(direct.named_parameters()), dict(online.named_parameters())
    assert direct_params.keys() == online_params.keys()
    for name, param in direct_params.items():
        # Same bits: fused shards (q/k/v, gate/up) land block-aligned in the fused weight's scale.
        assert param.dtype == online_params[name].dtype, name
        assert torch.equal(param.view(torch.uint8), online_params[name].view(torch.uint8)), name
    assert torch.equal(_logits(direct, config, PROMPT), _logits(online, config, PROMPT))


def test_fp8_logits_stay_as_close_to_fp32_as_the_format_allows(llama: Path) -> None:
    """How far FP8 logits may stray, measured against the bf16 model's own rounding error.

    A single W8A8 matmul is off by ~4% of its output (E4M3 keeps 3 mantissa bits: rounding
    error <= 2**-4 per weight and activation; test_fp8 in tests/kernels checks that bound).
    These random tiny models amplify per-op rounding about tenfold on the way to the logits (the
    bf16 model, whose per-op error is 2**-8, lands ~5% off fp32 too), so an absolute bound would
    say more about the model than the format. The format's bound is relative: E4M3's rounding
    step is 16x bf16's, and in this regime logit error grows linearly with per-op error, so the
    FP8 model may be at most 16x as far from fp32 as the bf16 model is; and it must be clearly
    further (> 2x), or the weights were not really quantized. Both hold per position (mean
    relative L2 error over the prompt)."""
    ref, config = load_model(llama, torch.float32, "cpu")
    fp8, _ = load_model(llama, torch.float32, "cpu", quantization="fp8")
    bf16, _ = load_model(llama, torch.bfloat16, "cpu")
    ref_logits = _logits(ref, config, PROMPT)

    def error(logits: torch.Tensor) -> float:
        return ((logits.float() - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1)).mean().item()

    fp8_error, bf16_error = error(_logits(fp8, config, PROMPT)), error(_logits(bf16, config, PROMPT))
    assert 2 * bf16_error < fp8_error <= 16 * bf16_error, (fp8_error, bf16_error)


def test_producers_quantizing_for_fp8_linears_change_no_logit(
    llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kernels.fp8_quant.FUSE_INTO_PRODUCERS`: after loading, each layer's two norms and its
    SiLU-and-mul hand their FP8 linears codes (`Fp8Activation`), and the logits are those of the
    linears quantizing the float activations themselves, bit for bit (on CPU both are the torch
    references; tests/kernels/test_fused_quant.py holds the kernels to the same codes)."""
    from kernels import fp8_quant

    plain, config = load_model(llama, torch.float32, "cpu", quantization="fp8")
    monkeypatch.setattr(fp8_quant, "FUSE_INTO_PRODUCERS", True)
    fused, _ = load_model(llama, torch.float32, "cpu", quantization="fp8")
    for layer in fused.model.layers:
        assert layer.input_layernorm.fp8_group == layer.post_attention_layernorm.fp8_group == 128
        assert layer.mlp.down_proj.silu_mul_quantizes
    assert fused.model.norm.fp8_group is None  # the lm head's input stays float
    assert all(layer.input_layernorm.fp8_group is None for layer in plain.model.layers)
    hidden = torch.randn(3, config.hidden_size)
    assert isinstance(fused.model.layers[0].input_layernorm(hidden), fp8_quant.Fp8Activation)
    assert torch.equal(_logits(fused, config, PROMPT), _logits(plain, config, PROMPT))


def test_producers_quantize_only_for_dense_mlps_in_deepseek(
    deepseek: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLA takes float input and an MoE block routes on it: only a dense layer's MLP gets codes."""
    from kernels import fp8_quant
    from shared.models.llama import LlamaMLP

    plain, config = load_model(deepseek, torch.float32, "cpu", quantization="fp8")
    monkeypatch.setattr(fp8_quant, "FUSE_INTO_PRODUCERS", True)
    fused, _ = load_model(deepseek, torch.float32, "cpu", quantization="fp8")
    dense = [isinstance(layer.mlp, LlamaMLP) for layer in fused.model.layers]
    assert True in dense and False in dense
    for layer, is_dense in zip(fused.model.layers, dense):
        assert layer.input_layernorm.fp8_group is None
        assert layer.post_attention_layernorm.fp8_group == (128 if is_dense else None)
    assert torch.equal(_logits(fused, config, PROMPT), _logits(plain, config, PROMPT))


def test_producers_stay_float_without_fp8_linears(llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels import fp8_quant

    monkeypatch.setattr(fp8_quant, "FUSE_INTO_PRODUCERS", True)
    model, _ = load_model(llama, torch.float32, "cpu")
    assert all(layer.input_layernorm.fp8_group is None for layer in model.model.layers)
    assert not any(layer.mlp.down_proj.silu_mul_quantizes for layer in model.model.layers)


def test_resolve_fp8_refuses_what_it_cannot_run() -> None:
    fp8 = quantization_config()
    assert resolve_fp8({}, None) is None
    assert resolve_fp8({}, "fp8") == Fp8Config(checkpoint_is_fp8=False)
    assert resolve_fp8({"quantization_config": fp8}, None) == Fp8Config(checkpoint_is_fp8=True)
    assert resolve_fp8({"quantization_config": fp8}, "fp8") == Fp8Config(checkpoint_is_fp8=True)
    ignored = {**fp8, "modules_to_not_convert": ["lm_head"]}
    assert resolve_fp8({"quantization_config": ignored}, None).ignored == ("lm_head",)  # type: ignore[union-attr]
    for bad, message in [
        ({"quant_method": "awq"}, "'awq' is not supported"),
        ({**fp8, "activation_scheme": "static"}, "static activation scales"),
        ({**fp8, "weight_block_size": None}, "per-tensor scales"),
        ({**fp8, "weight_block_size": [128, 64]}, "input blocks must be 128"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve_fp8({"quantization_config": bad}, None)
    with pytest.raises(ValueError, match="quantization must be one of"):
        resolve_fp8({}, "int4")


def test_misaligned_fused_shard_in_an_fp8_checkpoint_is_refused(tmp_path: Path) -> None:
    from shared.models.layers.linear import MergedLinear

    # Two 96-row projections fused: the second starts at row 96, inside the first 128-row block.
    layer = MergedLinear(64, [96, 96], quant=Fp8Config(checkpoint_is_fp8=True))
    scale = layer.weight_scale_inv
    assert scale is not None
    loader = scale.weight_loader  # type: ignore[attr-defined]
    loader(scale, torch.ones(1, 1), 0)
    with pytest.raises(ValueError, match="not on a 128-row block boundary"):
        loader(scale, torch.ones(1, 1), 1)


# ---- DeepSeek (MLA + MoE) and the engine options -------------------------------------------------

# Every fused shard block-aligned (gate/up halves of the dense MLP, shared and routed experts).
_DEEPSEEK_ALIGNED = {"intermediate_size": 128, "moe_intermediate_size": 128}


@pytest.fixture(scope="module")
def deepseek(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("deepseek_v3", **_DEEPSEEK_ALIGNED)


def test_deepseek_fp8_checkpoint_equals_quantizing_while_loading(
    deepseek: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from shared.attention.mla import MLAAttention
    from shared.models.layers.moe import FusedMoE

    fp8_dir = write_fp8_checkpoint(deepseek, tmp_path_factory.mktemp("deepseek-fp8"))
    with safe_open(str(fp8_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv" in names
    assert "model.layers.1.self_attn.kv_b_proj.weight_scale_inv" in names
    assert "model.layers.1.mlp.gate.weight_scale_inv" not in names  # the router stays float32
    direct, config = load_model(fp8_dir, torch.float32, "cpu")
    online, _ = load_model(deepseek, torch.float32, "cpu", quantization="fp8")
    online_params = dict(online.named_parameters())
    for name, param in direct.named_parameters():
        assert torch.equal(param.view(torch.uint8), online_params[name].view(torch.uint8)), name
    moe = [m for m in direct.modules() if isinstance(m, FusedMoE)]
    assert moe and all(m.w13_weight.dtype == FP8_DTYPE and m.w2_weight_scale_inv is not None for m in moe)
    mla = [m for m in direct.modules() if isinstance(m, MLAAttention)]
    assert mla and all(m.w_uk is not None and m.w_uk.dtype == FP8_DTYPE for m in mla)  # FP8 bmm operands
    ids = torch.tensor([5, 17, 250, 33, 101, 7, 480, 12, 12, 99, 300, 5, 64, 128])
    assert torch.equal(_logits(direct, config, ids), _logits(online, config, ids))


def test_deepseek_fp8_logits_stay_as_close_as_the_format_allows(deepseek: Path) -> None:
    """The bound of `test_fp8_logits_stay_as_close_to_fp32_as_the_format_allows`, here with the
    MLA absorbed matmuls and the routed experts quantized too."""
    ids = torch.tensor([5, 17, 250, 33, 101, 7, 480, 12, 12, 99, 300, 5, 64, 128])
    ref, config = load_model(deepseek, torch.float32, "cpu")
    ref_logits = _logits(ref, config, ids)

    def error(dtype: torch.dtype, quantization: str | None) -> float:
        model, _ = load_model(deepseek, dtype, "cpu", quantization=quantization)
        logits = _logits(model, config, ids).float()
        return ((logits - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1)).mean().item()

    fp8_error, bf16_error = error(torch.float32, "fp8"), error(torch.bfloat16, None)
    assert 2 * bf16_error < fp8_error <= 16 * bf16_error, (fp8_error, bf16_error)


def _oracle_greedy(
    model: CausalLM, config: ModelConfig, prompt: list[int], new: int, kv: torch.dtype
) -> list[int]:
    """Greedy by recomputing the whole sequence each step through an FP8 pool of the model's kind."""
    ids = list(prompt)
    device = next(model.parameters()).device
    for _ in range(new):
        t = torch.tensor(ids, device=device)
        batch = single_sequence_batch(t, config, dtype=kv)
        with torch.inference_mode():
            hidden = model(t, batch.positions, batch)
            ids.append(int(model.compute_logits(hidden[-1:])[0].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_engine_with_fp8_weights_and_kv_cache_equals_its_own_oracle(
    llama: Path, deepseek: Path, arch: str
) -> None:
    """quantization="fp8" + kv_cache_dtype="fp8_e4m3" through the engine (paged, batched, staggered,
    chunked) give the tokens the same FP8 model gives when every step recomputes the sequence
    through an FP8 pool: FP8 changes the numbers, not the engine's consistency. (DeepSeek runs the
    absorbed form everywhere, so both sides take the same quantized path.) On CPU, where every
    op is the exact torch emulation: on a GPU the FP8 tensor cores' accumulation depends on the
    tile shape the batch size picks, and these tiny random models amplify that noise into
    different argmaxes (the kernels are checked against their references in tests/kernels)."""
    from tests.engine.test_deepseek import set_extend_form
    from tests.engine.test_parity import build_core, make_prompts, run_staggered

    path = llama if arch == "llama" else deepseek
    core = build_core(
        path,
        device="cpu",
        page_size=4,
        chunked_prefill_size=16,
        quantization="fp8",
        kv_cache_dtype="fp8_e4m3",
    )
    runner = core.runner
    assert runner.kv_pool.buffers()[0].dtype == FP8_DTYPE
    assert any(p.dtype == FP8_DTYPE for p in runner.model.parameters())
    set_extend_form(runner.model, "absorbed")
    prompts = make_prompts(runner.vocab_size, count=5, seed=4)
    outputs = run_staggered(core, prompts, max_new_tokens=8)
    for i, prompt in enumerate(prompts):
        expected = _oracle_greedy(runner.model, runner.model_config, prompt, 8, FP8_DTYPE)
        assert outputs[f"r{i}"] == expected, f"prompt {i}"


def test_engine_options_are_checked(llama: Path) -> None:
    from shared.config import EngineConfig

    with pytest.raises(ValueError, match="quantization must be None or 'fp8'"):
        EngineConfig.from_options(str(llama), quantization="int8")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig.from_options(str(llama), kv_cache_dtype="fp8_e5m2")


def test_checkpoint_command_line(llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from shared.quant.checkpoint import main

    main([str(llama), str(tmp_path / "fp8")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "fp8")
    _, config = load_model(tmp_path / "fp8", torch.float32, "cpu")
    assert config.quant is not None and config.quant.checkpoint_is_fp8
    with pytest.raises(ValueError, match="different directory"):
        write_fp8_checkpoint(llama, llama)


def test_modules_to_not_convert_stay_unquantized(llama: Path, fp8_checkpoint: Path, tmp_path: Path) -> None:
    """A checkpoint listing `modules_to_not_convert` ships those layers unquantized: they load in
    the model dtype, every other linear as FP8."""
    import shutil

    from safetensors.torch import save_file

    dst = tmp_path / "partial"
    shutil.copytree(fp8_checkpoint, dst)
    keep = "model.layers.1.self_attn.o_proj"
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys() if not n.startswith(keep)}  # noqa: SIM118
    with safe_open(str(llama / "model.safetensors"), framework="pt") as f:
        tensors[f"{keep}.weight"] = f.get_tensor(f"{keep}.weight")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = [keep]
    (dst / "config.json").write_text(json.dumps(config))
    model, _ = load_model(dst, torch.float32, "cpu")
    layers = dict(model.named_modules())
    kept = layers[keep]
    assert (
        isinstance(kept, LinearBase) and kept.weight.dtype == torch.float32 and kept.weight_scale_inv is None
    )
    assert torch.equal(kept.weight, tensors[f"{keep}.weight"])
    assert layers["model.layers.0.self_attn.o_proj"].weight.dtype == FP8_DTYPE
