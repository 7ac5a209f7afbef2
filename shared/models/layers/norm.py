"""RMSNorm with an optional fused residual add, numerically as Hugging Face computes it: Llama's
form and Gemma's `(1 + weight)` form."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shared.models.layers.fused import use_kernels
from shared.models.weights import default_weight_loader, set_weight_loader


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), the normalisation in float32.

    `forward(x)` returns the normalised x. `forward(x, residual)` first forms
    `residual = x + residual` (in the input dtype, as the unfused model does) and returns
    `(norm(residual), residual)`, so decoder layers carry the residual stream without extra adds.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        set_weight_loader(self.weight, default_weight_loader)
        # Set after loading where the output feeds FP8 linears alone and producers quantize
        # (`kernels.fp8_quant.FUSE_INTO_PRODUCERS`, `PreNormDecoderLayer`): its group size.
        # `forward` then returns the output's E4M3 codes (`Fp8Activation`), not the output.
        self.fp8_group: int | None = None

    def _norm(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        input_dtype = x.dtype
        xf = x.to(torch.float32)
        variance = xf.pow(2).mean(-1, keepdim=True)
        xf = xf * torch.rsqrt(variance + self.eps)
        # Cast back before scaling: HF multiplies the weight in the model dtype.
        return self.weight * xf.to(input_dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.fp8_group is not None:
            return self._forward_fp8(x, residual, self.fp8_group)
        if use_kernels(x):
            from kernels.rmsnorm import fused_add_rmsnorm, rmsnorm

            if residual is None:
                return rmsnorm(x, self.weight, self.eps)
            return fused_add_rmsnorm(x, residual, self.weight, self.eps)
        return self.forward_native(x, residual)

    def _forward_fp8(self, x: torch.Tensor, residual: torch.Tensor | None, group: int) -> Any:
        """`forward` quantized for FP8 linears: the codes of its output (and the residual), in the
        norm's launch on a GPU (`kernels.rmsnorm.rmsnorm_fp8`)."""
        from kernels.rmsnorm import rmsnorm_fp8, rmsnorm_fp8_ref

        norm = rmsnorm_fp8 if use_kernels(x) else rmsnorm_fp8_ref
        codes, new_residual = norm(x, residual, self.weight, self.eps, group)
        return codes if residual is None else (codes, new_residual)

    def forward_native(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`forward` in torch ops, whatever the device."""
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: y = (1 + weight) * (x / sqrt(mean(x^2) + eps)), scaled in float32 and only
    then cast back (HF's Gemma2RMSNorm). The checkpoint stores the zero-centred `weight`.

    Always the torch code: the RMSNorm kernel computes Llama's form.
    """

    def _norm(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.forward_native(x, residual)
