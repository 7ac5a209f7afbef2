"""RMSNorm and fused residual-add + RMSNorm, rounding as `shared.models.layers.norm.RMSNorm` does.

    y = weight * (x / sqrt(mean(x^2) + eps))

The mean and the scaling run in float32; the normalised row is cast back to the input dtype
before the weight multiplies it (Hugging Face's order), and the fused variant first forms
`residual = x + residual` in the input dtype. One program normalises one row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.checks import FLOAT_DTYPES, check_dtype, check_same_device
from kernels.config import reference_enabled

_OP = "rmsnorm"


def rmsnorm(
    x: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [H]
    eps: float,
) -> torch.Tensor:  # [..., H], dtype of weight * x
    """RMSNorm of every row of `x`."""
    _check(x, None, weight, eps)
    if reference_enabled():
        return rmsnorm_ref(x, weight, eps)
    out, _ = _launch(x, None, weight, eps)
    return out


def fused_add_rmsnorm(
    x: torch.Tensor,  # [..., H]
    residual: torch.Tensor,  # [..., H], x's dtype
    weight: torch.Tensor,  # [H]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (norm(x + residual), x + residual)
    """`residual = x + residual` then its RMSNorm, in one pass; returns new tensors (no aliasing)."""
    _check(x, residual, weight, eps)
    if reference_enabled():
        return fused_add_rmsnorm_ref(x, residual, weight, eps)
    out, new_residual = _launch(x, residual, weight, eps)
    assert new_residual is not None
    return out, new_residual


def _check(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> None:
    check_dtype(_OP, "x", x, FLOAT_DTYPES)
    check_dtype(_OP, "weight", weight, FLOAT_DTYPES)
    if x.dim() < 1 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"{_OP}: x {tuple(x.shape)} must end in weight's size {tuple(weight.shape)}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"{_OP}: residual {tuple(residual.shape)} {residual.dtype} must match x "
                f"{tuple(x.shape)} {x.dtype}"
            )
        check_same_device(_OP, x=x, residual=residual, weight=weight)
    else:
        check_same_device(_OP, x=x, weight=weight)
    if not eps >= 0:
        raise ValueError(f"{_OP}: eps must be >= 0, got {eps}")


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)  # [N, H]; a copy only if x's rows are not evenly strided
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    out2 = out.view(-1, hidden)
    rows = x2.shape[0]
    if residual is None:
        res2, new_res2, new_residual = x2, x2, None  # unused: HAS_RESIDUAL is off
    else:
        res2 = residual.reshape(-1, hidden)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        new_residual = torch.empty_like(x, memory_format=torch.contiguous_format)
        new_res2 = new_residual.view(-1, hidden)
    if rows == 0:
        return out, new_residual
    _rmsnorm_kernel[(rows,)](
        x2,
        res2,
        new_res2,
        weight,
        out2,
        x2.stride(0),
        res2.stride(0),
        new_res2.stride(0),
        out2.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=triton.next_power_of_2(hidden),
        **pdl.launch_options(x2),
    )
    return out, new_residual


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    new_res_ptr,
    w_ptr,
    out_ptr,
    x_stride,
    res_stride,
    new_res_stride,
    out_stride,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.wait(USE_PDL)  # before any load: the kernel before may still run
    pdl.release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    in_dtype = x.dtype
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        # Rounded to the input dtype, like the unfused `x + residual`.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(in_dtype)
        tl.store(new_res_ptr + row * new_res_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, 0) / hidden
    normed = (xf * tl.rsqrt(variance + eps)).to(in_dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Pure-torch `rmsnorm`: the model's RMSNorm, operation for operation."""
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


def fused_add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch `fused_add_rmsnorm`."""
    residual = x + residual
    return rmsnorm_ref(residual, weight, eps), residual
