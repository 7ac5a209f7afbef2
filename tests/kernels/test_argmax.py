"""Row argmax (`kernels.argmax.argmax_rows`) against torch.argmax: the first maximal index."""

from __future__ import annotations

import pytest
import torch

from kernels.argmax import argmax_rows
from kernels.config import reference_mode

pytestmark = pytest.mark.kernels


def widths(device: torch.device) -> list[int]:
    # One partial chunk, an exact chunk, several with a ragged last one (Llama-3's vocabulary).
    return [37, 4096, 9000] if device.type == "cpu" else [37, 4096, 128256]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_argmax_matches_torch(device: torch.device, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    for cols in widths(device):
        x = torch.randn(5, cols, device=device).to(dtype)
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


def test_ties_go_to_the_first_index(device: torch.device) -> None:
    # Equal maxima inside one chunk and across chunks (4096 columns each), and rows of -inf only
    # (a grammar that allows nothing): index 0, as torch.
    cols = widths(device)[-1]
    x = torch.randn(4, cols, device=device)
    x[0, [5, 17]] = 10.0
    x[1, [cols - 1, 4100, 4096]] = 10.0
    x[2] = float("-inf")
    x[3, [3, cols - 2]] = float("inf")
    out = argmax_rows(x)
    assert out.tolist() == [5, 4096, 0, 3] == x.argmax(dim=-1).tolist()


def test_strided_rows_and_empty_batch(device: torch.device) -> None:
    torch.manual_seed(1)
    wide = torch.randn(3, 2 * 5000, device=device)
    x = wide[:, ::2]  # column stride 2
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    assert argmax_rows(wide[:0]).shape == (0,)


def test_bad_input_and_reference_switch(device: torch.device) -> None:
    with pytest.raises(ValueError, match="rows, columns"):
        argmax_rows(torch.randn(8, device=device))
    with pytest.raises(ValueError, match="dtype"):
        argmax_rows(torch.ones(2, 3, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="no columns"):
        argmax_rows(torch.empty(2, 0, device=device))
    x = torch.randn(2, 50, device=device)
    with reference_mode(True):
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
