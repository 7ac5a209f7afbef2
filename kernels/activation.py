"""SiLU-and-mul for the fused gate/up projection: `[..., 2I] -> [..., I]`, silu(gate) * up.

Rounds as the torch module (`F.silu(gate) * up` in the input dtype) does: silu in float32 cast
to the input dtype, then the product, cast again. `silu_and_mul_fp8` ends the same program by
quantizing that output for an FP8 linear (E4M3 codes and per-group scales, `kernels.fp8_quant`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

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

_OP = "silu_and_mul"
_MAX_BLOCK = 1024


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [..., 2I] -> [..., I]
    """silu(x[..., :I]) * x[..., I:]."""
    _check(x)
    if reference_enabled():
        return silu_and_mul_ref(x)
    inter = x.shape[-1] // 2
    x2 = _rows(x)
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, inter)  # [N, I]
    if out2.numel() == 0:
        return out
    block = min(_MAX_BLOCK, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
        x2, out2, x2.stride(0), out2.stride(0), inter, BLOCK=block
    )
    return out


def silu_and_mul_fp8(x: torch.Tensor, group_size: int = 128) -> Fp8Activation:  # [..., 2I] -> [T, I]
    """`silu_and_mul` quantized for an FP8 linear in the same launch: the codes and scales
    `per_token_group_quant_fp8` would give for its output, bit for bit."""
    _check(x)
    check_producer_group(_OP, group_size)
    if reference_enabled():
        return silu_and_mul_fp8_ref(x, group_size)
    inter = x.shape[-1] // 2
    x2 = _rows(x)
    out = empty_fp8_activation((*x.shape[:-1], inter), group_size, x.dtype, x.device)
    if out.codes.numel() == 0:
        return out
    block = max(min(_MAX_BLOCK, triton.next_power_of_2(inter)), group_size)  # whole groups
    _silu_and_mul_fp8_kernel[(x2.shape[0], triton.cdiv(inter, block))](
        x2, out.codes, out.scales, x2.stride(0), inter, out.scales.shape[1], FP8_MAX, FP8_EPS,
        GROUP=group_size, BLOCK=block,
    )  # fmt: skip
    return out


def _check(x: torch.Tensor) -> None:
    check_dtype(_OP, "x", x, FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(f"{_OP}: x's last dim must be even (gate | up), got shape {tuple(x.shape)}")
    check_same_device(_OP, x=x)


def _rows(x: torch.Tensor) -> torch.Tensor:  # [N, 2I], unit stride along the row
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    out = _silu_mul(x_ptr, row, x_stride, cols, inter)
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=cols < inter)


@triton.jit
def _silu_and_mul_fp8_kernel(
    x_ptr, q_ptr, scale_ptr, x_stride, inter, groups, fp8_max, fp8_eps,
    GROUP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK
    out = _silu_mul(x_ptr, row, x_stride, col0 + tl.arange(0, BLOCK), inter)
    y = out.to(x_ptr.dtype.element_ty).to(tl.float32)  # `silu_and_mul`'s rounding; 0 past the end
    store_groups_e4m3(
        y, q_ptr + row * inter, scale_ptr + row * groups, col0, inter, fp8_max, fp8_eps, BLOCK, GROUP
    )


@triton.jit
def _silu_mul(x_ptr, row, x_stride, cols, inter):
    """silu(gate) * up at columns `cols` of row `row`, float32 (0 past `inter`), rounded as the
    torch module: silu cast to the input dtype, the product in float32."""
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(gate.dtype)
    return silu.to(tl.float32) * up.to(tl.float32)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Pure-torch `silu_and_mul`: the model's torch code (`shared.models.layers.activation`)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul_fp8_ref(x: torch.Tensor, group_size: int = 128) -> Fp8Activation:
    """Pure-torch `silu_and_mul_fp8`: the activation's reference, then the quantization's."""
    out = silu_and_mul_ref(x)
    codes, scales = per_token_group_quant_fp8_ref(out.reshape(-1, out.shape[-1]), group_size)
    return Fp8Activation(codes, scales, out.dtype)
