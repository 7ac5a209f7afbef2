"""When the model layers run the Triton kernels of `kernels/` instead of their torch code.

On CUDA tensors, where Triton is installed, RMSNorm (with the fused residual add), SiLU-and-mul
and rotary embedding call the kernels' wrappers: one launch each instead of a chain of small
torch ops; unquantized linear layers and the lm head take `kernels.gemv.linear` (a GEMV kernel
for a single token, cuBLAS otherwise), and a gated MLP's down projection applies SiLU-and-mul
inside that GEMV. Everywhere else (CPU) the torch code runs, so CPU parity with HF stays exact. The
kernels round as the torch code does; `kernels.config.use_reference(True)` (or
`TANDEM_KERNELS_REFERENCE=1`) routes the wrappers back to torch for debugging. The kernel
modules are imported on first use, so importing a model never imports Triton.
"""

from __future__ import annotations

import importlib.util

import torch

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda and _HAS_TRITON
