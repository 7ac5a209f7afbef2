"""RMSNorm and fused residual-add + RMSNorm, rounding as `shared.models.layers.norm.RMSNorm` does.

    y = weight * (x / sqrt(mean(x^2) + eps))

The mean and the scaling run in float32; the normalised row is cast back to the input dtype
before the weight multiplies it (Hugging Face's order), and the fused variant first forms
`residual = x + residual` in the input dtype. One program normalises one row.

`rmsnorm_fp8` ends the same program by quantizing the row for an FP8 linear (E4M3 codes and
per-group scales, `kernels.fp8_quant`'s rule), where the unfused path launches
`per_token_group_quant_fp8` on the output next.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.checks import FLOAT_DTYPES, check_dtype, check_same_device
from kernels.config import reference_enabled
from kernels.fp8_quant import (
    FP8_EPS,
    FP8_MAX,
    Fp8Activation,
    check_producer_group,
    empty_fp8_activation,
    per_token_group_quant_fp8_ref,
    store_groups_e4m3,
)

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


def rmsnorm_fp8(
    x: torch.Tensor,  # [..., H]
    residual: torch.Tensor | None,  # [..., H], x's dtype: fused add as `fused_add_rmsnorm`
    weight: torch.Tensor,  # [H]
    eps: float,
    group_size: int = 128,
) -> tuple[Fp8Activation, torch.Tensor | None]:  # (codes + scales of the norm, x + residual)
    """`rmsnorm` (or `fused_add_rmsnorm`) quantized for an FP8 linear in the same launch: the
    codes and scales `per_token_group_quant_fp8` would give for that output, bit for bit."""
    _check(x, residual, weight, eps)
    check_producer_group(_OP, group_size)
    if reference_enabled():
        return rmsnorm_fp8_ref(x, residual, weight, eps, group_size)
    hidden = x.shape[-1]
    x2, res2, new_residual, new_res2 = _rows(x, residual)
    dtype = torch.promote_types(weight.dtype, x.dtype)
    out = empty_fp8_activation(tuple(x.shape), group_size, dtype, x.device)
    rows = x2.shape[0]
    if rows == 0:
        return out, new_residual
    _rmsnorm_fp8_kernel[(rows,)](
        x2,
        res2,
        new_res2,
        weight,
        out.codes,
        out.scales,
        x2.stride(0),
        res2.stride(0),
        new_res2.stride(0),
        hidden,
        out.scales.shape[1],
        eps,
        FP8_MAX,
        FP8_EPS,
        OUT_DTYPE=_TL_DTYPES[dtype],
        HAS_RESIDUAL=residual is not None,
        GROUP=group_size,
        BLOCK=max(triton.next_power_of_2(hidden), group_size),
        **pdl.launch_options(x2),
    )
    return out, new_residual


def rmsnorm_fp8_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, group_size: int = 128
) -> tuple[Fp8Activation, torch.Tensor | None]:
    """Pure-torch `rmsnorm_fp8`: the norm's reference, then the quantization's."""
    if residual is None:
        normed, new_residual = rmsnorm_ref(x, weight, eps), None
    else:
        normed, new_residual = fused_add_rmsnorm_ref(x, residual, weight, eps)
    codes, scales = per_token_group_quant_fp8_ref(normed.reshape(-1, normed.shape[-1]), group_size)
    return Fp8Activation(codes, scales, normed.dtype), new_residual


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


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


def _rows(
    x: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """x and the residual as [N, H] rows of unit stride, the new residual and its rows (x's rows
    stand in for the residual's without one: HAS_RESIDUAL is off)."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)  # [N, H]; a copy only if x's rows are not evenly strided
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if residual is None:
        return x2, x2, None, x2
    res2 = residual.reshape(-1, hidden)
    if res2.stride(-1) != 1:
        res2 = res2.contiguous()
    new_residual = torch.empty_like(x, memory_format=torch.contiguous_format)
    return x2, res2, new_residual, new_residual.view(-1, hidden)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    x2, res2, new_residual, new_res2 = _rows(x, residual)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    out2 = out.view(-1, hidden)
    rows = x2.shape[0]
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
    out, row, cols, mask = _normed_row(
        x_ptr, res_ptr, new_res_ptr, w_ptr, x_stride, res_stride, new_res_stride, hidden, eps,
        HAS_RESIDUAL, BLOCK,
    )  # fmt: skip
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_fp8_kernel(
    x_ptr,
    res_ptr,
    new_res_ptr,
    w_ptr,
    q_ptr,  # [rows, hidden] E4M3 codes, contiguous
    scale_ptr,  # [rows, groups] float32, contiguous
    x_stride,
    res_stride,
    new_res_stride,
    hidden,
    groups,
    eps,
    fp8_max,
    fp8_eps,
    OUT_DTYPE: tl.constexpr,  # the dtype `rmsnorm` would return: its rounding before the codes
    HAS_RESIDUAL: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,  # a multiple of GROUP
    USE_PDL: tl.constexpr,
):
    pdl.wait(USE_PDL)
    pdl.release(USE_PDL)
    out, row, _, _ = _normed_row(
        x_ptr, res_ptr, new_res_ptr, w_ptr, x_stride, res_stride, new_res_stride, hidden, eps,
        HAS_RESIDUAL, BLOCK,
    )  # fmt: skip
    y = out.to(OUT_DTYPE).to(tl.float32)  # zero past the row's end (the weight loads 0 there)
    store_groups_e4m3(
        y, q_ptr + row * hidden, scale_ptr + row * groups, 0, hidden, fp8_max, fp8_eps, BLOCK, GROUP
    )


@triton.jit
def _normed_row(
    x_ptr, res_ptr, new_res_ptr, w_ptr, x_stride, res_stride, new_res_stride, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """This program's row: weight * norm(x (+ residual)) in float32 (0 past the row's end), the
    residual stored on the way; and the row, its columns and their mask."""
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
    return w.to(tl.float32) * normed.to(tl.float32), row, cols, mask


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
