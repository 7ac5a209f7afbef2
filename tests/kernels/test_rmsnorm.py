"""RMSNorm and fused add + RMSNorm: Triton against the reference, the reference against the model's
RMSNorm module (which it must reproduce exactly)."""

from __future__ import annotations

import pytest
import torch

from kernels.rmsnorm import fused_add_rmsnorm, fused_add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from shared.models.layers.norm import RMSNorm
from tests.kernels import assert_close_to_rounding

pytestmark = pytest.mark.kernels


def dtypes(device: torch.device) -> list[torch.dtype]:
    # float16 on CPU checks the rounding order; the interpreter truncates bfloat16 casts.
    return [torch.float32, torch.float16] if device.type == "cpu" else [torch.float32, torch.bfloat16]


def shape(device: torch.device) -> tuple[int, ...]:
    return (3, 5, 96) if device.type == "cpu" else (4096, 4096)  # 96: not a power of two


def test_rmsnorm_matches_reference(device: torch.device) -> None:
    for dtype in dtypes(device):
        x = torch.randn(shape(device), device=device).to(dtype)
        weight = (1 + 0.1 * torch.randn(x.shape[-1], device=device)).to(dtype)
        out = rmsnorm(x, weight, 1e-6)
        assert out.shape == x.shape and out.dtype == dtype
        assert_close_to_rounding(out, rmsnorm_ref(x, weight, 1e-6))


def test_fused_add_rmsnorm_matches_reference(device: torch.device) -> None:
    for dtype in dtypes(device):
        x = torch.randn(shape(device), device=device).to(dtype)
        residual = torch.randn(shape(device), device=device).to(dtype)
        weight = (1 + 0.1 * torch.randn(x.shape[-1], device=device)).to(dtype)
        x_before, residual_before = x.clone(), residual.clone()
        out, new_residual = fused_add_rmsnorm(x, residual, weight, 1e-5)
        expect_out, expect_residual = fused_add_rmsnorm_ref(x, residual, weight, 1e-5)
        torch.testing.assert_close(new_residual, expect_residual, atol=0, rtol=0)  # one rounded add
        assert_close_to_rounding(out, expect_out)
        assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # inputs untouched


def test_rmsnorm_takes_strided_rows(device: torch.device) -> None:
    x = torch.randn((6, 2 * 96), device=device)[:, :96]  # rows 192 apart
    weight = torch.randn(96, device=device)
    torch.testing.assert_close(rmsnorm(x, weight, 1e-6), rmsnorm_ref(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_reference_is_the_model_rmsnorm(dtype: torch.dtype) -> None:
    norm = RMSNorm(96, eps=1e-6).to(dtype)
    norm.weight.copy_(1 + 0.1 * torch.randn(96))
    x, residual = torch.randn(4, 96).to(dtype), torch.randn(4, 96).to(dtype)
    assert torch.equal(rmsnorm_ref(x, norm.weight, norm.eps), norm(x))
    expect_out, expect_residual = norm(x, residual)
    out, new_residual = fused_add_rmsnorm_ref(x, residual, norm.weight, norm.eps)
    assert torch.equal(out, expect_out) and torch.equal(new_residual, expect_residual)
