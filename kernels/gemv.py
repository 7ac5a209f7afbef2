"""GEMV for a few tokens (decode): the weight streamed once on CUDA cores, no tensor cores.

Two weight formats share one kernel:

    dense   x [M, K] float, w [N, K] float (x's dtype)            out = x @ w.T
    fp8     x [M, K] float (quantized here) or E4M3 codes with x_s [M, ceil(K / bk)]
            w_q [N, K] fp8, w_s [ceil(N / bn), ceil(K / bk)]
            out[m, n] = sum_kb (q_x[m, kb] * x_s[m, kb]) . (w_q[n, kb] * w_s[n // bn, kb])

At one token a linear layer is a stream of its weight. Tensor-core GEMMs pad M to an MMA tile
and, at some shapes, launch too few tiles to keep every SM loading (cuBLAS on the H100 runs
Llama-3-8B's 4096x4096 o_proj on 64 tiles: 1.6 TB/s) or add a split-K reduction kernel. Here
each program owns BLOCK_N weight rows and one K range: every step loads a [BLOCK_N, BLOCK_K]
weight tile (16-byte loads along K), upconverts it to float32 and multiply-adds it, elementwise,
into a float32 [BLOCK_M, BLOCK_N, BLOCK_K] accumulator with the activation; the reduction over
K runs once, after the loop, so the loop is loads, converts and FMAs only.

A gated MLP's down projection (`silu_mul_linear`) reads the fused gate/up output and forms
silu(gate) * up as it loads each step: one launch and no intermediate instead of two.

FP8: BLOCK_K is the scale group (bk). The activation stays W8A8: with `x_s` None the kernel
quantizes each [BLOCK_M, bk] group of x in its step with the quantization kernel's own rule
(`quant_groups_e4m3`: the same codes and scales as `per_token_group_quant_fp8`, bit for bit);
every column tile repeats that, which costs little next to its BLOCK_N weight rows. Otherwise x
is already codes and x_s their scales.

FP8 on tensor cores (`fp8_gemv(..., mma=True)`, up to MMA_MAX_M = 16 tokens): the same launch and loop,
but each step is one FP8 MMA with the operands swapped ("swap AB"): the [BLOCK_N, bk] weight
tile (64 or 128 rows, row-major, K contiguous: as the warpgroup MMA reads its A operand) times
x^T, the tokens' codes padded to 16 columns (rows past M wrap onto valid ones, never stored).
The step's float32 product (exact products, at most bk of them summed in the MMA's own
accumulator, the bound DeepSeek-V3's recipe keeps for Hopper's reduced-precision FP8
accumulation) is scaled by the two groups' scales and added to a float32 [BLOCK_N, 16]
accumulator: no per-element widening of the weight, which bounds the CUDA-core path (on the
H200 it streams FP8 at 1.5-3.0 TB/s against 2.8-3.9 for bf16; docs/benchmarks.md). Measured on
the H200 with its first configs it was slower than the CUDA-core routing (batch 1 0.88x, batch 16
0.80x); with `mma_gemv_config`'s (the sweep's best) it is 1.035x / 1.023x faster end to end, so
`kernels.fp8_gemm.MMA_GEMV_MAX_M` (16) routes up to 16 tokens to it.

Split K: where N / BLOCK_N programs alone would leave SMs short of loads in flight, SPLIT_K
programs share a column tile's K range, each writing a float32 partial; `split_k_sum` adds them
(and the bias) in a fixed order in a second small kernel. That is deterministic and graph-safe
(no atomics on a buffer that would need zeroing, no counters to reset); it costs one launch and
8 bytes per output and split, small next to the weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import pdl
from kernels.checks import FLOAT_DTYPES, check_dtype, check_ndim
from kernels.config import interpreting, reference_enabled
from kernels.fp8_quant import FP8_EPS, FP8_MAX, quant_groups_e4m3

_OP = "linear"

# Tokens up to which `fp8_linear` / `w8a8_block_fp8_matmul` take the GEMV (no explicit config).
# H100, Llama-3-8B shapes, CUDA graphs: at M = 1 the GEMV beats the tensor-core path with its
# separate quantization (qkv 13.3 vs 15.3 us, o 10.9 vs 12.6, gate_up 48.9 vs 50.6, down 28.2 vs
# 29.8); at M = 4 its [4, BLOCK_N, bk] float32 accumulator makes it 2x slower than the tensor
# cores (qkv 28.9 vs 14.9 us, gate_up 108 vs 50), whose time hardly grows from M = 1 to 16.
GEMV_MAX_M = 1
# Rows the kernel takes at all (tests and sweeps may call it past GEMV_MAX_M).
GEMV_MAX_ROWS = 4
# Whether `fp8_linear` lets the GEMV quantize x itself (else the quantization kernel runs first):
# at M = 1 fusing was the faster on all four shapes (e.g. down 28.2 vs 30.0 us, o 10.9 vs 11.7).
GEMV_FUSES_QUANT = True

GEMV_CONFIG_KEYS = frozenset({"BLOCK_N", "SPLIT_K", "num_warps", "num_stages"})

_NUM_SMS = 132  # H100 SXM


def gemv_config(m: int, n: int, k: int) -> dict[str, int]:
    """BLOCK_N, SPLIT_K and launch options for M <= GEMV_MAX_ROWS tokens, K in 128-column groups.

    From one sweep on an H100 at M = 1 (Llama-3-8B shapes, CUDA graphs, weights cycled past L2;
    BLOCK_N 16/32/64, SPLIT_K 1-8, 4/8 warps, 2/4 stages): 4 warps and 4 stages throughout;
    64-row tiles where they alone fill the SMs (gate_up: 48.9 us vs 51.9 at 32 rows split 4) or
    K is long (down, split 8: 28.2 vs 30.9), else 32 rows (qkv split 4: 13.3 vs 13.5 at 64; o
    split 4: 10.9 vs 11.5); K split until ~3 programs per SM, each keeping >= 4 groups.
    """
    groups = triton.cdiv(k, 128)
    block_n = 64 if triton.cdiv(n, 64) >= 2 * _NUM_SMS or groups >= 64 else 32
    tiles = triton.cdiv(n, block_n)
    split = 1
    while tiles * split < 3 * _NUM_SMS and groups // (2 * split) >= 4:
        split *= 2
    return {"BLOCK_N": block_n, "SPLIT_K": split, "num_warps": 4, "num_stages": 4}


MMA_MAX_M = 16  # tokens `fp8_gemv(..., mma=True)` takes: the MMA's N side


# Whether `fp8_linear` lets the tensor-core GEMV quantize x itself: in the H200 sweep every
# shape's best config at M = 1, 4 and 16 took x already quantized (docs/benchmarks.md).
MMA_FUSES_QUANT = False


def mma_gemv_config(m: int, n: int, k: int) -> dict[str, int]:
    """BLOCK_N, SPLIT_K and launch options of `fp8_gemv(..., mma=True)`.

    The best of the H200 sweep's grid (M = 1, 4, 16, Llama-3-8B shapes, x quantized first;
    `bench/fast_path_sweep.py --only fp8mma`): one warpgroup over 64 weight rows, 4 stages,
    except where 64-row tiles alone give every SM two programs and M <= 4 (gate_up: 128 rows and
    8 warps, 34.8 us at M = 1 against 37.4 for the next best); K split while the programs stay
    under two per SM and each split keeps >= 8 groups (qkv and o 4 ways, down 8, gate_up none).
    End to end, FP8 decode with these is 1.035x (batch 1) / 1.023x (batch 16) faster than
    without the tensor-core GEMV (docs/benchmarks.md).
    """
    groups = triton.cdiv(k, 128)
    tiles = triton.cdiv(n, 64)
    split = 1
    while tiles * split < 2 * _NUM_SMS and groups // (2 * split) >= 8:
        split *= 2
    if tiles >= 2 * _NUM_SMS and m <= 4:
        return {"BLOCK_N": 128, "SPLIT_K": split, "num_warps": 8, "num_stages": 4}
    return {"BLOCK_N": 64, "SPLIT_K": split, "num_warps": 4, "num_stages": 4}


# Rows up to which `linear` takes the dense GEMV instead of cuBLAS. H100, bf16, CUDA graphs,
# weights cycled past L2 (bench/fast_path_sweep.py): at M = 1 the GEMV is faster on every
# Llama-3-8B shape (qkv 19.9 vs 21.3 us, o 14.2 vs 16.5, gate_up 80.1 vs 83.7, down 43.6 vs
# 45.5, lm head 340 vs 426); at M = 2 cuBLAS is as fast or faster (its time hardly grows with M,
# the GEMV's accumulator does).
DENSE_GEMV_MAX_M = 1

DENSE_CONFIG_KEYS = frozenset({"BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages"})


def dense_gemv_config(m: int, n: int, k: int) -> dict[str, int]:
    """BLOCK_N, BLOCK_K, SPLIT_K and launch options of `dense_gemv` (M <= GEMV_MAX_ROWS).

    From the H100 sweep at M = 1 (BLOCK_N 8/16/32, BLOCK_K 128-512, SPLIT_K 1-8, 4/8 warps, 2/4
    stages): 8 rows x 512 columns, 4 warps, 4 stages was best or within 2% of it on all five
    shapes, unsplit (N / 8 alone fills the SMs there; 256-column steps lost 1-15%). K is split
    only where the row tiles are too few for the SMs (small models).
    """
    block_k = next((bk for bk in (512, 256) if k % bk == 0), 128)
    block_n = 8
    tiles = triton.cdiv(n, block_n)
    steps = triton.cdiv(k, block_k)
    split = 1
    while tiles * split < _NUM_SMS and steps // (2 * split) >= 2:
        split *= 2
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": 4, "num_stages": 4}


def linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K], x's dtype
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N], x's dtype
    """`F.linear(x, weight, bias)` for a float weight: up to `DENSE_GEMV_MAX_M` rows on a GPU the
    dense GEMV (float32 accumulation, one rounding to x's dtype, as cuBLAS), else cuBLAS.
    Graph-safe."""
    check_dtype(_OP, "x", x, FLOAT_DTYPES)
    _check_linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if _takes_dense_gemv(x2):
        out = dense_gemv(x2, weight, bias)
    else:
        out = F.linear(x2, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def fp8_gemv(
    x: torch.Tensor,  # [M, K] float (x_s None) or float8_e4m3fn codes
    x_s: torch.Tensor | None,  # [M, ceil(K / bk)] float32, or None: quantize x in the kernel
    w_q: torch.Tensor,  # [N, K] float8_e4m3fn
    w_s: torch.Tensor,  # [ceil(N / bn), ceil(K / bk)] float32
    out_dtype: torch.dtype,
    block: tuple[int, int],
    bias: torch.Tensor | None = None,  # [N]
    config: dict[str, int] | None = None,  # keys GEMV_CONFIG_KEYS, overriding the default config
    mma: bool = False,  # on tensor cores (up to MMA_MAX_M rows), else CUDA cores (GEMV_MAX_ROWS)
) -> torch.Tensor:  # [M, N] out_dtype
    """The launch behind the few-token paths of `kernels.fp8_gemm`, its config from
    `mma_gemv_config` or `gemv_config`. No checks: callers check (bk a power of two >= 32,
    shapes, dtypes, one device). No host sync: graph-safe."""
    m, k = x.shape
    default = mma_gemv_config if mma else gemv_config
    cfg = {**default(m, w_q.shape[0], k), **(config or {})}
    return _launch(x, x_s, w_q, w_s, out_dtype, bias, block, cfg, mma=mma)


def silu_mul_linear(
    gate_up: torch.Tensor,  # [..., 2K]: gate | up
    weight: torch.Tensor,  # [N, K], gate_up's dtype
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N]
    """`F.linear(silu(gate) * up, weight, bias)`, a gated MLP's down projection: up to
    `DENSE_GEMV_MAX_M` rows on a GPU one GEMV that forms its input as it loads it (no activation
    launch, no intermediate), else `kernels.activation.silu_and_mul` then `linear`. The same
    roundings either way (see `dense_gemv`); the torch reference is `F.linear` over
    `silu_and_mul_ref`, which reference mode runs."""
    check_dtype(_OP, "gate_up", gate_up, FLOAT_DTYPES)
    if gate_up.shape[-1] % 2 != 0:
        raise ValueError(f"{_OP}: gate_up's last dim must be even (gate | up), got {tuple(gate_up.shape)}")
    _check_linear(gate_up[..., : gate_up.shape[-1] // 2], weight, bias)
    x2 = gate_up.reshape(-1, gate_up.shape[-1])
    if _takes_dense_gemv(x2):
        out = dense_gemv(x2, weight, bias, gated=True)
        return out.view(*gate_up.shape[:-1], weight.shape[0])
    from kernels.activation import silu_and_mul

    return linear(silu_and_mul(gate_up), weight, bias)


def _takes_dense_gemv(x2: torch.Tensor) -> bool:  # x2: [M, K]
    """Whether these rows run the dense GEMV: a few of them, on a GPU, reference mode off."""
    return 0 < x2.shape[0] <= DENSE_GEMV_MAX_M and x2.is_cuda and not reference_enabled()


def _check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_ndim(_OP, "weight", weight, 2, "[out_features, in_features]")
    if weight.dtype != x.dtype or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{_OP}: x {tuple(x.shape)} {x.dtype} does not match weight {tuple(weight.shape)} {weight.dtype}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{_OP}: bias {tuple(bias.shape)} for {weight.shape[0]} outputs")


def dense_gemv(
    x: torch.Tensor,  # [M, K], or [M, 2K] (gate | up) with gated
    weight: torch.Tensor,  # [N, K], x's dtype
    bias: torch.Tensor | None = None,  # [N]
    config: dict[str, int] | None = None,  # keys DENSE_CONFIG_KEYS, overriding `dense_gemv_config`
    gated: bool = False,
) -> torch.Tensor:  # [M, N], x's dtype
    """`F.linear(x, weight, bias)` for M <= GEMV_MAX_ROWS rows, accumulated in float32 and
    rounded once to x's dtype. `gated`: x is a fused gate/up projection and the input is
    silu(gate) * up, formed as each step loads it, rounded as `kernels.activation.silu_and_mul`
    rounds (the unfused pair's result, but for the last bits of an activation where the two
    compiled sigmoids differ). No checks: callers check. No host sync: graph-safe."""
    m, k = x.shape
    k = k // 2 if gated else k
    cfg = {**dense_gemv_config(m, weight.shape[0], k), **(config or {})}
    block = (1, cfg.pop("BLOCK_K"))
    return _launch(x, None, weight, None, x.dtype, bias, block, cfg, gated=gated)


def _launch(
    x: torch.Tensor,
    x_s: torch.Tensor | None,
    w: torch.Tensor,
    w_s: torch.Tensor | None,  # None: dense weights
    out_dtype: torch.dtype,
    bias: torch.Tensor | None,
    block: tuple[int, int],  # (bn, bk): scale blocks; bk is also the step along K
    cfg: dict[str, Any],  # BLOCK_N, SPLIT_K and launch options
    gated: bool = False,  # x is [M, 2K]: gate | up (dense weights only)
    mma: bool = False,  # FP8 weights on tensor cores, up to MMA_MAX_M rows
) -> torch.Tensor:
    m = x.shape[0]
    n, k = w.shape
    assert m <= (MMA_MAX_M if mma else GEMV_MAX_ROWS), m
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    bn, bk = block
    cfg = dict(cfg)
    block_n = cfg.pop("BLOCK_N")
    groups = triton.cdiv(k, bk)
    groups_per_split = triton.cdiv(groups, cfg.pop("SPLIT_K"))
    split_k = triton.cdiv(groups, groups_per_split)  # none of them empty
    partial = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    scaled = w_s is not None
    _gemv_kernel[(triton.cdiv(n, block_n), split_k)](
        x,
        x_s if x_s is not None else x,  # unused with FUSE_QUANT or dense weights
        w,
        w_s if w_s is not None else w,  # unused with dense weights
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
        *w.stride(),
        *(w_s.stride() if w_s is not None else (0, 0)),
        *partial.stride()[-2:],
        partial.stride(0) if split_k > 1 else 0,
        GROUP_N=bn,
        GROUP_K=bk,
        HAS_BIAS=bias is not None and split_k == 1,
        EVEN_K=k % bk == 0,
        SCALED=scaled,
        SCALAR_W_SCALE=scaled and bn % block_n == 0,
        FUSE_QUANT=scaled and x_s is None,
        GATED=gated,
        MMA=mma,
        ONE_ROW=mma and x_s is None and m == 1,
        LOOP_WHILE=interpreting(),
        BLOCK_M=MMA_MAX_M if mma else triton.next_power_of_2(m),
        BLOCK_N=block_n,
        **cfg,
        **pdl.launch_options(x),
    )
    if split_k > 1:
        split_k_sum(partial[:, None], bias, out[None])
    return out


def split_k_sum(
    partial: torch.Tensor,  # [S, B, M, N] float32, contiguous
    bias: torch.Tensor | None,  # [N]
    out: torch.Tensor,  # [B, M, N]
) -> None:
    """out = sum over S of partial (+ bias), in split order, cast to out's dtype."""
    split_k, batch, m, n = partial.shape
    block_n = min(1024, triton.next_power_of_2(n))
    _split_k_sum_kernel[(batch * m, triton.cdiv(n, block_n))](
        partial,
        bias if bias is not None else out,
        out,
        m,
        n,
        partial.stride(0),
        *out.stride(),
        HAS_BIAS=bias is not None,
        SPLIT_K=split_k,
        BLOCK_N=block_n,
        **pdl.launch_options(partial),
    )


@triton.jit
def _gemv_kernel(
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
    SCALED: tl.constexpr,
    SCALAR_W_SCALE: tl.constexpr,
    FUSE_QUANT: tl.constexpr,
    GATED: tl.constexpr,
    MMA: tl.constexpr,
    ONE_ROW: tl.constexpr,
    LOOP_WHILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.wait(USE_PDL)  # before any load: the kernel before may still run
    pdl.release(USE_PDL)
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, GROUP_K)  # [GROUP_K]
    # Rows past the edge re-read valid ones (wrapped) instead of masking; never stored.
    rows_m = (offs_m % M).to(tl.int64)
    rows_n = (offs_n % N).to(tl.int64)
    k_lo = split * k_per_split  # a whole number of groups
    k_hi = tl.minimum(K, k_lo + k_per_split)
    if ONE_ROW:
        x_rows = tl.zeros((1,), dtype=tl.int64)  # MMA, M = 1: quantized once, then repeated
    else:
        x_rows = rows_m
    x_ptrs = x_ptr + x_rows[:, None] * x_stride_m + (k_lo + offs_k)[None, :] * x_stride_k  # [BM|1, GK]
    w_ptrs = w_ptr + rows_n[:, None] * w_stride_n + (k_lo + offs_k)[None, :] * w_stride_k  # [BN, GK]
    xs_ptrs = xs_ptr + rows_m * xs_stride_m  # [BLOCK_M]
    if SCALAR_W_SCALE:
        # The column tile lies in one weight block: one scale per group.
        ws_ptrs = ws_ptr + ((pid_n * BLOCK_N) // GROUP_N) * ws_stride_n
    else:
        ws_ptrs = ws_ptr + (rows_n // GROUP_N) * ws_stride_n  # [BLOCK_N]

    if MMA:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # out^T, reduced by the MMAs
    elif BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, GROUP_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, GROUP_K), dtype=tl.float32)
    # The interpreter (Triton 3.6, numpy >= 2.4) cannot take a scalar argument as a range()
    # bound (triton-lang/triton#9171); compiled kernels take the pipelined `for`.
    if LOOP_WHILE:
        k0 = k_lo
        while k0 < k_hi:
            acc = _gemv_step(
                acc, x_ptrs, xs_ptrs, w_ptrs, ws_ptrs, xs_stride_k, ws_stride_k, offs_k, k0, K,
                x_stride_k, fp8_max, eps, GROUP_K, EVEN_K, SCALED, SCALAR_W_SCALE, FUSE_QUANT, GATED,
                MMA, ONE_ROW, BLOCK_M,
            )  # fmt: skip
            x_ptrs += GROUP_K * x_stride_k
            w_ptrs += GROUP_K * w_stride_k
            k0 += GROUP_K
    else:
        for k0 in range(k_lo, k_hi, GROUP_K):
            acc = _gemv_step(
                acc, x_ptrs, xs_ptrs, w_ptrs, ws_ptrs, xs_stride_k, ws_stride_k, offs_k, k0, K,
                x_stride_k, fp8_max, eps, GROUP_K, EVEN_K, SCALED, SCALAR_W_SCALE, FUSE_QUANT, GATED,
                MMA, ONE_ROW, BLOCK_M,
            )  # fmt: skip
            x_ptrs += GROUP_K * x_stride_k
            w_ptrs += GROUP_K * w_stride_k

    if MMA:
        result = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    elif BLOCK_M == 1:
        result = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N]
    else:
        result = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        result += tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
    out_ptr += split.to(tl.int64) * o_stride_split
    out_ptrs = out_ptr + offs_m[:, None] * o_stride_m + offs_n[None, :] * o_stride_n
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_step(
    acc,  # [BLOCK_N, GROUP_K] (BLOCK_M == 1), [BLOCK_M, BLOCK_N, GROUP_K], or [BLOCK_N, BLOCK_M] (MMA)
    x_ptrs,  # [BLOCK_M, GROUP_K] (or [1, GROUP_K] with ONE_ROW) at column k0
    xs_ptrs,  # [BLOCK_M] x's scales, group 0 (unused with FUSE_QUANT)
    w_ptrs,  # [BLOCK_N, GROUP_K] at column k0
    ws_ptrs,  # [BLOCK_N] w's scales, group 0 (a scalar pointer with SCALAR_W_SCALE)
    xs_stride_k,
    ws_stride_k,
    offs_k,  # [GROUP_K]
    k0,
    K,
    x_stride_k,
    fp8_max,
    eps,
    GROUP_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    SCALED: tl.constexpr,
    SCALAR_W_SCALE: tl.constexpr,
    FUSE_QUANT: tl.constexpr,
    GATED: tl.constexpr,
    MMA: tl.constexpr,
    ONE_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """acc + the (dequantized) products of columns [k0, k0 + GROUP_K): unreduced on the CUDA
    cores, reduced over the group with MMA."""
    x = _load_step(x_ptrs, offs_k, K - k0, EVEN_K)  # [BLOCK_M, GROUP_K]
    w = _load_step(w_ptrs, offs_k, K - k0, EVEN_K)  # [BLOCK_N, GROUP_K]
    if MMA:  # FP8 weights only
        out = _mma_group(
            acc, x, w, xs_ptrs, ws_ptrs, xs_stride_k, ws_stride_k, k0 // GROUP_K, fp8_max, eps,
            GROUP_K, SCALAR_W_SCALE, FUSE_QUANT, ONE_ROW, BLOCK_M,
        )  # fmt: skip
    else:
        if GATED:  # x holds the gates; the ups sit K columns on. silu_and_mul's roundings.
            up = _load_step(x_ptrs + K * x_stride_k, offs_k, K - k0, EVEN_K)
            g = x.to(tl.float32)
            silu = (g * tl.sigmoid(g)).to(x.dtype)
            x = (silu.to(tl.float32) * up.to(tl.float32)).to(x.dtype)
        # w widens to float32 only after x's quantization: widening it first keeps a float32
        # tile live through the quantization's reduction, which made FP8 batch-1 decode 33%
        # slower on the H200 (630cc3b; docs/benchmarks.md).
        if not SCALED:
            xd = x.to(tl.float32)
            wf = w.to(tl.float32)
        else:
            group = k0 // GROUP_K
            if FUSE_QUANT:
                q, x_scale = quant_groups_e4m3(x.to(tl.float32), fp8_max, eps)  # on the E4M3 grid, [BM]
            else:
                q = x.to(tl.float32)
                x_scale = tl.load(xs_ptrs + group * xs_stride_k)  # [BLOCK_M]
            w_scale = tl.load(ws_ptrs + group * ws_stride_k)
            wf = w.to(tl.float32)
            if SCALAR_W_SCALE:
                xd = q * (x_scale * w_scale)[:, None]  # [BLOCK_M, GROUP_K]
            else:
                xd = q * x_scale[:, None]
                wf = wf * w_scale[:, None]
        if BLOCK_M == 1:
            out = acc + wf * xd
        else:
            out = acc + wf[None, :, :] * xd[:, None, :]
    return out


@triton.jit
def _mma_group(
    acc,  # [BLOCK_N, BLOCK_M] float32: out^T so far
    x,  # [BLOCK_M, GROUP_K] float (FUSE_QUANT; [1, GROUP_K] with ONE_ROW) or E4M3 codes
    w,  # [BLOCK_N, GROUP_K] E4M3 codes
    xs_ptrs,  # [BLOCK_M] x's scales, group 0 (unused with FUSE_QUANT)
    ws_ptrs,  # [BLOCK_N] w's scales, group 0 (a scalar pointer with SCALAR_W_SCALE)
    xs_stride_k,
    ws_stride_k,
    group,
    fp8_max,
    eps,
    GROUP_K: tl.constexpr,
    SCALAR_W_SCALE: tl.constexpr,
    FUSE_QUANT: tl.constexpr,
    ONE_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """acc + the scaled FP8 tensor-core product of one scale group, transposed."""
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
    part = tl.dot(w, tl.trans(q))  # [BLOCK_N, BLOCK_M] float32
    if SCALAR_W_SCALE:
        return acc + part * (x_scale * w_scale)[None, :]
    else:
        return acc + part * w_scale[:, None] * x_scale[None, :]


@triton.jit
def _load_step(ptrs, offs_k, cols_left, EVEN_K: tl.constexpr):
    """One step's tile along K; past the last column (a ragged K) zeros."""
    if EVEN_K:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=offs_k[None, :] < cols_left, other=0.0)


@triton.jit
def _split_k_sum_kernel(
    partial_ptr,  # [SPLIT_K, B, M, N] float32, contiguous
    bias_ptr,
    out_ptr,
    M,
    N,
    p_stride_split,
    o_stride_b,
    o_stride_m,
    o_stride_n,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.wait(USE_PDL)  # before any load: the kernel before may still run
    pdl.release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)  # b * M + m
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + split * p_stride_split + row * N + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = out_ptr + (row // M) * o_stride_b + (row % M) * o_stride_m + cols * o_stride_n
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
