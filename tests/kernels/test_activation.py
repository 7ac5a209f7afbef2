"""SiLU-and-mul: Triton against the reference, the reference against the model's torch code."""

from __future__ import annotations

import pytest
import torch

from kernels.activation import silu_and_mul, silu_and_mul_ref
from shared.models.layers.activation import silu_and_mul as model_silu_and_mul
from tests.kernels import assert_close_to_rounding

pytestmark = pytest.mark.kernels


def test_silu_and_mul_matches_reference(device: torch.device) -> None:
    # float16 on CPU checks the rounding order; the interpreter truncates bfloat16 casts.
    dtypes = [torch.float32, torch.float16] if device.type == "cpu" else [torch.float32, torch.bfloat16]
    # 2 * 1500 spans two column blocks with a ragged tail; 11008 is Llama 2 7B's intermediate size.
    shapes = [(3, 2, 2 * 48), (5, 2 * 1500)] if device.type == "cpu" else [(4096, 2 * 11008)]
    for dtype in dtypes:
        for shape in shapes:
            x = (2 * torch.randn(shape, device=device)).to(dtype)
            out = silu_and_mul(x)
            assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
            assert_close_to_rounding(out, silu_and_mul_ref(x))


def test_silu_and_mul_takes_strided_rows(device: torch.device) -> None:
    x = torch.randn((7, 3 * 64), device=device)[:, 64:]  # [7, 128], rows 192 apart
    assert_close_to_rounding(silu_and_mul(x), silu_and_mul_ref(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_reference_is_the_model_activation(dtype: torch.dtype) -> None:
    x = (2 * torch.randn(6, 2 * 40)).to(dtype)
    assert torch.equal(silu_and_mul_ref(x), model_silu_and_mul(x))  # CPU: the torch code
