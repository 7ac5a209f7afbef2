"""Gated MLP activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.models.layers.fused import use_kernels


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    """silu(gate) * up for the fused gate_up projection output: the kernel on a GPU."""
    if use_kernels(x):
        from kernels.activation import silu_and_mul as kernel

        return kernel(x)
    gate, up = x.chunk(2, dim=-1)  # [T, I] each
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    """gelu(gate, approximate="tanh") * up (Gemma's `gelu_pytorch_tanh` gated MLP); torch code
    on every device (no kernel yet)."""
    gate, up = x.chunk(2, dim=-1)  # [T, I] each
    return F.gelu(gate, approximate="tanh") * up
