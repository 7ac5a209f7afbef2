"""Block-wise FP8 W8A8 matmul (DeepSeek-V3 style): E4M3 operands, float32 scales, float32 sums.

    a_q  [M, K] fp8      a_s  [M, ceil(K / bk)]              per token, per group of bk columns
    w_q  [N, K] fp8      w_s  [ceil(N / bn), ceil(K / bk)]   per bn x bk weight block
    out[m, n] = sum_kb (a_q[m, kb] . w_q[n, kb]) * a_s[m, kb] * w_s[n // bn, kb]

One program computes a BLOCK_M x BLOCK_N tile of the output. Its K loop steps BLOCK_K = bk
(or a divisor) columns at a time, so every step sees one scale per row of a and one per column
of w: the FP8 tensor-core product of the step (exact products, sums in the MMA's accumulator)
is scaled and added to a float32 accumulator, which is also what keeps the Hopper FP8 MMA's
reduced-precision accumulation to 128 products at a time. Each column's weight scale is loaded
by its own block index, so BLOCK_N need not match bn (a tile inside one block loads one).

Small M is memory-bound: the weight is streamed once, and a few wide tiles would leave most
SMs idle, so `_config` splits K over SPLIT_K programs per tile; each writes a float32 partial
and `split_k_sum` adds them (with the bias) into the output.

Up to `gemv.GEMV_MAX_M` tokens (decode), `fp8_linear` and `w8a8_block_fp8_matmul` without an
explicit `config` run `kernels.gemv.fp8_gemv` instead: a CUDA-core GEMV that streams the weight
faster than 16-row MMA tiles can (an explicit `config` pins this module's tensor-core kernel).
Up to `MMA_GEMV_MAX_M` tokens (16: all the tensor-core GEMV takes), `kernels.gemv.fp8_gemv(...,
mma=True)` comes first: tensor cores with the weight on the MMA's M side (on the H200 a few
percent faster than the CUDA-core GEMV at one token, and than the block GEMM at 2-16).

The 2-D matmul is the batched kernel with one batch; the batch (grid axis 1) takes arbitrary
strides, so MLA's absorbed weights run on a [T, H, K] activation viewed as [H, T, K].
`fp8_linear` / `fp8_bmm` quantize a float activation per token (`kernels.fp8_quant`) first,
except that `fp8_linear` with at most FUSED_QUANT_MAX_M tokens (decode) hands the float
activation to the GEMM itself: each K step (one whole group) quantizes its [BLOCK_M, bk] tile
with the quantization kernel's own rule (`quant_groups_e4m3`), so the codes and scales are the
same bit for bit and one launch and an activation round trip per linear are saved. Every column
tile re-quantizes the rows, which costs nothing while M is this small and the weight stream
decides the time.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kernels import gemv
from kernels.checks import FLOAT_DTYPES, check_dtype, check_ndim, check_same_device
from kernels.config import interpreting, reference_enabled
from kernels.fp8_quant import (
    FP8_DTYPE,
    FP8_EPS,
    FP8_MAX,
    Fp8Activation,
    check_block,
    expand_block_scale,
    per_token_group_quant_fp8,
    per_token_group_quant_fp8_ref,
    quant_groups_e4m3,
    quant_rows_fp8,
)
from kernels.gemv import split_k_sum

_CONFIG_KEYS = frozenset({"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "num_warps", "num_stages"})


# SMs of an H100 SXM: what the tile counts below are sized against.
_NUM_SMS = 132

# `fp8_linear` with at most this many tokens quantizes the activation inside the GEMM; 0: never.
# Measured on an H100 (Llama-3-8B shapes, CUDA graphs) the fused path saved nothing: the
# quantization in each K step (a row reduction, correctly rounded divisions, a layout change
# before the MMA) lengthens the memory-bound loop by about what the separate launch costs, and
# every column tile repeats it. M = 1 (one row quantized, then repeated over the tile): qkv 17.65
# vs 17.66 us, gate_up 56.1 vs 51.1, down 33.1 vs 31.3; M = 4 and 16 lose 1-7 us. Kept, tested,
# for a later attempt (e.g. quantizing a split's whole K range once, before its loop).
FUSED_QUANT_MAX_M = 0

# Tokens up to which `fp8_linear` / `w8a8_block_fp8_matmul` (no explicit config) take the
# tensor-core GEMV (`kernels.gemv.fp8_gemv(..., mma=True)`, at most MMA_MAX_M) before the
# CUDA-core one; 0: never. On the H200 with `gemv.mma_gemv_config`'s configs (the sweep's best)
# FP8 decode runs 1.035x (batch 1) and 1.023x (batch 16) faster than without it (`bench/gpu_bench.py
# --batches 1,16 --skip-hf --compare-fp8 --compare-fp8-mma 0`; docs/benchmarks.md).
MMA_GEMV_MAX_M = 16


def _config(m: int, n: int, k: int, batch: int = 1) -> dict[str, int]:
    """Tile sizes and launch options for B products [M, K] x [K, N] with 128-column groups.

    Only lightly tuned, from one sweep on an H100 at Llama-3-8B shapes (CUDA-graph timings,
    weights rotated past L2); `config=` on the wrappers lets a benchmark sweep further. Small M
    is memory-bound on the weight: narrow tiles, K split when the tiles alone would leave SMs
    idle. Large M is compute-bound: 128 x 128 tiles, GROUP_M ordering for L2 reuse.
    """
    if m > 256:
        return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}
    if m > 64:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    elif m > 16:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
    else:
        # Decode. Where 64-wide tiles alone fill the SMs (gate_up), 128-wide ones stream faster
        # (H100, M = 1: 48.8 vs 54.2 us, even at M = 4 and 16); elsewhere 64-wide tiles with K
        # split beat 128-wide ones split up to 8 ways (qkv 14.5 vs 15.6 us, down 27.8 vs 28.7).
        wide = batch * triton.cdiv(n, 64) >= _NUM_SMS
        cfg = {"BLOCK_M": 16, "BLOCK_N": 128 if wide else 64, "BLOCK_K": 128, "GROUP_M": 1}
        cfg |= {"num_warps": 4, "num_stages": 4}
    tiles = batch * triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    return {**cfg, "SPLIT_K": _split_k(tiles, m, k)}


def _split_k(tiles: int, m: int, k: int) -> int:
    """How many programs share a tile's K range: enough for ~2 programs per SM, at most 4, each
    still streaming >= 8 K steps, and the float32 partials (8 bytes per output element and
    split, written and read back) kept under a quarter of the weight's bytes."""
    if tiles >= _NUM_SMS:
        return 1
    wanted = triton.next_power_of_2(triton.cdiv(2 * _NUM_SMS, tiles))
    return max(1, min(4, wanted, triton.cdiv(k, 128) // 8, k // (32 * m)))


def w8a8_block_fp8_matmul(
    a_q: torch.Tensor,  # [M, K] float8_e4m3fn
    a_s: torch.Tensor,  # [M, ceil(K / bk)] float32
    w_q: torch.Tensor,  # [N, K] float8_e4m3fn
    w_s: torch.Tensor,  # [ceil(N / bn), ceil(K / bk)] float32
    out_dtype: torch.dtype,
    block: tuple[int, int] = (128, 128),
    *,
    bias: torch.Tensor | None = None,  # [N], added in float32 before the cast
    config: dict[str, int] | None = None,
) -> torch.Tensor:  # [M, N] out_dtype
    """a @ w^T for per-token-group quantized `a` and block-quantized `w` (see the module doc).

    `block` = (bn, bk): weight rows and columns per scale; bk is also a's group size. `config`
    overrides the tile choice (keys as `_config` returns them).
    """
    op = "w8a8_block_fp8_matmul"
    check_ndim(op, "a_q", a_q, 2, "[M, K]")
    check_ndim(op, "w_q", w_q, 2, "[N, K]")
    _check_operands(op, a_q, a_s, w_q, w_s, out_dtype, block, bias, config)
    if reference_enabled():
        return w8a8_block_fp8_matmul_ref(a_q, a_s, w_q, w_s, out_dtype, block, bias=bias)
    mma = _takes_mma_gemv(a_q.shape[0], config)
    if mma or _takes_gemv(a_q.shape[0], config):
        return gemv.fp8_gemv(a_q, a_s, w_q, w_s, out_dtype, block, bias, mma=mma)
    out = _launch(a_q[None], a_s[None], w_q[None], w_s[None], out_dtype, block, bias, config)
    return out[0]


def w8a8_block_fp8_bmm(
    a_q: torch.Tensor,  # [B, M, K] float8_e4m3fn, any strides
    a_s: torch.Tensor,  # [B, M, ceil(K / bk)] float32
    w_q: torch.Tensor,  # [B, N, K] float8_e4m3fn
    w_s: torch.Tensor,  # [B, ceil(N / bn), ceil(K / bk)] float32
    out_dtype: torch.dtype,
    block: tuple[int, int] = (128, 128),
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:  # [B, M, N] out_dtype
    """`w8a8_block_fp8_matmul` for each of B pairs (a_q[b], w_q[b]), in one launch."""
    op = "w8a8_block_fp8_bmm"
    check_ndim(op, "a_q", a_q, 3, "[B, M, K]")
    check_ndim(op, "w_q", w_q, 3, "[B, N, K]")
    if a_q.shape[0] != w_q.shape[0]:
        raise ValueError(f"{op}: batch sizes differ, a_q {tuple(a_q.shape)} vs w_q {tuple(w_q.shape)}")
    _check_operands(op, a_q, a_s, w_q, w_s, out_dtype, block, None, config)
    if reference_enabled():
        return w8a8_block_fp8_bmm_ref(a_q, a_s, w_q, w_s, out_dtype, block)
    return _launch(a_q, a_s, w_q, w_s, out_dtype, block, None, config)


def fp8_linear(
    x: torch.Tensor | Fp8Activation,  # [..., K] float32/float16/bfloat16, or its producer's codes
    w_q: torch.Tensor,  # [N, K] float8_e4m3fn
    w_s: torch.Tensor,  # [ceil(N / bn), ceil(K / bk)] float32
    bias: torch.Tensor | None = None,  # [N]
    block: tuple[int, int] = (128, 128),
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:  # [..., N] x.dtype
    """y = x @ w^T (+ bias) with x quantized per token in groups of bk (no host sync: safe in
    CUDA-graph capture). Up to GEMV_MAX_M tokens (no `config`) run the GEMV, which quantizes x
    itself where GEMV_FUSES_QUANT; up to FUSED_QUANT_MAX_M tokens are quantized inside the GEMM's
    launch; either way with the same codes and scales as `per_token_group_quant_fp8`. An
    `Fp8Activation` (its producer quantized it: `kernels.fp8_quant.FUSE_INTO_PRODUCERS`) goes to
    `w8a8_block_fp8_matmul` as it is, as [T, K] rows."""
    op = "fp8_linear"
    if isinstance(x, Fp8Activation):  # its producer quantized it (`FUSE_INTO_PRODUCERS`)
        return w8a8_block_fp8_matmul(x.codes, x.scales, w_q, w_s, x.dtype, block, bias=bias, config=config)
    check_dtype(op, "x", x, FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be [..., K], got a scalar")
    x2 = x.reshape(-1, x.shape[-1])  # [T, K]; a view unless x's rows are not evenly strided
    check_ndim(op, "w_q", w_q, 2, "[N, K]")
    _check_operands_shapes(op, x2, w_q, w_s, block)  # before any work
    bk = check_block(op, block)[1]
    mma = _takes_mma_gemv(x2.shape[0], config)
    if mma:
        gemv_quantizes = gemv.MMA_FUSES_QUANT
    else:
        gemv_quantizes = _takes_gemv(x2.shape[0], config) and gemv.GEMV_FUSES_QUANT
    if gemv_quantizes and not reference_enabled():
        _check_gemm(op, w_q, w_s, x.dtype, block, bias, config, x=x2)
        out = gemv.fp8_gemv(x2, None, w_q, w_s, x.dtype, block, bias, mma=mma)
    elif _fuses_quant(x2.shape[0], bk, config) and not reference_enabled():
        _check_gemm(op, w_q, w_s, x.dtype, block, bias, config, x=x2)
        out = _launch(x2[None], None, w_q[None], w_s[None], x.dtype, block, bias, config)[0]
    else:
        # Both steps follow the reference switch, so reference mode is exactly `fp8_linear_ref`.
        a_q, a_s = per_token_group_quant_fp8(x2, bk)
        out = w8a8_block_fp8_matmul(a_q, a_s, w_q, w_s, x.dtype, block, bias=bias, config=config)
    return out.view(*x.shape[:-1], w_q.shape[0])


def fp8_bmm(
    x: torch.Tensor,  # [B, M, K] float, any strides
    w_q: torch.Tensor,  # [B, N, K] float8_e4m3fn
    w_s: torch.Tensor,  # [B, ceil(N / bn), ceil(K / bk)] float32
    block: tuple[int, int] = (128, 128),
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:  # [B, M, N] x.dtype
    """x[b] @ w[b]^T for every b, x quantized per row in groups of bk (MLA's absorbed weights)."""
    op = "fp8_bmm"
    check_ndim(op, "x", x, 3, "[B, M, K]")
    check_dtype(op, "x", x, FLOAT_DTYPES)
    check_ndim(op, "w_q", w_q, 3, "[B, N, K]")
    _check_operands_shapes(op, x, w_q, w_s, block)  # before any work
    check_same_device(op, x=x)
    if reference_enabled():
        return fp8_bmm_ref(x, w_q, w_s, block)
    a_q, a_s = quant_rows_fp8(x, block[1])
    return w8a8_block_fp8_bmm(a_q, a_s, w_q, w_s, x.dtype, block, config=config)


def _takes_mma_gemv(m: int, config: dict[str, int] | None) -> bool:
    """Whether m tokens run the tensor-core GEMV: switched on, few enough tokens, no config pinned."""
    return 0 < m <= min(MMA_GEMV_MAX_M, gemv.MMA_MAX_M) and config is None


def _takes_gemv(m: int, config: dict[str, int] | None) -> bool:
    """Whether m tokens run `fp8_gemv`: few of them, and no tile config pinned."""
    return m <= gemv.GEMV_MAX_M and config is None


def _fuses_quant(m: int, bk: int, config: dict[str, int] | None) -> bool:
    """Whether `fp8_linear` quantizes its m tokens inside the GEMM: few tokens, and K steps of
    one whole group (each step needs its group's amax)."""
    return m <= FUSED_QUANT_MAX_M and (config or {}).get("BLOCK_K", bk) == bk


def _check_operands_shapes(
    op: str, a_q: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor, block: tuple[int, int]
) -> None:
    bn, bk = check_block(op, block)
    if a_q.shape[-1] != w_q.shape[-1]:
        raise ValueError(f"{op}: K differs, {tuple(a_q.shape)} vs weight {tuple(w_q.shape)}")
    n, k = w_q.shape[-2], w_q.shape[-1]
    expected = (*w_q.shape[:-2], triton.cdiv(n, bn), triton.cdiv(k, bk))
    if tuple(w_s.shape) != expected:
        raise ValueError(f"{op}: w_s must be {expected} for w_q {tuple(w_q.shape)}, got {tuple(w_s.shape)}")


def _check_operands(
    op: str,
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    out_dtype: torch.dtype,
    block: tuple[int, int],
    bias: torch.Tensor | None,
    config: dict[str, int] | None,
) -> None:
    check_dtype(op, "a_q", a_q, (FP8_DTYPE,))
    check_dtype(op, "a_s", a_s, (torch.float32,))
    _check_operands_shapes(op, a_q, w_q, w_s, block)
    bk = block[1]
    expected = (*a_q.shape[:-1], triton.cdiv(a_q.shape[-1], bk))
    if tuple(a_s.shape) != expected:
        raise ValueError(f"{op}: a_s must be {expected} for a_q {tuple(a_q.shape)}, got {tuple(a_s.shape)}")
    _check_gemm(op, w_q, w_s, out_dtype, block, bias, config, a_q=a_q, a_s=a_s)


def _check_gemm(
    op: str,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    out_dtype: torch.dtype,
    block: tuple[int, int],
    bias: torch.Tensor | None,
    config: dict[str, int] | None,
    **activations: torch.Tensor,
) -> None:
    """The checks of everything but the activation's shapes and dtypes (callers check those)."""
    check_dtype(op, "w_q", w_q, (FP8_DTYPE,))
    check_dtype(op, "w_s", w_s, (torch.float32,))
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: out_dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {out_dtype}")
    bk = block[1]
    # A K step holds a power-of-two number of columns, at least the FP8 MMA's 32, one scale wide.
    if bk < 32 or bk & (bk - 1):
        raise ValueError(f"{op}: the group size block[1] must be a power of two >= 32, got {bk}")
    tensors = {**activations, "w_q": w_q, "w_s": w_s}
    if bias is not None:
        check_dtype(op, "bias", bias, FLOAT_DTYPES)
        if tuple(bias.shape) != (w_q.shape[-2],):
            raise ValueError(f"{op}: bias must be [{w_q.shape[-2]}], got {tuple(bias.shape)}")
        tensors["bias"] = bias
    if config is not None:
        unknown = set(config) - _CONFIG_KEYS
        if unknown:
            raise ValueError(f"{op}: unknown config keys {sorted(unknown)}; known: {sorted(_CONFIG_KEYS)}")
        if config.get("SPLIT_K", 1) < 1:
            raise ValueError(f"{op}: config SPLIT_K must be >= 1, got {config['SPLIT_K']}")
        block_k = config.get("BLOCK_K", bk)
        if block_k < 32 or bk % block_k or block_k & (block_k - 1):
            raise ValueError(
                f"{op}: config BLOCK_K must be a power of two >= 32 dividing {bk}, got {block_k}"
            )
    check_same_device(op, **tensors)


def _launch(
    a: torch.Tensor,  # [B, M, K] fp8 codes, or float to quantize in the kernel
    a_s: torch.Tensor | None,  # [B, M, KB]; None: a is float, quantized per group in the kernel
    w_q: torch.Tensor,  # [B, N, K]
    w_s: torch.Tensor,  # [B, NB, KB]
    out_dtype: torch.dtype,
    block: tuple[int, int],
    bias: torch.Tensor | None,
    config: dict[str, int] | None,
) -> torch.Tensor:  # [B, M, N]
    batch, m, k = a.shape
    n = w_q.shape[1]
    out = torch.empty((batch, m, n), dtype=out_dtype, device=a.device)
    if out.numel() == 0:
        return out
    cfg: dict[str, Any] = {**_config(m, n, k, batch), **(config or {})}
    fuse_quant = a_s is None
    # Quantizing in the kernel needs a whole group per K step (its amax).
    cfg["BLOCK_K"] = block[1] if fuse_quant else min(cfg["BLOCK_K"], block[1])
    split_k = cfg.pop("SPLIT_K", 1)
    k_steps = triton.cdiv(k, cfg["BLOCK_K"])
    steps_per_split = triton.cdiv(k_steps, split_k)
    split_k = triton.cdiv(k_steps, steps_per_split)  # none of them empty
    # Split K: each split writes a float32 partial tile, a second kernel sums them.
    partial = (
        out if split_k == 1 else torch.empty((split_k, batch, m, n), dtype=torch.float32, device=out.device)
    )
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), batch, split_k)
    _w8a8_block_fp8_kernel[grid](
        a,
        a if a_s is None else a_s,  # unused with FUSE_QUANT
        w_q,
        w_s,
        bias if bias is not None else out,  # unused without HAS_BIAS
        partial,
        m,
        n,
        k,
        steps_per_split * cfg["BLOCK_K"],
        FP8_MAX,
        FP8_EPS,
        *a.stride(),
        *(a_s.stride() if a_s is not None else (0, 0, 0)),
        *w_q.stride(),
        *w_s.stride(),
        *partial.stride()[-3:],
        partial.stride(0) if split_k > 1 else 0,
        GROUP_N=block[0],
        GROUP_K=block[1],
        HAS_BIAS=bias is not None and split_k == 1,
        EVEN_K=k % cfg["BLOCK_K"] == 0,
        SCALAR_W_SCALE=block[0] % cfg["BLOCK_N"] == 0,
        SPLIT_K=split_k,
        FUSE_QUANT=fuse_quant,
        ONE_ROW=fuse_quant and m == 1,
        LOOP_WHILE=interpreting(),
        **cfg,
    )
    if split_k > 1:
        split_k_sum(partial, bias, out)
    return out


@triton.jit
def _w8a8_block_fp8_kernel(
    a_ptr,
    a_s_ptr,
    w_ptr,
    w_s_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    k_per_split,
    fp8_max,
    eps,
    a_stride_b,
    a_stride_m,
    a_stride_k,
    as_stride_b,
    as_stride_m,
    as_stride_k,
    w_stride_b,
    w_stride_n,
    w_stride_k,
    ws_stride_b,
    ws_stride_n,
    ws_stride_k,
    o_stride_b,
    o_stride_m,
    o_stride_n,
    o_stride_split,
    GROUP_N: tl.constexpr,
    GROUP_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    SCALAR_W_SCALE: tl.constexpr,
    SPLIT_K: tl.constexpr,
    FUSE_QUANT: tl.constexpr,
    ONE_ROW: tl.constexpr,
    LOOP_WHILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    # Grouped order: GROUP_M row tiles walk the column tiles together, so a weight tile is
    # still in L2 when the next row tile asks for it.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    # Rows and columns past the edge re-read valid ones (wrapped) instead of masking every
    # load; their results are never stored.
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:
        k_lo = tl.program_id(2) * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    if ONE_ROW:
        # M = 1 with FUSE_QUANT: load and quantize the row once, not BLOCK_M copies of it.
        a_rows = tl.zeros((1,), dtype=tl.int64)
    else:
        a_rows = rows
    a_ptrs = a_ptr + batch * a_stride_b + a_rows[:, None] * a_stride_m + offs_k[None, :] * a_stride_k
    w_ptrs = w_ptr + batch * w_stride_b + cols[None, :] * w_stride_n + offs_k[:, None] * w_stride_k
    a_ptrs += k_lo * a_stride_k
    w_ptrs += k_lo * w_stride_k
    as_ptrs = a_s_ptr + batch * as_stride_b + rows * as_stride_m  # [BLOCK_M]
    if SCALAR_W_SCALE:
        # The whole column tile lies in one weight block: one scale per K step.
        ws_ptrs = w_s_ptr + batch * ws_stride_b + ((pid_n * BLOCK_N) // GROUP_N) * ws_stride_n
    else:
        ws_ptrs = w_s_ptr + batch * ws_stride_b + (cols // GROUP_N) * ws_stride_n  # [BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Compiled kernels take the `for` loop, which Triton software-pipelines; the interpreter
    # (Triton 3.6 with numpy >= 2.4) cannot use a scalar argument as a range() bound
    # (triton-lang/triton#9171).
    if LOOP_WHILE:
        k0 = k_lo
        while k0 < k_hi:
            acc = _k_step(
                acc,
                a_ptrs,
                w_ptrs,
                as_ptrs,
                ws_ptrs,
                as_stride_k,
                ws_stride_k,
                offs_k,
                k0,
                K,
                fp8_max,
                eps,
                GROUP_K,
                EVEN_K,
                SCALAR_W_SCALE,
                FUSE_QUANT,
                ONE_ROW,
                BLOCK_M,
            )
            a_ptrs += BLOCK_K * a_stride_k
            w_ptrs += BLOCK_K * w_stride_k
            k0 += BLOCK_K
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            acc = _k_step(
                acc,
                a_ptrs,
                w_ptrs,
                as_ptrs,
                ws_ptrs,
                as_stride_k,
                ws_stride_k,
                offs_k,
                k0,
                K,
                fp8_max,
                eps,
                GROUP_K,
                EVEN_K,
                SCALAR_W_SCALE,
                FUSE_QUANT,
                ONE_ROW,
                BLOCK_M,
            )
            a_ptrs += BLOCK_K * a_stride_k
            w_ptrs += BLOCK_K * w_stride_k

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    if SPLIT_K > 1:
        out_ptr += tl.program_id(2).to(tl.int64) * o_stride_split
    out_ptrs = out_ptr + batch * o_stride_b + offs_m[:, None] * o_stride_m + offs_n[None, :] * o_stride_n
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _k_step(
    acc,  # [BLOCK_M, BLOCK_N] float32
    a_ptrs,  # [BLOCK_M, BLOCK_K] at column k0
    w_ptrs,  # [BLOCK_K, BLOCK_N] at column k0
    as_ptrs,  # [BLOCK_M] a's scales, group 0
    ws_ptrs,  # [BLOCK_N] w's scales, group 0 (a scalar pointer with SCALAR_W_SCALE)
    as_stride_k,
    ws_stride_k,
    offs_k,  # [BLOCK_K]
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
    """acc + the scaled product of columns [k0, k0 + BLOCK_K), which share one scale group
    (with FUSE_QUANT: are the whole group, a's float values quantized here; with ONE_ROW, a is
    one [1, BLOCK_K] row, repeated over the tile's rows after the quantization)."""
    if EVEN_K:
        a = tl.load(a_ptrs)
        w = tl.load(w_ptrs)
    else:
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < K - k0, other=0.0)
    if FUSE_QUANT:
        a, a_scale = quant_groups_e4m3(a.to(tl.float32), fp8_max, eps)
        a = a.to(w.dtype)
        if ONE_ROW:
            a = tl.broadcast_to(a, (BLOCK_M, a.shape[1]))
    else:
        a_scale = tl.load(as_ptrs + (k0 // GROUP_K) * as_stride_k)
    w_scale = tl.load(ws_ptrs + (k0 // GROUP_K) * ws_stride_k)
    if SCALAR_W_SCALE:
        # One multiply-add per accumulator element: this runs between the MMAs, not beside them.
        return acc + tl.dot(a, w) * (a_scale * w_scale)[:, None]
    else:
        return acc + tl.dot(a, w) * a_scale[:, None] * w_scale[None, :]


def w8a8_block_fp8_bmm_ref(
    a_q: torch.Tensor,  # [B, M, K]
    a_s: torch.Tensor,  # [B, M, ceil(K / bk)]
    w_q: torch.Tensor,  # [B, N, K]
    w_s: torch.Tensor,  # [B, ceil(N / bn), ceil(K / bk)]
    out_dtype: torch.dtype,
    block: tuple[int, int] = (128, 128),
    *,
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [B, M, N] out_dtype
    """Pure-torch `w8a8_block_fp8_bmm`: dequantize both operands to float32, then one matmul."""
    bn, bk = block
    a = a_q.float() * a_s.float().repeat_interleave(bk, dim=-1)[..., : a_q.shape[-1]]  # [B, M, K]
    w = w_q.float() * expand_block_scale(w_s, w_q.shape, (bn, bk))  # [B, N, K]
    out = a @ w.transpose(-1, -2)  # [B, M, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def w8a8_block_fp8_matmul_ref(
    a_q: torch.Tensor,  # [M, K]
    a_s: torch.Tensor,  # [M, ceil(K / bk)]
    w_q: torch.Tensor,  # [N, K]
    w_s: torch.Tensor,  # [ceil(N / bn), ceil(K / bk)]
    out_dtype: torch.dtype,
    block: tuple[int, int] = (128, 128),
    *,
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N] out_dtype
    """Pure-torch `w8a8_block_fp8_matmul`, the numerical oracle: dequantize, float32 matmul, cast."""
    return w8a8_block_fp8_bmm_ref(a_q[None], a_s[None], w_q[None], w_s[None], out_dtype, block, bias=bias)[0]


def fp8_linear_ref(
    x: torch.Tensor | Fp8Activation,  # [..., K], or its producer's codes
    w_q: torch.Tensor,  # [N, K]
    w_s: torch.Tensor,  # [ceil(N / bn), ceil(K / bk)]
    bias: torch.Tensor | None = None,  # [N]
    block: tuple[int, int] = (128, 128),
) -> torch.Tensor:  # [..., N] x.dtype
    """Pure-torch `fp8_linear`: the real E4M3 quantization of x (torch's cast), then the matmul
    reference. What FP8 layers run on CPU."""
    if isinstance(x, Fp8Activation):
        return w8a8_block_fp8_matmul_ref(x.codes, x.scales, w_q, w_s, x.dtype, block, bias=bias)
    x2 = x.reshape(-1, x.shape[-1])  # [T, K]
    a_q, a_s = per_token_group_quant_fp8_ref(x2, block[1])
    out = w8a8_block_fp8_matmul_ref(a_q, a_s, w_q, w_s, x.dtype, block, bias=bias)
    return out.view(*x.shape[:-1], w_q.shape[0])


def fp8_bmm_ref(
    x: torch.Tensor,  # [B, M, K]
    w_q: torch.Tensor,  # [B, N, K]
    w_s: torch.Tensor,  # [B, ceil(N / bn), ceil(K / bk)]
    block: tuple[int, int] = (128, 128),
) -> torch.Tensor:  # [B, M, N] x.dtype
    """Pure-torch `fp8_bmm`: reference quantization of every row, then the bmm reference."""
    batch, m, k = x.shape
    a_q, a_s = per_token_group_quant_fp8_ref(x.reshape(batch * m, k), block[1])
    return w8a8_block_fp8_bmm_ref(a_q.view(batch, m, k), a_s.view(batch, m, -1), w_q, w_s, x.dtype, block)
