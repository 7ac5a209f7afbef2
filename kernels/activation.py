"""SiLU-and-mul for the fused gate/up projection: `[..., 2I] -> [..., I]`, silu(gate) * up.

Rounds as the torch module (`F.silu(gate) * up` in the input dtype) does: silu in float32 cast
to the input dtype, then the product, cast again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.checks import FLOAT_DTYPES, check_dtype, check_same_device
from kernels.config import reference_enabled

_OP = "silu_and_mul"
_MAX_BLOCK = 1024


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [..., 2I] -> [..., I]
    """silu(x[..., :I]) * x[..., I:]."""
    check_dtype(_OP, "x", x, FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(f"{_OP}: x's last dim must be even (gate | up), got shape {tuple(x.shape)}")
    check_same_device(_OP, x=x)
    if reference_enabled():
        return silu_and_mul_ref(x)
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inter)  # [N, 2I]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, inter)  # [N, I]
    if out2.numel() == 0:
        return out
    block = min(_MAX_BLOCK, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
        x2, out2, x2.stride(0), out2.stride(0), inter, BLOCK=block
    )
    return out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(gate.dtype)
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Pure-torch `silu_and_mul`: the model's torch code (`shared.models.layers.activation`)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
