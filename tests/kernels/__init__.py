"""Triton kernel tests (see conftest.py for how they run on CPU and GPU)."""

from __future__ import annotations

import torch


def assert_close_to_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to one rounding step of the dtype.

    Triton and torch compute exp, sigmoid and rsqrt differently in float32; now and then that
    flips the final rounding to float16/bfloat16 by one unit in the last place.
    """
    if expected.dtype in (torch.float16, torch.bfloat16):
        rtol = 2 * torch.finfo(expected.dtype).eps
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-5)
    else:
        torch.testing.assert_close(actual, expected)
