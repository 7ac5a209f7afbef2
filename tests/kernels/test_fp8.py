"""Block-wise FP8 W8A8: quantization and the scaled FP8 matmul, Triton against the torch
references, and the references against the unquantized float32 product.

Error bounds used below (E4M3: 3 mantissa bits, smallest normal 2^-6, subnormal step 2^-9). A
value v = x / scale with |v| <= 448 rounds to nearest with
    |v - q| <= 2^-4 |v|   (normal: half a step of 2^(e-3), relative to |v| >= 2^e)
    |v - q| <= 2^-10      (subnormal: half of 2^-9)
so in x's units |x - q * scale| <= 2^-4 |x| + 2^-10 scale, plus float32 rounding of the division
and of the product (2^-20 |x| covers both with room to spare).

Triton against the references: quantization is bit-exact (the kernel rounds to the E4M3 grid in
float32 before casting, so neither the GPU's cvt nor the interpreter's broken cast decides). The
matmul differs only in how the float32 sums are ordered (|err| <= 2^-14 * sum |a_k w_k| here) and,
on the GPU, in the FP8 MMA's reduced-precision accumulation inside one 128-column step (2^-9 *
sum |a_k w_k|), plus one rounding of the output dtype.
"""

from __future__ import annotations

import pytest
import torch

from kernels import fp8_gemm
from kernels import gemv as fp8_gemv_module
from kernels.config import reference_mode
from kernels.fp8_gemm import (
    fp8_bmm,
    fp8_bmm_ref,
    fp8_linear,
    fp8_linear_ref,
    w8a8_block_fp8_bmm,
    w8a8_block_fp8_bmm_ref,
    w8a8_block_fp8_matmul,
    w8a8_block_fp8_matmul_ref,
)
from kernels.fp8_quant import (
    FP8_DTYPE,
    FP8_EPS,
    FP8_MAX,
    block_dequant_fp8,
    block_quant_fp8,
    expand_block_scale,
    per_token_group_quant_fp8,
    per_token_group_quant_fp8_ref,
)
from kernels.gemv import fp8_gemv

pytestmark = pytest.mark.kernels

FLOAT32_SLACK = 2**-20


def dtypes(device: torch.device) -> list[torch.dtype]:
    # float16 on CPU: the interpreter truncates bfloat16 casts.
    return [torch.float32, torch.float16] if device.type == "cpu" else [torch.float32, torch.bfloat16]


def quant_error_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest |x - dequantized x| E4M3 rounding allows, per element (`scale` expanded to x)."""
    return (2**-4 + FLOAT32_SLACK) * x.float().abs() + 2**-10 * scale


def group_scale(scale: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    return scale.repeat_interleave(group_size, dim=-1)[..., :k]  # [..., K]


def wide_range(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Normal values over nine decades, so groups hold E4M3 subnormals as well as normals."""
    return torch.randn(shape, device=device) * torch.logspace(-6, 3, shape[-1], device=device)


def assert_same_quant(
    actual: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor]
) -> None:
    q, scale = actual
    q_ref, scale_ref = expected
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32
    assert q.shape == q_ref.shape and scale.shape == scale_ref.shape
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_per_token_group_quant_matches_reference(device: torch.device) -> None:
    # (M, K, group_size): one ragged group (K = 96, a tiny model), a ragged last group, several
    # groups per program, a group size that is not a power of two.
    if device.type == "cpu":
        cases = [(5, 96, 128), (7, 300, 128), (4, 256, 64), (3, 250, 50)]
    else:
        cases = [(4096, 4096, 128), (33, 14336, 128), (3, 96, 128), (9, 1000, 100)]
    for dtype in dtypes(device):
        for m, k, group_size in cases:
            x = wide_range((m, k), device).to(dtype)
            assert_same_quant(
                per_token_group_quant_fp8(x, group_size), per_token_group_quant_fp8_ref(x, group_size)
            )


def test_per_token_group_quant_takes_strided_views(device: torch.device) -> None:
    base = torch.randn((6, 3 * 128), device=device)
    for x in (base[:, 64:], base[:, 64:].t(), base[::2, :]):  # [6, 320] rows 384 apart, [320, 6], [3, 384]
        assert_same_quant(per_token_group_quant_fp8(x, 128), per_token_group_quant_fp8_ref(x, 128))


