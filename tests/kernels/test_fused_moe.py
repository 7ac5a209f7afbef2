"""Fused MoE: the reference against a naive per-token loop and Hugging Face's experts, Triton
against the reference (unquantized and block-FP8 weights), alignment, empty batches, bad calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.config import reference_mode
from kernels.fp8_quant import block_quant_fp8
from kernels.fused_moe import FusedMoeConfig, _align, fused_moe, fused_moe_ref

pytestmark = pytest.mark.kernels


def make_moe(
    num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 x, w13, w2, routing weights and distinct random ids per token."""
    x = torch.randn(num_tokens, hidden, device=device)
    # 1/sqrt(fan_in) keeps every stage's values O(1), so tolerances scale with the output.
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=device) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, device=device) / inter**0.5
    weights = torch.rand(num_tokens, top_k, device=device)
    ids = torch.rand(num_tokens, num_experts, device=device).argsort(dim=1)[:, :top_k]
    return x, w13, w2, weights, ids


def quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [E, N, K] -> fp8, scales
    pairs = [block_quant_fp8(we, (128, 128)) for we in w]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def assert_moe_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Triton and the reference round at the same points (the output dtype after each GEMM, the
    routing product, each add of a token's experts); they differ only in the GEMMs' float32
    summation order, which now and then flips an intermediate's rounding by one unit. Such a flip
    moves the output by far less than one unit at the output's scale: allow one unit (eps times
    the largest |value|) absolute plus two units relative."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    eps = torch.finfo(expected.dtype).eps
    scale = expected.abs().max().item() if expected.numel() else 1.0
    if expected.dtype == torch.float32:
        # The float32 GEMMs' order differences are ~K * eps relative, well inside 1e-5.
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)
    else:
        torch.testing.assert_close(actual, expected, rtol=2 * eps, atol=eps * scale)


def naive_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """The formula, token by token, in float64."""
    x, w13, w2, weights = x.double(), w13.double(), w2.double(), weights.double()
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < w13.shape[0]:
                continue
            h = w13[e] @ x[t]
            out[t] += weights[t, j] * (w2[e] @ (F.silu(h[:inter]) * h[inter:]))
    return out


