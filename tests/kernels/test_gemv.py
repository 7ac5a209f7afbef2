"""The dense GEMV (`kernels.gemv.dense_gemv`) and `kernels.gemv.linear`, which picks it or cuBLAS.

The reference is the product in float64. The GEMV accumulates in float32 and rounds once to x's
dtype, so its error is float32 summation (relative to the sum of |products|) plus one rounding
of the result, the bound cuBLAS meets too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import gemv
from kernels.activation import silu_and_mul
from kernels.config import reference_mode
from kernels.gemv import DENSE_GEMV_MAX_M, dense_gemv, dense_gemv_config, linear, silu_mul_linear

pytestmark = pytest.mark.kernels


def dtypes(device: torch.device) -> list[torch.dtype]:
    # float16 on CPU: the interpreter truncates bfloat16 casts.
    return [torch.float32, torch.float16] if device.type == "cpu" else [torch.float32, torch.bfloat16]


def assert_linear_close(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    magnitude = x.double().abs() @ w.double().abs().t() + (0 if b is None else b.double().abs())
    assert out.shape == ref.shape and out.dtype == x.dtype
    rounding = torch.finfo(x.dtype).eps if x.dtype != torch.float32 else 0.0
    tol = 2**-18 * magnitude + rounding * ref.abs() + 1e-30
    worst = ((out.double() - ref).abs() / tol).max().item()
    assert worst <= 1.0, f"error {worst:.3g}x the tolerance"


def cases(device: torch.device) -> list[tuple[int, int, int]]:
    # (M, N, K): K a multiple of the 512- and 256-column steps, ragged K, N not a multiple of the
    # 8-row tile, a K long enough to split.
    if device.type == "cpu":
        return [(m, n, k) for m in (1, 3) for n, k in ((40, 512), (37, 768), (24, 200))]
    return [(m, n, k) for m in (1, 2, 4) for n, k in ((4096, 4096), (6144, 4096), (4096, 14336), (1000, 333))]


@pytest.mark.parametrize(
    "config",
    [None, {"SPLIT_K": 2}, {"BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 4, "num_warps": 8, "num_stages": 2}],
)
def test_dense_gemv_matches_float64(device: torch.device, config: dict[str, int] | None) -> None:
    # Default plan, a split (partials summed by split_k_sum, bias added there) and another tile.
    torch.manual_seed(0)
    for m, n, k in cases(device):
        for dtype in dtypes(device):
            x = torch.randn(m, k, device=device).to(dtype)
            w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
            b = torch.randn(n, device=device).to(dtype)
            for bias in (None, b):
                out = dense_gemv(x, w, bias, config=config)
                assert_linear_close(out, x, w, bias)


def test_dense_gemv_strided_and_empty(device: torch.device) -> None:
    # x a column slice of a wider tensor (any strides), and zero rows.
    torch.manual_seed(1)
    wide = torch.randn(2, 3 * 256, device=device)
    x = wide[:, 256:512]
    w = torch.randn(24, 256, device=device)
    assert_linear_close(dense_gemv(x, w), x, w, None)
    assert dense_gemv(x[:0], w).shape == (0, 24)


@pytest.mark.parametrize("config", [None, {"SPLIT_K": 2, "BLOCK_K": 128}])
def test_gated_gemv_is_the_unfused_pair(device: torch.device, config: dict[str, int] | None) -> None:
    # silu(gate) * up formed inside the GEMV, with silu_and_mul's roundings, then the plain
    # GEMV's sums. The CPU interpreter gives the unfused pair bit for bit; compiled, the two
    # kernels' sigmoids may differ in an activation's last bits (seen on an H100, float32 and
    # bf16: a few elements in millions), so the bound is a few roundings of each input.
    torch.manual_seed(4)
    for m, n, k in cases(device):
        for dtype in dtypes(device):
            gate_up = (2 * torch.randn(m, 2 * k, device=device)).to(dtype)
            w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
            b = torch.randn(n, device=device).to(dtype)
            fused = dense_gemv(gate_up, w, b, config=config, gated=True)
            act = silu_and_mul(gate_up)
            unfused = dense_gemv(act, w, b, config=config)
            if device.type == "cpu":
                assert torch.equal(fused, unfused)
                continue
            eps = torch.finfo(dtype).eps
            magnitude = act.double().abs() @ w.double().abs().t()
            tol = 4 * eps * magnitude + eps * unfused.double().abs() + 1e-30
            assert ((fused.double() - unfused.double()).abs() <= tol).all()


def test_silu_mul_linear(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    # One token on a GPU: the gated GEMV; otherwise silu_and_mul then linear. Same values.
    calls: list[bool] = []
    real = gemv.dense_gemv

    def spy(x: torch.Tensor, *args: object, gated: bool = False, **kwargs: object) -> torch.Tensor:
        calls.append(gated)
        return real(x, *args, gated=gated, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gemv, "dense_gemv", spy)
    torch.manual_seed(5)
    w = torch.randn(40, 256, device=device) / 16
    for rows in (1, 3):
        gate_up = torch.randn(rows, 512, device=device)
        out = silu_mul_linear(gate_up, w)
        assert out.shape == (rows, 40)
        assert_linear_close(out, silu_and_mul(gate_up), w, None)
    assert calls == ([True] if device.type == "cuda" else [])
    with pytest.raises(ValueError, match="even"):
        silu_mul_linear(torch.randn(1, 511, device=device), w)
    with pytest.raises(ValueError, match="does not match weight"):
        silu_mul_linear(torch.randn(1, 500, device=device), w)


def test_config_fills_the_gpu_and_divides_k() -> None:
    for m, n, k in ((1, 4096, 4096), (1, 4096, 14336), (1, 128256, 4096)):
        cfg = dense_gemv_config(m, n, k)
        assert cfg["SPLIT_K"] == 1 and k % cfg["BLOCK_K"] == 0
    # A tiny model's projection: too few row tiles for the SMs, so K is split.
    cfg = dense_gemv_config(1, 64, 4096)
    assert cfg["SPLIT_K"] > 1 and 4096 // (cfg["BLOCK_K"] * cfg["SPLIT_K"]) >= 2


def test_linear_takes_the_gemv_for_one_token(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU up to DENSE_GEMV_MAX_M rows take the GEMV, more take cuBLAS; on CPU (and in
    # reference mode) always F.linear. Leading dims are kept.
    calls: list[int] = []
    real = gemv.dense_gemv

    def spy(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gemv, "dense_gemv", spy)
    torch.manual_seed(2)
    w = torch.randn(48, 512, device=device)
    b = torch.randn(48, device=device)
    for rows in (DENSE_GEMV_MAX_M, DENSE_GEMV_MAX_M + 1):
        x = torch.randn(rows, 1, 512, device=device)
        out = linear(x, w, b)
        assert out.shape == (rows, 1, 48)
        assert_linear_close(out.view(rows, 48), x.view(rows, 512), w, b)
    assert calls == ([DENSE_GEMV_MAX_M] if device.type == "cuda" else [])
    with reference_mode(True):
        x = torch.randn(1, 512, device=device)
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    assert len(calls) == (1 if device.type == "cuda" else 0)


def test_linear_rejects_mismatched_operands() -> None:
    x, w = torch.randn(1, 64), torch.randn(32, 64)
    with pytest.raises(ValueError, match="does not match weight"):
        linear(x, w.half())
    with pytest.raises(ValueError, match="does not match weight"):
        linear(torch.randn(1, 63), w)
    with pytest.raises(ValueError, match="bias"):
        linear(x, w, torch.randn(31))
    with pytest.raises(ValueError, match="weight must be"):
        linear(x, w[None])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_gemv_under_cuda_graph() -> None:
    # The engine captures decode: the GEMV (with its split partials) must replay on new inputs.
    torch.manual_seed(3)
    w = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16) / 64
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert dense_gemv_config(1, 64, 4096)["SPLIT_K"] > 1
    linear(x, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_linear_close(out, x, w, None)
