"""Block-FP8 GEMV on tensor cores: the weight on the MMA's M side, the few tokens padded on N.

    x    [M, K] float (quantized here) or E4M3 codes with x_s [M, ceil(K / bk)]     M <= 16
    w_q  [N, K] fp8, w_s [ceil(N / bn), ceil(K / bk)]
    out[m, n] = sum_kb (q_x[m, kb] . w_q[n, kb]) * x_s[m, kb] * w_s[n // bn, kb]

The same product as `kernels.gemv.fp8_gemv` (the CUDA-core GEMV) and `kernels.fp8_gemm`'s
block GEMM, computed a third way. The CUDA-core GEMV widens every weight code to float32 and
multiply-adds it; on the H200 it streams its weight at 1.5-3.0 TB/s against 2.8-3.9 for the
dense bf16 GEMV, so FP8's halved bytes buy only ~1.3x at batch 1 (docs/benchmarks.md). The block
GEMM puts the tokens on the MMA's M side, padded to a 16-row tile, which on Hopper rules out
the warpgroup MMA (M >= 64 a warpgroup). Here the operands swap ("swap AB"): each program owns
BLOCK_N (64 or 128) weight rows, the A operand, straight from memory as the MMA reads it
(row-major, K contiguous: no layout change); the tokens are the B operand, `x^T` padded to 16
columns (rows past M wrap onto valid ones and are never stored). Every K step is one scale
group: its [BLOCK_N, bk] x [bk, 16] FP8 product (exact products, at most bk of them summed in
the MMA's accumulator, as DeepSeek-V3's recipe bounds the Hopper FP8 accumulation) is scaled by
the two groups' scales and added to a float32 [BLOCK_N, 16] accumulator. The weight stream is a
plain load feeding `tl.dot`, which Triton software-pipelines over `num_stages` buffers.

With `x_s` None the kernel quantizes x's group in each step with the quantization kernel's
rule (`quant_groups_e4m3`: the codes and scales of `per_token_group_quant_fp8`, bit for bit);
at M = 1 it quantizes the one row and repeats it. K is split over SPLIT_K programs per column
tile where the tiles alone leave SMs idle, summed by `kernels.gemv.split_k_sum` as the GEMV's
are (deterministic, graph-safe).

Nothing routes here by default yet: `kernels.fp8_gemm.MMA_GEMV_MAX_M` (0) is the switch, for
`bench/fast_path_sweep.py --only fp8mma` and `bench/gpu_bench.py --fp8-mma-gemv` to measure it
against the CUDA-core GEMV on a GPU first. The torch reference is `fp8_gemm`'s
(`w8a8_block_fp8_matmul_ref`, `fp8_linear_ref`); tests/kernels/test_fp8.py checks against it.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kernels.config import interpreting
from kernels.fp8_quant import FP8_EPS, FP8_MAX, quant_groups_e4m3
from kernels.gemv import split_k_sum

MAX_M = 16  # tokens one launch takes: the MMA's N side
CONFIG_KEYS = frozenset({"BLOCK_N", "SPLIT_K", "num_warps", "num_stages"})

_NUM_SMS = 132  # H100 / H200 SXM


def mma_gemv_config(m: int, n: int, k: int) -> dict[str, int]:
    """BLOCK_N, SPLIT_K and launch options: a first guess, to be replaced by a GPU sweep.

    One warpgroup over 64 weight rows; 128 where 64-row tiles alone would give every SM two;
    K split until ~3 programs per SM, each keeping >= 4 groups (the CUDA-core GEMV's rule).
    """
    groups = triton.cdiv(k, 128)
    block_n = 128 if triton.cdiv(n, 64) >= 2 * _NUM_SMS else 64
    tiles = triton.cdiv(n, block_n)
    split = 1
    while tiles * split < 3 * _NUM_SMS and groups // (2 * split) >= 4:
        split *= 2
    return {"BLOCK_N": block_n, "SPLIT_K": split, "num_warps": 4, "num_stages": 4}


def fp8_mma_gemv(
    x: torch.Tensor,  # [M, K] float (x_s None) or float8_e4m3fn codes, M <= MAX_M
    x_s: torch.Tensor | None,  # [M, ceil(K / bk)] float32, or None: quantize x in the kernel
    w_q: torch.Tensor,  # [N, K] float8_e4m3fn
    w_s: torch.Tensor,  # [ceil(N / bn), ceil(K / bk)] float32
    out_dtype: torch.dtype,
    block: tuple[int, int],
    bias: torch.Tensor | None = None,  # [N]
    config: dict[str, int] | None = None,  # keys CONFIG_KEYS, overriding `mma_gemv_config`
) -> torch.Tensor:  # [M, N] out_dtype
    """The launch, as `kernels.gemv.fp8_gemv`'s: no checks (callers check: bk a power of two
    >= 32, shapes, dtypes, one device), no host sync (graph-safe)."""
    m, k = x.shape
    n = w_q.shape[0]
    assert m <= MAX_M, m
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    cfg: dict[str, Any] = {**mma_gemv_config(m, n, k), **(config or {})}
    bn, bk = block
    block_n = cfg.pop("BLOCK_N")
    groups = triton.cdiv(k, bk)
    groups_per_split = triton.cdiv(groups, cfg.pop("SPLIT_K"))
    split_k = triton.cdiv(groups, groups_per_split)  # none of them empty
    partial = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    _mma_gemv_kernel[(triton.cdiv(n, block_n), split_k)](
        x,
        x_s if x_s is not None else x,  # unused with FUSE_QUANT
        w_q,
        w_s,
        bias if bias is not None else out,  # unused without HAS_BIAS
        partial,
        m,
        n,
        k,
        groups_per_split * bk,
        FP8_MAX,
        FP8_EPS,
        *x.stride(),
        *(x_s.stride() if x_s is not None else (0, 0)),
        *w_q.stride(),
        *w_s.stride(),
        *partial.stride()[-2:],
        partial.stride(0) if split_k > 1 else 0,
        GROUP_N=bn,
        GROUP_K=bk,
        HAS_BIAS=bias is not None and split_k == 1,
        EVEN_K=k % bk == 0,
        SCALAR_W_SCALE=bn % block_n == 0,
        FUSE_QUANT=x_s is None,
        ONE_ROW=x_s is None and m == 1,
        LOOP_WHILE=interpreting(),
        BLOCK_M=MAX_M,
        BLOCK_N=block_n,
        **cfg,
    )
    if split_k > 1:
        split_k_sum(partial[:, None], bias, out[None])
    return out


@triton.jit
def _mma_gemv_kernel(
    x_ptr,
    xs_ptr,
    w_ptr,
    ws_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    k_per_split,
    fp8_max,
    eps,
    x_stride_m,
    x_stride_k,
    xs_stride_m,
    xs_stride_k,
    w_stride_n,
    w_stride_k,
    ws_stride_n,
    ws_stride_k,
    o_stride_m,
    o_stride_n,
    o_stride_split,
    GROUP_N: tl.constexpr,
    GROUP_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    SCALAR_W_SCALE: tl.constexpr,
    FUSE_QUANT: tl.constexpr,
    ONE_ROW: tl.constexpr,
    LOOP_WHILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M]: the tokens, the MMA's N side
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]: weight rows, the MMA's M side
    offs_k = tl.arange(0, GROUP_K)  # [GROUP_K]
    # Rows past the edge re-read valid ones (wrapped) instead of masking; never stored.
    rows_m = (offs_m % M).to(tl.int64)
    rows_n = (offs_n % N).to(tl.int64)
    if ONE_ROW:
        x_rows = tl.zeros((1,), dtype=tl.int64)  # M = 1, quantized once and repeated
    else:
        x_rows = rows_m
    k_lo = split * k_per_split  # a whole number of groups
    k_hi = tl.minimum(K, k_lo + k_per_split)
    x_ptrs = x_ptr + x_rows[:, None] * x_stride_m + (k_lo + offs_k)[None, :] * x_stride_k  # [BM|1, GK]
    w_ptrs = w_ptr + rows_n[:, None] * w_stride_n + (k_lo + offs_k)[None, :] * w_stride_k  # [BN, GK]
    xs_ptrs = xs_ptr + rows_m * xs_stride_m  # [BLOCK_M]
    if SCALAR_W_SCALE:
        # The column tile lies in one weight block: one scale per group.
        ws_ptrs = ws_ptr + ((pid_n * BLOCK_N) // GROUP_N) * ws_stride_n
    else:
        ws_ptrs = ws_ptr + (rows_n // GROUP_N) * ws_stride_n  # [BLOCK_N]

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # out^T
    # The interpreter (Triton 3.6, numpy >= 2.4) cannot take a scalar argument as a range()
    # bound (triton-lang/triton#9171); compiled kernels take the pipelined `for`.
    if LOOP_WHILE:
        k0 = k_lo
        while k0 < k_hi:
            acc = _mma_step(
                acc, x_ptrs, xs_ptrs, w_ptrs, ws_ptrs, xs_stride_k, ws_stride_k, offs_k, k0, K,
                fp8_max, eps, GROUP_K, EVEN_K, SCALAR_W_SCALE, FUSE_QUANT, ONE_ROW, BLOCK_M,
            )  # fmt: skip
            x_ptrs += GROUP_K * x_stride_k
            w_ptrs += GROUP_K * w_stride_k
            k0 += GROUP_K
    else:
        for k0 in range(k_lo, k_hi, GROUP_K):
            acc = _mma_step(
                acc, x_ptrs, xs_ptrs, w_ptrs, ws_ptrs, xs_stride_k, ws_stride_k, offs_k, k0, K,
                fp8_max, eps, GROUP_K, EVEN_K, SCALAR_W_SCALE, FUSE_QUANT, ONE_ROW, BLOCK_M,
            )  # fmt: skip
            x_ptrs += GROUP_K * x_stride_k
            w_ptrs += GROUP_K * w_stride_k

    result = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        result += tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
    out_ptr += split.to(tl.int64) * o_stride_split
    out_ptrs = out_ptr + offs_m[:, None] * o_stride_m + offs_n[None, :] * o_stride_n
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mma_step(
    acc,  # [BLOCK_N, BLOCK_M] float32
    x_ptrs,  # [BLOCK_M, GROUP_K] (or [1, GROUP_K] with ONE_ROW) at column k0
    xs_ptrs,  # [BLOCK_M] x's scales, group 0 (unused with FUSE_QUANT)
    w_ptrs,  # [BLOCK_N, GROUP_K] at column k0
    ws_ptrs,  # [BLOCK_N] w's scales, group 0 (a scalar pointer with SCALAR_W_SCALE)
    xs_stride_k,
    ws_stride_k,
    offs_k,  # [GROUP_K]
    k0,
    K,
    fp8_max,
    eps,
    GROUP_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    SCALAR_W_SCALE: tl.constexpr,
    FUSE_QUANT: tl.constexpr,
    ONE_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """acc + the scaled FP8 product of group k0 // GROUP_K, transposed: [BLOCK_N, BLOCK_M]."""
    if EVEN_K:
        w = tl.load(w_ptrs)
        x = tl.load(x_ptrs)
    else:
        w = tl.load(w_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
        x = tl.load(x_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
    group = k0 // GROUP_K
    if FUSE_QUANT:
        q, x_scale = quant_groups_e4m3(x.to(tl.float32), fp8_max, eps)  # on the E4M3 grid
        q = q.to(w.dtype)  # exact
        if ONE_ROW:
            q = tl.broadcast_to(q, (BLOCK_M, GROUP_K))
            x_scale = tl.broadcast_to(x_scale, (BLOCK_M,))
    else:
        q = x
        x_scale = tl.load(xs_ptrs + group * xs_stride_k)  # [BLOCK_M]
    w_scale = tl.load(ws_ptrs + group * ws_stride_k)
    part = tl.dot(w, tl.trans(q))  # [BLOCK_N, BLOCK_M], float32
    if SCALAR_W_SCALE:
        return acc + part * (x_scale * w_scale)[None, :]
    else:
        return acc + part * w_scale[:, None] * x_scale[None, :]
