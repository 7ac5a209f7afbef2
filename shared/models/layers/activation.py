"""Gated MLP activations."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from shared.models.layers.fused import use_kernels

if TYPE_CHECKING:
    from kernels.fp8_quant import Fp8Activation


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    """silu(gate) * up for the fused gate_up projection output: the kernel on a GPU."""
    if use_kernels(x):
        from kernels.activation import silu_and_mul as kernel

        return kernel(x)
    gate, up = x.chunk(2, dim=-1)  # [T, I] each
    return F.silu(gate) * up


def silu_and_mul_fp8(x: torch.Tensor, group_size: int) -> Fp8Activation:  # [T, 2 * I] -> codes of [T, I]
    """`silu_and_mul` quantized for an FP8 linear, in its launch on a GPU: the codes and scales
    the linear would have made of `silu_and_mul(x)`."""
    if use_kernels(x):
        from kernels.activation import silu_and_mul_fp8 as kernel

        return kernel(x, group_size)
    from kernels.activation import silu_and_mul_fp8_ref

    return silu_and_mul_fp8_ref(x, group_size)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    """gelu(gate, approximate="tanh") * up (Gemma's `gelu_pytorch_tanh` gated MLP); torch code
    on every device (no kernel yet)."""
    gate, up = x.chunk(2, dim=-1)  # [T, I] each
    return F.gelu(gate, approximate="tanh") * up
