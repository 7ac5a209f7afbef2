"""Producers that quantize their own output for an FP8 linear (`rmsnorm_fp8`,
`silu_and_mul_fp8`): the same codes and scales as the unfused producer followed by
`per_token_group_quant_fp8`, bit for bit, kernel against kernel and reference against reference;
and an FP8 linear of the quantized activation equal to one of the float activation."""

from __future__ import annotations

import pytest
import torch

from kernels.activation import silu_and_mul, silu_and_mul_fp8, silu_and_mul_fp8_ref, silu_and_mul_ref
from kernels.fp8_gemm import fp8_linear, fp8_linear_ref
from kernels.fp8_quant import (
    FP8_DTYPE,
    Fp8Activation,
    block_quant_fp8,
    per_token_group_quant_fp8,
    per_token_group_quant_fp8_ref,
)
from kernels.rmsnorm import (
    fused_add_rmsnorm,
    fused_add_rmsnorm_ref,
    rmsnorm,
    rmsnorm_fp8,
    rmsnorm_fp8_ref,
    rmsnorm_ref,
)

pytestmark = pytest.mark.kernels


def _dtypes(device: torch.device) -> list[torch.dtype]:
    # The interpreter truncates bfloat16 casts (tests/kernels/test_activation.py): not on CPU.
    return [torch.float32, torch.float16] if device.type == "cpu" else [torch.bfloat16]


def assert_same_activation(
    got: Fp8Activation, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
) -> None:
    assert got.codes.dtype == FP8_DTYPE and got.dtype == dtype
    assert torch.equal(got.codes.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(got.scales, scales)


# 200: a ragged last group; 384: three whole groups; 40: one ragged group, smaller than a group.
@pytest.mark.parametrize("hidden", [40, 200, 384])
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add+norm"])
def test_rmsnorm_fp8_equals_the_norm_then_the_quantization(
    device: torch.device, hidden: int, with_residual: bool
) -> None:
    for dtype in _dtypes(device):
        x = (3 * torch.randn(5, hidden, device=device)).to(dtype)
        residual = torch.randn(5, hidden, device=device).to(dtype) if with_residual else None
        weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
        got, new_residual = rmsnorm_fp8(x, residual, weight, 1e-6)
        if residual is None:
            normed, expected_residual = rmsnorm(x, weight, 1e-6), None
        else:
            normed, expected_residual = fused_add_rmsnorm(x, residual, weight, 1e-6)
        assert_same_activation(got, *per_token_group_quant_fp8(normed, 128), dtype)
        assert (new_residual is None) == (expected_residual is None)
        if expected_residual is not None:
            assert new_residual is not None and torch.equal(new_residual, expected_residual)
        # The reference composes the references the same way.
        ref, ref_residual = rmsnorm_fp8_ref(x, residual, weight, 1e-6)
        if residual is None:
            ref_normed = rmsnorm_ref(x, weight, 1e-6)
        else:
            ref_normed, expected = fused_add_rmsnorm_ref(x, residual, weight, 1e-6)
            assert ref_residual is not None and torch.equal(ref_residual, expected)
        assert_same_activation(ref, *per_token_group_quant_fp8_ref(ref_normed, 128), dtype)


@pytest.mark.parametrize("inter", [48, 1500, 2048])  # one ragged group; two programs, ragged; whole
def test_silu_and_mul_fp8_equals_the_activation_then_the_quantization(
    device: torch.device, inter: int
) -> None:
    for dtype in _dtypes(device):
        x = (2 * torch.randn(3, 2 * inter, device=device)).to(dtype)
        got = silu_and_mul_fp8(x)
        assert_same_activation(got, *per_token_group_quant_fp8(silu_and_mul(x), 128), dtype)
        ref = silu_and_mul_fp8_ref(x)
        assert_same_activation(ref, *per_token_group_quant_fp8_ref(silu_and_mul_ref(x), 128), dtype)


def test_fp8_linear_of_a_quantized_activation_equals_the_float_one(device: torch.device) -> None:
    hidden, out = 256, 192
    x = torch.randn(4, hidden, device=device)
    weight = torch.ones(hidden, device=device)
    w_q, w_s = block_quant_fp8(0.05 * torch.randn(out, hidden, device=device))
    bias = torch.randn(out, device=device)
    normed = rmsnorm(x, weight, 1e-6)
    activation, _ = rmsnorm_fp8(x, None, weight, 1e-6)
    # The kernels (the interpreter on CPU: the tensor-core GEMV for these few rows), and the
    # reference FP8 layers run on CPU.
    for linear in (fp8_linear, fp8_linear_ref):
        assert torch.equal(linear(activation, w_q, w_s, bias), linear(normed, w_q, w_s, bias))


def test_bad_group_sizes_are_refused() -> None:
    x = torch.randn(2, 96)
    with pytest.raises(ValueError, match="power of two"):
        rmsnorm_fp8(x, None, torch.ones(96), 1e-6, group_size=96)
    with pytest.raises(ValueError, match="power of two"):
        silu_and_mul_fp8(x, group_size=0)