def test_per_token_group_quant_error_bound(device: torch.device) -> None:
    m, k, group_size = (6, 200, 64) if device.type == "cpu" else (512, 4096, 128)
    x = wide_range((m, k), device)
    x[1] = 0.0  # an all-zero row: scale EPS / MAX, q zeros
    q, scale = per_token_group_quant_fp8(x, group_size)
    expanded = group_scale(scale, k, group_size)
    assert ((x - q.float() * expanded).abs() <= quant_error_bound(x, expanded)).all()
    # Each group's largest magnitude lands on +-448: the format's range is used in full.
    amax = torch.nn.functional.pad(q.float().abs(), (0, -k % group_size)).view(m, -1, group_size).amax(-1)
    assert (amax[0] == FP8_MAX).all() and (amax[2:] == FP8_MAX).all()
    assert (q[1].float() == 0).all() and (scale[1] == torch.tensor(FP8_EPS) / FP8_MAX).all()


def test_per_token_group_quant_empty(device: torch.device) -> None:
    q, scale = per_token_group_quant_fp8(torch.empty((0, 96), device=device), 64)
    assert q.shape == (0, 96) and q.dtype == FP8_DTYPE and scale.shape == (0, 2)


def test_block_quant_bound_and_shapes(device: torch.device) -> None:
    w = wide_range((200, 300), device)
    w_q, scale_inv = block_quant_fp8(w, (128, 128))
    assert w_q.shape == (200, 300) and w_q.dtype == FP8_DTYPE and scale_inv.shape == (2, 3)
    expanded = expand_block_scale(scale_inv, w.shape, (128, 128))
    deq = block_dequant_fp8(w_q, scale_inv, (128, 128), torch.float32)
    assert ((w - deq).abs() <= quant_error_bound(w, expanded)).all()
    # Ragged edge blocks take their scale from their real elements only.
    assert scale_inv[1, 2] == w[128:, 256:].abs().max() / torch.tensor(FP8_MAX, device=device)
    # One-row blocks are per-token groups: the two quantizers agree.
    assert_same_quant(block_quant_fp8(w, (1, 64)), per_token_group_quant_fp8_ref(w, 64))


def test_block_quant_round_trip(device: torch.device) -> None:
    # E4M3 values with a +-448 in every block and power-of-two scales dequantize exactly, so
    # quantizing the result must give back the same codes and scales.
    block = (64, 32)
    codes = torch.randn((100, 80), device=device).clamp(-3, 3) * 100
    codes[::64, ::32] = FP8_MAX
    q0 = codes.to(FP8_DTYPE)
    s0 = 2.0 ** torch.randint(-12, 4, (2, 3), device=device).float()
    w = block_dequant_fp8(q0, s0, block, torch.float32)
    assert_same_quant(block_quant_fp8(w, block), (q0, s0))
    assert block_dequant_fp8(q0, s0, block, torch.bfloat16).dtype == torch.bfloat16


def quantized_operands(
    m: int, n: int, k: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K], w [N, K] and their quantized forms (a_q, a_s, w_q, w_s)."""
    x = torch.randn((m, k), device=device)
    w = torch.randn((n, k), device=device) / k**0.5
    a_q, a_s = per_token_group_quant_fp8_ref(x, 128)
    w_q, w_s = block_quant_fp8(w, (128, 128))
    return x, w, a_q, a_s, w_q, w_s


def assert_gemm_close(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, rel: float) -> None:
    """|out - ref| <= rel * magnitude (sum of |products|) plus one rounding of out's dtype."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    rounding = 0.0 if ref.dtype == torch.float32 else torch.finfo(ref.dtype).eps
    err = (out.float() - ref.float()).abs()
    tol = rel * magnitude + rounding * ref.float().abs() + 1e-30
    worst = (err / tol).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.3g}x the tolerance"


def sum_order_tolerance(device: torch.device) -> float:
    # CPU: float32 sums in another order. GPU: the FP8 MMA's own accumulator inside a K step.
    return 2**-14 if device.type == "cpu" else 2**-9


