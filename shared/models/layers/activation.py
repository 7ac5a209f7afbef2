"""Gated MLP activation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.models.layers.fused import use_kernels


class SiluAndMul(nn.Module):
    """silu(gate) * up for the fused gate_up projection output [T, 2 * I] -> [T, I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_kernels(x):
            from kernels.activation import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)  # [T, I] each
        return F.silu(gate) * up