def test_reference_matches_naive_loop() -> None:
    x, w13, w2, weights, ids = make_moe(9, 6, 3, 40, 24, torch.device("cpu"))
    ids[0, 0] = -1  # out of range: contributes nothing on every path
    ids[1, 2] = 6
    expected = naive_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(fused_moe_ref(x.double(), w13.double(), w2.double(), weights, ids), expected)
    torch.testing.assert_close(fused_moe_ref(x, w13, w2, weights, ids), expected.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_reference_is_hf_experts(dtype: torch.dtype) -> None:
    """Bit for bit Hugging Face's DeepseekV3Experts: the same rounding points and order."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    config = transformers.DeepseekV3Config(
        hidden_size=48, moe_intermediate_size=40, n_routed_experts=8, num_experts_per_tok=3
    )
    x, w13, w2, weights, ids = make_moe(13, 8, 3, 48, 40, torch.device("cpu"))
    experts = DeepseekV3Experts(config).to(dtype)
    with torch.no_grad():
        experts.gate_up_proj.copy_(w13)
        experts.down_proj.copy_(w2)
        expected = experts(x.to(dtype), ids, weights)
    actual = fused_moe_ref(x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)
    assert torch.equal(actual, expected)


# (tokens, experts, top_k, intermediate, routing): I = 96 is ragged against 64- and 128-wide
# tiles, 32 is not; "skewed" leaves most experts without tokens, "one" sends every token's first
# choice to expert 0 (33 tokens: three BLOCK_M=16 blocks of one expert).
CPU_CASES = [
    (1, 4, 1, 32, "random"),
    (7, 4, 2, 96, "random"),
    (7, 8, 3, 32, "skewed"),
    (33, 8, 1, 96, "one"),
    (33, 4, 3, 32, "one"),
    (33, 8, 2, 96, "skewed"),
]
# DeepSeek-V2-Lite's routed experts: decode batches and a prefill.
CUDA_CASES = [(1, 64, 6, 1408, "random"), (128, 64, 6, 1408, "skewed"), (2048, 64, 6, 1408, "random")]


def route(ids: torch.Tensor, num_experts: int, routing: str) -> torch.Tensor:
    if routing == "skewed":  # only experts 1 and 3 (and the top_k - 2 after 3, if needed)
        allowed = torch.tensor([1, 3, 4, 5, 6, 7][: max(2, ids.shape[1])], device=ids.device)
        order = torch.rand(ids.shape[0], allowed.numel(), device=ids.device).argsort(dim=1)
        return allowed[order[:, : ids.shape[1]]]
    if routing == "one":
        ids = torch.where(ids == 0, ids[:, :1], ids)  # keep ids distinct per token
        ids[:, 0] = 0
    return ids


def test_matches_reference(device: torch.device) -> None:
    cpu = device.type == "cpu"
    hidden = 64 if cpu else 2048
    dtypes = [torch.float32, torch.float16] if cpu else [torch.float32, torch.bfloat16]
    for num_tokens, num_experts, top_k, inter, routing in CPU_CASES if cpu else CUDA_CASES:
        x, w13, w2, weights, ids = make_moe(num_tokens, num_experts, top_k, hidden, inter, device)
        ids = route(ids, num_experts, routing)
        for dtype in dtypes:
            args = (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids.int())
            assert_moe_close(fused_moe(*args), fused_moe_ref(*args))


@pytest.mark.parametrize(
    "config",
    [
        FusedMoeConfig(block_m=16, block_n=32, block_k=16, group_m=2),  # several K steps, swizzled
        FusedMoeConfig(block_m=32, block_n=128, block_k=64, group_m=8, num_warps=8),
    ],
    ids=["small", "large"],
)
def test_config_override(device: torch.device, config: FusedMoeConfig) -> None:
    hidden, inter = (80, 48) if device.type == "cpu" else (2048, 1408)  # 80, 48: ragged K steps
    x, w13, w2, weights, ids = make_moe(20, 8, 2, hidden, inter, device)
    x = torch.randn(20, 2 * hidden, device=device)[:, ::2]  # strided rows and columns
    expected = fused_moe_ref(x, w13, w2, weights, ids)
    assert_moe_close(fused_moe(x, w13, w2, weights, ids, config=config), expected)


# The intermediate rows of unrouted pairs are never written, and silu_and_mul runs over whatever
# they hold (nothing reads its result): under the interpreter numpy may warn about it.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_out_of_range_ids_contribute_nothing(device: torch.device) -> None:
    # Not an error (detecting it would need a host sync); an expert-parallel rank can use it to
    # drop another rank's experts.
    x, w13, w2, weights, ids = make_moe(5, 4, 2, 64, 32, device)
    ids[0, 1], ids[2, 0], ids[3] = -1, 4, torch.tensor([7, 9])
    expected = fused_moe_ref(x, w13, w2, weights, ids)
    assert torch.equal(expected[3], torch.zeros_like(expected[3]))
    assert_moe_close(fused_moe(x, w13, w2, weights, ids), expected)


@pytest.mark.parametrize("block_m", [16, 32])
def test_align_sorts_and_pads_by_expert(device: torch.device, block_m: int) -> None:
    ids = torch.tensor([3, 0, 3, 3, 5, 0, 9, -1] * 5, device=device)  # 9, -1: out of range for E=6
    sorted_ids, expert_ids, num_post_padded = _align(ids, 6, block_m)
    used = int(num_post_padded)
    counts = {0: 10, 3: 15, 5: 5}
    assert used == len(counts) * block_m
    pairs = sorted_ids[:used].view(-1, block_m)
    for block, expert in zip(pairs, expert_ids[: used // block_m].tolist()):
        real = block[block < ids.numel()]
        assert torch.all(ids[real.long()] == expert)
        assert real.numel() == counts[expert] and torch.all(real.diff() > 0)  # pair order
        assert torch.all(block[real.numel() :] == ids.numel())  # then the pad sentinel


def assert_fp8_moe_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The reference and the kernel quantize x and the intermediate by the same rule (bit for bit:
    test_fp8 checks it) and multiply the same fp8 operands. They still differ by the sums: on CPU
    float32 summation order; on the GPU the FP8 MMA's reduced-precision accumulator inside each
    128-deep K step (~2^-9 of the sum of |products|, as test_fp8 allows for fp8_gemm). Either
    way a gemm-1 result can round to x.dtype differently, and where that element sits at an E4M3
    rounding boundary of the intermediate's quantization (or is its group's amax) its fp8 code
    moves by a whole E4M3 step (2^-4..2^-3 relative). Measured on an H100 at V2-Lite's shapes:
    6e-3 in norm, at most 1.1% of the output's scale in one element (5e-4 in norm with exact
    accumulation, i.e. max_num_imprecise_acc=0, which costs 1.2-1.9x); both ~10x below the error
    of FP8 itself (test_fp8_reference_is_close_to_unquantized). Bounds: no element off by more
    than one E4M3 step at the output's scale; in norm 2^-8 on CPU, 2^-6 on the GPU."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    diff = actual.float() - expected.float()
    norm_bound = 2**-8 if actual.device.type == "cpu" else 2**-6
    assert diff.abs().max().item() <= 2**-4 * expected.abs().max().item()
    assert diff.norm().item() <= norm_bound * expected.float().norm().item()


def test_fp8_matches_reference(device: torch.device) -> None:
    cpu = device.type == "cpu"
    # 256 x 160: two 128-blocks along H and I, the last one ragged.
    shapes = [(7, 4, 2, 64, 32), (9, 4, 2, 256, 160)]
    if not cpu:
        shapes = [(1, 64, 6, 2048, 1408), (512, 64, 6, 2048, 1408)]
    dtypes = [torch.float32, torch.float16] if cpu else [torch.bfloat16]
    for num_tokens, num_experts, top_k, hidden, inter in shapes:
        x, w13, w2, weights, ids = make_moe(num_tokens, num_experts, top_k, hidden, inter, device)
        (w13_q, w13_s), (w2_q, w2_s) = quantize_experts(w13), quantize_experts(w2)
        for dtype in dtypes:
            args = (x.to(dtype), w13_q, w2_q, weights, ids)
            actual = fused_moe(*args, w13_scale=w13_s, w2_scale=w2_s)
            assert_fp8_moe_close(actual, fused_moe_ref(*args, w13_scale=w13_s, w2_scale=w2_s))


def test_fp8_reference_is_close_to_unquantized() -> None:
    """E4M3 keeps 3 mantissa bits: each quantized operand is off by up to 2^-4 relative (RMS about
    2^-4 / sqrt(3) = 3.6%). The output sees four of them (x, w13, the intermediate, w2), errors
    that add in quadrature: about 7% RMS expected (6% measured), bounded here by 10%. A wrong
    scale block would be off by far more."""
    x, w13, w2, weights, ids = make_moe(16, 4, 2, 256, 160, torch.device("cpu"))
    (w13_q, w13_s), (w2_q, w2_s) = quantize_experts(w13), quantize_experts(w2)
    exact = fused_moe_ref(x, w13, w2, weights, ids)
    for dtype in (torch.float32, torch.bfloat16):
        quantized = fused_moe_ref(x.to(dtype), w13_q, w2_q, weights, ids, w13_scale=w13_s, w2_scale=w2_s)
        assert ((quantized.float() - exact).norm() / exact.norm()).item() < 0.1


def test_empty_batch(device: torch.device) -> None:
    x, w13, w2, weights, ids = make_moe(0, 4, 2, 64, 32, device)
    (w13_q, w13_s), (w2_q, w2_s) = quantize_experts(w13), quantize_experts(w2)
    for enabled in (False, True):
        with reference_mode(enabled):
            assert fused_moe(x, w13, w2, weights, ids).shape == (0, 64)
            out = fused_moe(x.half(), w13_q, w2_q, weights, ids, w13_scale=w13_s, w2_scale=w2_s)
            assert out.shape == (0, 64) and out.dtype == torch.float16


def test_reference_switch_routes_to_reference() -> None:
    x, w13, w2, weights, ids = make_moe(5, 4, 2, 64, 32, torch.device("cpu"))
    with reference_mode(True):
        assert torch.equal(fused_moe(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_in_cuda_graph(device: torch.device, fp8: bool) -> None:
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    x, w13, w2, weights, ids = make_moe(8, 64, 6, 2048, 1408, device)
    x, w13, w2 = x.bfloat16(), w13.bfloat16(), w2.bfloat16()
    w13_s = w2_s = None
    if fp8:
        (w13, w13_s), (w2, w2_s) = quantize_experts(w13), quantize_experts(w2)
    fused_moe(x, w13, w2, weights, ids, w13_scale=w13_s, w2_scale=w2_s)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids, w13_scale=w13_s, w2_scale=w2_s)
    x.copy_(torch.randn_like(x))
    ids.copy_(torch.rand(8, 64, device=device).argsort(dim=1)[:, :6])  # new routing
    graph.replay()
    assert torch.equal(out, fused_moe(x, w13, w2, weights, ids, w13_scale=w13_s, w2_scale=w2_s))


def test_bad_arguments_raise() -> None:
    x, w13, w2, weights, ids = make_moe(3, 4, 2, 64, 32, torch.device("cpu"))
    (w13_q, w13_s), (w2_q, w2_s) = quantize_experts(w13), quantize_experts(w2)
    cases = [
        (lambda: fused_moe(x[None], w13, w2, weights, ids), "x must be"),
        (lambda: fused_moe(x.int(), w13, w2, weights, ids), "x must have dtype"),
        (lambda: fused_moe(x, w13[:, :, :32], w2, weights, ids), "w13 must be"),
        (lambda: fused_moe(x, w13[:, :63], w2, weights, ids), "w13 must be"),
        (lambda: fused_moe(x, w13, w2[:3], weights, ids), "w2 must be"),
        (lambda: fused_moe(x, w13, w2, weights[:, :1], ids), "topk_ids"),
        (lambda: fused_moe(x, w13, w2, weights[:2], ids[:2]), "topk_ids"),
        (lambda: fused_moe(x, w13, w2, weights.half(), ids), "topk_weights must have dtype"),
        (lambda: fused_moe(x, w13, w2, weights, ids.float()), "topk_ids must have dtype"),
        (lambda: fused_moe(x, w13.half(), w2, weights, ids), "x's dtype"),
        (lambda: fused_moe(x, w13_q, w2_q, weights, ids), "x's dtype"),
        (lambda: fused_moe(x, w13_q, w2_q, weights, ids, w13_scale=w13_s), "both"),
        (lambda: fused_moe(x, w13, w2, weights, ids, w13_scale=w13_s, w2_scale=w2_s), "w13 must have dtype"),
        (
            lambda: fused_moe(x, w13_q, w2_q, weights, ids, w13_scale=w13_s, w2_scale=w2_s.expand(4, 2, 1)),
            "w2_scale must be",
        ),
        (lambda: fused_moe(x, w13_q, w2_q, weights, ids, w13_scale=w13_s.double(), w2_scale=w2_s), "dtype"),
        (lambda: fused_moe(x, w13, w2, weights, ids, config=FusedMoeConfig(block_m=8)), "power of two"),
        (
            lambda: fused_moe(
                x, w13_q, w2_q, weights, ids, w13_scale=w13_s, w2_scale=w2_s, config=FusedMoeConfig()
            ),
            "block_k == 128",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=rf"fused_moe: .*{message}"):
            call()