def gemm_shapes(device: torch.device) -> list[tuple[int, int, int]]:
    if device.type == "cpu":
        return [(m, n, k) for m in (1, 5, 33) for n, k in ((48, 64), (160, 96), (160, 256))]
    return [(m, n, k) for m in (1, 5, 33, 300) for n, k in ((160, 96), (4096, 4096), (1000, 14336))]


def test_matmul_matches_reference(device: torch.device) -> None:
    for m, n, k in gemm_shapes(device):
        _, _, a_q, a_s, w_q, w_s = quantized_operands(m, n, k, device)
        a, w = a_q.float() * group_scale(a_s, k, 128), block_dequant_fp8(w_q, w_s)
        magnitude = a.abs() @ w.abs().t()  # [M, N]
        for dtype in dtypes(device):
            out = w8a8_block_fp8_matmul(a_q, a_s, w_q, w_s, dtype)
            ref = w8a8_block_fp8_matmul_ref(a_q, a_s, w_q, w_s, dtype)
            assert_gemm_close(out, ref, magnitude, sum_order_tolerance(device))


def test_matmul_close_to_unquantized_product(device: torch.device) -> None:
    for m, n, k in gemm_shapes(device):
        x, w, a_q, a_s, w_q, w_s = quantized_operands(m, n, k, device)
        w_deq = block_dequant_fp8(w_q, w_s)
        # |x'w' - xw| <= |x' - x| |w'| + |x| |w' - w|, each difference within its rounding bound.
        x_err = quant_error_bound(x, group_scale(a_s, k, 128))
        w_err = quant_error_bound(w, expand_block_scale(w_s, w.shape, (128, 128)))
        bound = x_err @ w_deq.abs().t() + x.abs() @ w_err.t()
        magnitude = x.abs() @ w.abs().t()
        out = w8a8_block_fp8_matmul(a_q, a_s, w_q, w_s, torch.float32)
        exact = x @ w.t()
        worst = ((out - exact).abs() / (bound + 2 * sum_order_tolerance(device) * magnitude)).max().item()
        assert worst <= 1.0, f"error {worst:.3g}x the bound"
        # Typical error is far below the worst case: random rounding errors mostly cancel.
        assert (out - exact).norm() <= 0.08 * exact.norm()


def test_fp8_linear_matches_reference(device: torch.device) -> None:
    t, n, k = (7, 160, 300) if device.type == "cpu" else (1024, 6144, 4096)
    w = torch.randn((n, k), device=device) / k**0.5
    w_q, w_s = block_quant_fp8(w, (128, 128))
    for dtype in dtypes(device):
        x = torch.randn((2, t, k), device=device).to(dtype)
        bias = torch.randn(n, device=device).to(dtype)
        ref = fp8_linear_ref(x, w_q, w_s, bias)
        a_q, a_s = per_token_group_quant_fp8_ref(x.reshape(-1, k), 128)
        a = a_q.float() * group_scale(a_s, k, 128)
        magnitude = (a.abs() @ block_dequant_fp8(w_q, w_s).abs().t()).view(2, t, n)
        # The bias is added in the matmul's epilogue, or after the split-K sum.
        for config in (None, {"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": 3}):
            out = fp8_linear(x, w_q, w_s, bias, config=config)
            assert out.shape == (2, t, n)
            assert_gemm_close(out, ref, magnitude + bias.float().abs(), sum_order_tolerance(device))


def test_fp8_linear_quantizes_few_tokens_in_the_gemm(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Up to FUSED_QUANT_MAX_M tokens the GEMM quantizes x itself, with the quantization kernel's
    # codes and scales: only the order of the sums differs from the reference. M = 1 quantizes
    # one row and repeats it; M = 5 (the threshold raised to reach it) a whole row tile. K = 64
    # is one ragged group, K = 256 two whole ones (so SPLIT_K 2 really splits).
    quantize_calls: list[int] = []

    def spy(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        quantize_calls.append(x.shape[0])
        return per_token_group_quant_fp8(x, group_size)

    monkeypatch.setattr(fp8_gemm, "per_token_group_quant_fp8", spy)
    # The real threshold: fused up to it, the separate quantization kernel past it, and for K
    # steps narrower than a group (each step needs its group's amax). A config pins this
    # tensor-core path (without one, few tokens take the GEMV).
    n = 160 if device.type == "cpu" else 4096
    limit = fp8_gemm.FUSED_QUANT_MAX_M
    tiles = {"BLOCK_N": 64}
    w_q, w_s = block_quant_fp8(torch.randn((n, 128), device=device), (128, 128))
    x = torch.randn((limit + 1, 128), device=device)
    fp8_linear(x[:limit], w_q, w_s, config=tiles)
    assert quantize_calls == []
    fp8_linear(x, w_q, w_s, config=tiles)
    fp8_linear(x[:1], w_q, w_s, config={"BLOCK_K": 32})
    assert quantize_calls == [limit + 1, 1]

    monkeypatch.setattr(fp8_gemm, "FUSED_QUANT_MAX_M", 16)
    ks, ms = ((64, 256), (1, 5)) if device.type == "cpu" else ((4096, 14336), (1, 5, 16))
    for k in ks:
        w_q, w_s = block_quant_fp8(torch.randn((n, k), device=device) / k**0.5, (128, 128))
        for m in ms:
            for dtype in dtypes(device):
                x = torch.randn((m, k), device=device).to(dtype)
                x[0, :3] = torch.tensor([300.0, -1e-4, 0.0])  # a large value beside E4M3 subnormals
                bias = torch.randn(n, device=device).to(dtype)
                ref = fp8_linear_ref(x, w_q, w_s, bias)
                a_q, a_s = per_token_group_quant_fp8_ref(x, 128)
                a = a_q.float() * group_scale(a_s, k, 128)
                magnitude = a.abs() @ block_dequant_fp8(w_q, w_s).abs().t() + bias.float().abs()
                for config in ({"BLOCK_N": 64}, {"SPLIT_K": 1}, {"BLOCK_N": 32, "SPLIT_K": 2}):
                    out = fp8_linear(x, w_q, w_s, bias, config=config)
                    assert_gemm_close(out, ref, magnitude, sum_order_tolerance(device))
    assert quantize_calls == [limit + 1, 1]


def test_reference_mode_routes_to_references() -> None:
    x = torch.randn((3, 96))
    w_q, w_s = block_quant_fp8(torch.randn((48, 96)), (128, 128))
    bias = torch.randn(48)
    with reference_mode(True):
        assert torch.equal(fp8_linear(x, w_q, w_s, bias), fp8_linear_ref(x, w_q, w_s, bias))
        xb = torch.randn((2, 3, 96))
        wb_q, wb_s = w_q.expand(2, -1, -1), w_s.expand(2, -1, -1)
        assert torch.equal(fp8_bmm(xb, wb_q, wb_s), fp8_bmm_ref(xb, wb_q, wb_s))


def test_bmm_takes_a_transposed_activation(device: torch.device) -> None:
    # MLA: a [T, H, K] activation is multiplied per head, as [H, T, K], without a copy.
    t, h, n, k = (5, 3, 96, 128) if device.type == "cpu" else (300, 16, 512, 128)
    x = torch.randn((t, h, k), device=device).transpose(0, 1)  # [H, T, K], strides (K, H*K, 1)
    w = torch.randn((h, n, k), device=device) / k**0.5
    quantized = [block_quant_fp8(w[i], (128, 128)) for i in range(h)]
    w_q = torch.stack([q for q, _ in quantized])  # [H, N, K]
    w_s = torch.stack([s for _, s in quantized])  # [H, 1, 1]
    a_q, a_s = per_token_group_quant_fp8_ref(x.reshape(h * t, k), 128)
    a = (a_q.float() * group_scale(a_s, k, 128)).view(h, t, k)
    magnitude = a.abs() @ block_dequant_fp8(w_q, w_s).abs().transpose(1, 2)
    tol = sum_order_tolerance(device)
    for dtype in dtypes(device):
        xd = x.to(dtype)
        assert_gemm_close(fp8_bmm(xd, w_q, w_s), fp8_bmm_ref(xd, w_q, w_s), magnitude, tol)
    # The fp8 operand itself as a strided view: [T, H, K] codes seen as [H, T, K].
    a_q_view = a_q.view(h, t, k).transpose(0, 1).contiguous().transpose(0, 1)
    out = w8a8_block_fp8_bmm(a_q_view, a_s.view(h, t, 1), w_q, w_s, torch.float32)
    ref = w8a8_block_fp8_bmm_ref(a_q.view(h, t, k), a_s.view(h, t, 1), w_q, w_s, torch.float32)
    assert_gemm_close(out, ref, magnitude, tol)


def test_config_override(device: torch.device) -> None:
    # A column tile wider than a weight block and a K step of half a group still use the right
    # scales; so does a smaller weight block than the tile, and K split over several programs.
    m, n, k = (9, 300, 320) if device.type == "cpu" else (300, 1000, 4000)
    _, w, a_q, a_s, _, _ = quantized_operands(m, n, k, device)
    a = a_q.float() * group_scale(a_s, k, 128)
    for block, config in (
        ((128, 128), {"BLOCK_M": 32, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 2}),
        ((64, 128), {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2}),
        ((128, 128), {"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": 2}),  # the last split is ragged
        ((128, 128), {"BLOCK_M": 16, "BLOCK_N": 256, "SPLIT_K": 8}),  # clipped to the K steps
    ):
        w_q, w_s = block_quant_fp8(w, block)
        magnitude = a.abs() @ block_dequant_fp8(w_q, w_s, block).abs().t()
        out = w8a8_block_fp8_matmul(a_q, a_s, w_q, w_s, torch.float32, block, config=config)
        ref = w8a8_block_fp8_matmul_ref(a_q, a_s, w_q, w_s, torch.float32, block)
        assert_gemm_close(out, ref, magnitude, sum_order_tolerance(device))


def test_empty_batch(device: torch.device) -> None:
    _, _, _, _, w_q, w_s = quantized_operands(1, 48, 64, device)
    out = fp8_linear(torch.empty((0, 64), device=device, dtype=torch.float16), w_q, w_s)
    assert out.shape == (0, 48) and out.dtype == torch.float16
    a_q, a_s = per_token_group_quant_fp8(torch.empty((0, 64), device=device), 128)
    assert w8a8_block_fp8_matmul(a_q, a_s, w_q, w_s, torch.bfloat16).shape == (0, 48)


def test_fp8_linear_in_cuda_graph(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    w_q, w_s = block_quant_fp8(torch.randn((4096, 4096), device=device) / 64, (128, 128))
    for m in (1, 8):  # the GEMV (split K: two launches) and the tensor-core GEMM
        x = torch.randn((m, 4096), device=device, dtype=torch.bfloat16)
        fp8_linear(x, w_q, w_s)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fp8_linear(x, w_q, w_s)
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(out, fp8_linear(x, w_q, w_s))


def test_bad_arguments_raise() -> None:
    x, _, a_q, a_s, w_q, w_s = quantized_operands(3, 48, 96, torch.device("cpu"))
    f32 = torch.float32
    cases = [
        (lambda: per_token_group_quant_fp8(x.view(3, 2, 48), 48), "per_token_group_quant_fp8: x must be"),
        (lambda: per_token_group_quant_fp8(x.to(torch.int32), 128), "x must have dtype"),
        (lambda: per_token_group_quant_fp8(x, 0), "group_size must be >= 1"),
        (lambda: block_quant_fp8(x, (0, 128)), "block must be two positive sizes"),
        (lambda: w8a8_block_fp8_matmul(x, a_s, w_q, w_s, f32), "a_q must have dtype"),
        (lambda: w8a8_block_fp8_matmul(a_q, a_s.double(), w_q, w_s, f32), "a_s must have dtype"),
        (lambda: w8a8_block_fp8_matmul(a_q, a_s, w_q[:, :64], w_s, f32), "K differs"),
        (lambda: w8a8_block_fp8_matmul(a_q, a_s[:2], w_q, w_s, f32), "a_s must be"),
        (lambda: w8a8_block_fp8_matmul(a_q, a_s, w_q, w_s.expand(2, 1), f32), "w_s must be"),
        (lambda: w8a8_block_fp8_matmul(a_q, a_s, w_q, w_s, torch.int8), "out_dtype must be"),
        (lambda: w8a8_block_fp8_matmul(a_q, a_s, w_q, w_s, f32, bias=torch.zeros(7)), "bias must be"),
        (lambda: w8a8_block_fp8_matmul(a_q, a_s, w_q, w_s, f32, (128, 96)), "power of two"),
        (lambda: w8a8_block_fp8_matmul(a_q, a_s, w_q, w_s, f32, config={"BLOCK": 1}), "unknown config"),
        (lambda: w8a8_block_fp8_matmul(a_q, a_s, w_q, w_s, f32, config={"BLOCK_K": 256}), "BLOCK_K"),
        (lambda: w8a8_block_fp8_bmm(a_q[None], a_s[None], w_q.expand(2, -1, -1), w_s[None], f32), "batch"),
        (lambda: fp8_linear(x, w_q, w_s.expand(2, 1)), "w_s must be"),
        (lambda: fp8_bmm(x, w_q, w_s), "fp8_bmm: x must be"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def gemv_cases(device: torch.device) -> list[tuple[int, int, int]]:
    # (M, N, K): one ragged group, a ragged last group and ragged N, several groups to split.
    if device.type == "cpu":
        return [(m, n, k) for m in (1, 3, 4) for n, k in ((48, 64), (160, 96), (160, 384))]
    return [(m, n, k) for m in (1, 2, 4) for n, k in ((160, 96), (6144, 4096), (1000, 14336))]


def gemv_launches(
    device: torch.device, mma: bool
) -> list[tuple[int, int, int, tuple[int, int], dict[str, int] | None]]:
    """(M, N, K, block, config): column tiles inside one weight block or straddling two (a
    64-row block), split K with partial last splits; on tensor cores (`mma`) 64- and 128-row
    tiles and up to 16 tokens (on the CPU each config once, on a shape that tests it)."""
    if not mma:
        configs = [
            ((128, 128), None),
            ((128, 128), {"BLOCK_N": 16, "SPLIT_K": 2}),
            ((64, 128), {"BLOCK_N": 128, "SPLIT_K": 4, "num_warps": 8}),
        ]
        return [(m, n, k, b, c) for m, n, k in gemv_cases(device) for b, c in configs]
    default, split, straddle = (
        ((128, 128), None),
        ((128, 128), {"BLOCK_N": 64, "SPLIT_K": 2}),
        ((64, 128), {"BLOCK_N": 128, "SPLIT_K": 4, "num_warps": 8}),
    )
    if device.type == "cpu":
        return [
            (1, 48, 64, *default),
            (3, 160, 384, *split),
            (16, 160, 96, *straddle),
            (16, 160, 384, *split),
            (1, 160, 384, *straddle),
        ]
    return [
        (m, n, k, *c)
        for m in (1, 2, 16)
        for _, n, k in gemv_cases(device)
        for c in (default, split, straddle)
    ]


@pytest.mark.parametrize("mma", [False, True], ids=["cuda_cores", "tensor_cores"])
@pytest.mark.parametrize("fuse_quant", [True, False])
def test_gemv_matches_reference(device: torch.device, fuse_quant: bool, mma: bool) -> None:
    # The GEMV quantizing x itself (the quantization kernel's codes and scales; on tensor cores
    # one token is quantized once and repeated) or given codes, the bias added after the sum.
    # Tensor cores sum a group in the MMA's own accumulator: the GEMM's tolerance.
    tolerance = sum_order_tolerance(device) if mma else 2**-14
    for m, n, k, block, config in gemv_launches(device, mma):
        w_q, w_s = block_quant_fp8(torch.randn((n, k), device=device) / k**0.5, block)
        for dtype in dtypes(device)[-1:] if mma else dtypes(device):
            x = torch.randn((m, k), device=device).to(dtype)
            x[0, :3] = torch.tensor([300.0, -1e-4, 0.0])  # a large value beside E4M3 subnormals
            bias = torch.randn(n, device=device).to(dtype)
            a_q, a_s = per_token_group_quant_fp8(x, 128)
            a = a_q.float() * group_scale(a_s, k, 128)
            magnitude = a.abs() @ block_dequant_fp8(w_q, w_s, block).abs().t() + bias.float().abs()
            ref = fp8_linear_ref(x, w_q, w_s, bias, block)
            if fuse_quant:
                out = fp8_gemv(x, None, w_q, w_s, dtype, block, bias, config, mma=mma)
            else:
                out = fp8_gemv(a_q, a_s, w_q, w_s, dtype, block, bias, config, mma=mma)
            assert_gemm_close(out, ref, magnitude, tolerance)


def test_few_tokens_take_the_gemv(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    # Up to GEMV_MAX_M tokens without a config: fp8_linear and the matmul run the GEMV (and
    # fp8_linear quantizes inside it where GEMV_FUSES_QUANT); more tokens, or a pinned tile
    # config, the tensor-core GEMM. (The tensor-core GEMV, which comes first, is off here: the
    # next test routes to it.)
    monkeypatch.setattr(fp8_gemm, "MMA_GEMV_MAX_M", 0)
    calls: list[tuple[int, bool]] = []
    real = fp8_gemv_module.fp8_gemv

    def spy(x: torch.Tensor, x_s: torch.Tensor | None, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append((x.shape[0], x_s is None))
        return real(x, x_s, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fp8_gemv_module, "fp8_gemv", spy)
    limit = fp8_gemv_module.GEMV_MAX_M
    n, k = (48, 96) if device.type == "cpu" else (4096, 4096)
    x, _, a_q, a_s, w_q, w_s = quantized_operands(limit + 1, n, k, device)
    fp8_linear(x[:limit], w_q, w_s)
    fp8_linear(x, w_q, w_s)
    fp8_linear(x[:1], w_q, w_s, config={"BLOCK_N": 32})
    w8a8_block_fp8_matmul(a_q[:1], a_s[:1], w_q, w_s, torch.float32)
    w8a8_block_fp8_matmul(a_q, a_s, w_q, w_s, torch.float32)
    assert calls == [(limit, fp8_gemv_module.GEMV_FUSES_QUANT), (1, False)]
    # M = 0 goes through the GEMV's wrapper to an empty result.
    out = fp8_linear(x[:0].half(), w_q, w_s)
    assert out.shape == (0, n) and out.dtype == torch.float16


def test_tensor_core_gemv_takes_few_tokens_when_switched_on(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With MMA_GEMV_MAX_M set (16 by default), fp8_linear and the matmul route up to that many
    # tokens (never past the kernel's 16, never with a pinned config) to it, the rest as before;
    # 0 switches it off.
    assert fp8_gemm.MMA_GEMV_MAX_M == 16
    monkeypatch.setattr(fp8_gemm, "MMA_GEMV_MAX_M", 0)
    calls: list[tuple[int, bool, bool]] = []
    real = fp8_gemv_module.fp8_gemv

    def spy(x: torch.Tensor, x_s: torch.Tensor | None, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append((x.shape[0], x_s is None, bool(kwargs.get("mma"))))
        return real(x, x_s, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fp8_gemv_module, "fp8_gemv", spy)
    n, k = (48, 96) if device.type == "cpu" else (4096, 4096)
    x, _, a_q, a_s, w_q, w_s = quantized_operands(32, n, k, device)
    fp8_linear(x[:4], w_q, w_s)
    assert calls == []
    monkeypatch.setattr(fp8_gemm, "MMA_GEMV_MAX_M", 32)
    out = fp8_linear(x[:16], w_q, w_s)
    fp8_linear(x[:17], w_q, w_s)
    fp8_linear(x[:1], w_q, w_s, config={"BLOCK_N": 32})
    w8a8_block_fp8_matmul(a_q[:2], a_s[:2], w_q, w_s, torch.float32)
    # x is quantized by its own launch first unless MMA_FUSES_QUANT (off: the H200's best).
    assert calls == [(16, fp8_gemv_module.MMA_FUSES_QUANT, True), (2, False, True)]
    monkeypatch.setattr(fp8_gemv_module, "MMA_FUSES_QUANT", not fp8_gemv_module.MMA_FUSES_QUANT)
    calls.clear()
    fused_or_not = fp8_linear(x[:16], w_q, w_s)
    assert calls == [(16, fp8_gemv_module.MMA_FUSES_QUANT, True)]
    torch.testing.assert_close(fused_or_not, out)  # the same codes and scales either way
    magnitude = x[:16].abs() @ block_dequant_fp8(w_q, w_s, (128, 128)).abs().t()
    assert_gemm_close(out, fp8_linear_ref(x[:16], w_q, w_s), 2 * magnitude, sum_order_tolerance(device))
