"""Fused Mixture-of-Experts for DeepSeek-V2/V3: route, grouped GEMMs, combine.

    out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = topk_ids[t, j]

The weights are bfloat16/float16/float32 (the activation dtype), or float8_e4m3fn quantized in
128x128 blocks with a float32 dequantization multiplier per block (`w13_scale`, `w2_scale`).
The Triton path works on the T*k (token, expert) pairs, pair p = t * k + j:

    align     grid (E,)           sort the pairs by expert, pad each expert's run to BLOCK_M:
                                  sorted_ids [max_padded] (pad = T*k), expert_ids [max_padded /
                                  BLOCK_M], num_post_padded [1]; sizes from T, k, E alone
    gemm 1    grid (M-blocks*N-blocks)  one BLOCK_M block (one expert) x BLOCK_N outputs:
                                  h[p] = x[p // k] @ w13[e].T               -> h    [T*k, 2I]
    act       silu_and_mul                                                  -> a    [T*k, I]
    gemm 2    the same kernel     y[p] = topk_weights[p] * (a[p] @ w2[e].T) -> y    [T*k, H]
    combine   grid (T, H-blocks)  out[t] = sum_j y[t*k + j]                 -> out  [T, H]

    sorted_ids  |p p p pad|p pad pad pad|p p p p|p p pad pad|...     BLOCK_M = 4
    expert_ids  |   0     |     2       |   3   |    3      |...     experts without pairs: none

No step syncs with the host and every buffer is sized by the static bound
T*k + min(E, T*k) * (BLOCK_M - 1), so the op can be captured in a CUDA graph; M-blocks past
num_post_padded exit at once. With FP8 weights x and a are quantized per token in 128-wide groups
(`kernels.fp8_quant`) and each 128-deep K step of the GEMM scales its fp8 product by
a_scale[row, kb] * w_scale[e, n // 128, kb].

`fused_moe_ref` is the oracle and the CPU path of the model layer. It rounds as Hugging Face's
`DeepseekV3Experts` does: per hit expert, in ascending expert order, `F.linear` in x.dtype,
`silu(gate) * up` in x.dtype, down projection in x.dtype, times the float32 routing weight, cast
to x.dtype and `index_add_` into an x.dtype accumulator. The kernels round at the same points
(combine adds a token's experts in ascending id order, rounding to x.dtype after each add), so
the two differ only by the GEMMs' summation order (bit-equal in bf16 at V2-Lite's shapes on an
H100) and, with FP8 on Hopper, the MMA's reduced-precision sum inside each 128-deep step.

Memory: the intermediates h [T*k, 2I] and y [T*k, H] live for the call (x.dtype; ~480 MB for
8192 V2-Lite tokens); callers with longer prefills should chunk the tokens.

Ids outside [0, E) contribute nothing on both paths (checking them would cost a host sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.checks import FLOAT_DTYPES, INDEX_DTYPES, check_dtype, check_ndim, check_same_device
from kernels.config import interpreting, reference_enabled

_OP = "fused_moe"
_FP8_BLOCK = 128  # weight scales cover 128x128 blocks, activation scales 128-wide groups
_ALIGN_CHUNK = 1024  # pair ids one align program reads per step


@dataclass(frozen=True)
class FusedMoeConfig:
    """Tiles of the grouped GEMM. `block_m` is shared by both GEMMs (they share one alignment)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64  # 128 with FP8 weights: one K step per scale block
    group_m: int = 1  # M-blocks that sweep the N tiles together, for L2 reuse of weight tiles
    num_warps: int = 4
    num_stages: int = 3


def fused_moe(
    x: torch.Tensor,  # [T, H] float32/float16/bfloat16
    w13: torch.Tensor,  # [E, 2I, H]: gate_proj rows [0, I), up_proj rows [I, 2I)
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k] float32
    topk_ids: torch.Tensor,  # [T, k] int32/int64, in [0, E)
    *,
    w13_scale: torch.Tensor | None = None,  # [E, ceil(2I/128), ceil(H/128)] float32
    w2_scale: torch.Tensor | None = None,  # [E, ceil(H/128), ceil(I/128)] float32
    config: FusedMoeConfig | None = None,
) -> torch.Tensor:  # [T, H], x.dtype
    """Routed experts of a DeepSeek MoE layer: sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]).

    The routing weights already hold any routed scaling; shared experts are the caller's. Given
    `w13_scale` and `w2_scale`, w13 and w2 are float8_e4m3fn in 128x128 blocks (scale = dequant
    multiplier). `config` overrides the tile heuristic (benchmarks). Ids outside [0, E) are not
    detected (that needs a host sync) and contribute nothing. No host sync: graph-capturable.
    """
    fp8 = _check(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, config)
    if reference_enabled():
        return fused_moe_ref(x, w13, w2, topk_weights, topk_ids, w13_scale=w13_scale, w2_scale=w2_scale)
    num_tokens, hidden = x.shape
    num_experts, inter = w2.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    if num_tokens == 0:
        return torch.empty((0, hidden), dtype=x.dtype, device=x.device)
    num_pairs = num_tokens * top_k
    cfg1 = config or _config(num_pairs, num_experts, 2 * inter, hidden, fp8=fp8)
    cfg2 = config or _config(num_pairs, num_experts, hidden, inter, fp8=fp8)
    assert cfg1.block_m == cfg2.block_m, "both GEMMs walk one alignment"
    ids = topk_ids.reshape(-1)  # [P]
    weights = topk_weights.reshape(-1)  # [P] float32
    sorted_ids, expert_ids, num_post_padded = _align(ids, num_experts, cfg1.block_m)

    dtype = x.dtype
    a1, a1_scale = _quantize_if(fp8, x)  # [T, H], [T, ceil(H/128)] | None
    h = torch.empty((num_pairs, 2 * inter), dtype=dtype, device=x.device)  # [P, 2I]
    _gemm(a1, a1_scale, top_k, w13, w13_scale, h, None, sorted_ids, expert_ids, num_post_padded, cfg1)
    a2, a2_scale = _quantize_if(fp8, silu_and_mul(h))  # [P, I], [P, ceil(I/128)] | None
    y = torch.empty((num_pairs, hidden), dtype=dtype, device=x.device)  # [P, H]
    _gemm(a2, a2_scale, 1, w2, w2_scale, y, weights, sorted_ids, expert_ids, num_post_padded, cfg2)

    out = torch.empty((num_tokens, hidden), dtype=dtype, device=x.device)  # [T, H]
    block_h = min(1024, triton.next_power_of_2(hidden))
    _moe_combine_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y,
        ids,
        out,
        hidden,
        num_experts,
        top_k,
        y.stride(0),
        out.stride(0),
        BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_H=block_h,
    )
    return out


def _quantize_if(
    fp8: bool, a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:  # [M, K] (fp8), [M, ceil(K/128)] float32
    """The GEMM's activation operand: per-token 128-group FP8 for FP8 weights, else `a` as is."""
    if not fp8:
        return a, None
    from kernels.fp8_quant import per_token_group_quant_fp8

    return per_token_group_quant_fp8(a, _FP8_BLOCK)


def _config(num_pairs: int, num_experts: int, n: int, k: int, *, fp8: bool = False) -> FusedMoeConfig:
    """Tiles for one GEMM of `num_pairs` rows spread over `num_experts`, [N, K] weights.

    UNTUNED beyond a coarse sweep of whole `fused_moe` calls on one H100 at DeepSeek-V2-Lite's
    shapes (E=64, k=6, H=2048, I=1408; 1 to 8192 tokens, bf16 and FP8); other GPUs and models
    (V3: E=256, k=8, H=7168, I=2048) were not measured. Few rows per expert (decode) is weight-
    bandwidth bound: BLOCK_M 16 wastes little on padding, BLOCK_N 64 spreads an expert's weights
    over many programs (2.6-2.9 TB/s at 8..128 tokens). Many rows per expert (prefill) is
    compute bound: big tiles, 8 warps, GROUP_M so M-blocks of one expert share weight tiles in
    L2. Shared memory peaks at ~150 KB (bf16 prefill tile): fine on A100/H100.
    """
    del k  # the sweep found no K dependence worth a rule; a tuned table would key on it
    rows_per_expert = num_pairs / max(num_experts, 1)
    if rows_per_expert <= 16:
        return FusedMoeConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)
    if fp8 and rows_per_expert <= 256:
        return FusedMoeConfig(block_m=64, block_n=128, block_k=128, group_m=8, num_warps=4, num_stages=4)
    if fp8:
        return FusedMoeConfig(block_m=128, block_n=128, block_k=128, group_m=8, num_warps=8, num_stages=4)
    if rows_per_expert <= 64:
        return FusedMoeConfig(block_m=64, block_n=128, block_k=128, group_m=8, num_warps=4, num_stages=3)
    block_n = 256 if n >= 2048 else 128
    return FusedMoeConfig(block_m=128, block_n=block_n, block_k=64, group_m=8, num_warps=8, num_stages=3)


def _align(
    ids: torch.Tensor,  # [P] int32/int64 expert of each pair
    num_experts: int,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # sorted_ids, expert_ids, num_post_padded
    """Pairs sorted by expert, each expert's run padded to `block_m` (sizes static, no sync)."""
    num_pairs = ids.shape[0]
    # Each hit expert pads at most block_m - 1 slots, and at most min(E, P) experts are hit.
    max_padded = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    num_m_blocks = triton.cdiv(max_padded, block_m)
    sorted_ids = torch.empty((num_m_blocks * block_m,), dtype=torch.int32, device=ids.device)
    expert_ids = torch.empty((num_m_blocks,), dtype=torch.int32, device=ids.device)
    num_post_padded = torch.empty((1,), dtype=torch.int32, device=ids.device)
    _moe_align_kernel[(num_experts,)](
        ids,
        sorted_ids,
        expert_ids,
        num_post_padded,
        num_pairs,
        num_experts,
        BLOCK_M=block_m,
        BLOCK_E=triton.next_power_of_2(num_experts),
        CHUNK=min(_ALIGN_CHUNK, triton.next_power_of_2(num_pairs)),
    )
    return sorted_ids, expert_ids, num_post_padded


def _gemm(
    a: torch.Tensor,  # [rows, K]: x (row = pair // k) or the intermediate (row = pair)
    a_scale: torch.Tensor | None,  # [rows, ceil(K/128)] float32 when a is fp8
    rows_per_token: int,  # k for x, 1 for the intermediate
    w: torch.Tensor,  # [E, N, K]
    w_scale: torch.Tensor | None,  # [E, ceil(N/128), ceil(K/128)] float32 when w is fp8
    c: torch.Tensor,  # [P, N] out, row per pair
    routing_weights: torch.Tensor | None,  # [P] float32: scale each output row by it
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_post_padded: torch.Tensor,
    cfg: FusedMoeConfig,
) -> None:
    num_pairs, n = c.shape
    k = a.shape[1]
    num_m_blocks = expert_ids.shape[0]
    fp8 = a_scale is not None and w_scale is not None
    # Unused pointers still need a tensor; the constexpr flags keep them unread.
    a_s = a_scale if a_scale is not None else c
    w_s = w_scale if w_scale is not None else c
    a_s_strides = a_scale.stride() if a_scale is not None else (0, 0)
    w_s_strides = w_scale.stride() if w_scale is not None else (0, 0, 0)
    grid = (num_m_blocks * triton.cdiv(n, cfg.block_n),)
    _moe_gemm_kernel[grid](
        a,
        w,
        c,
        a_s,
        w_s,
        routing_weights if routing_weights is not None else c,
        sorted_ids,
        expert_ids,
        num_post_padded,
        n,
        k,
        num_pairs,
        rows_per_token,
        num_m_blocks,
        *a.stride(),
        *w.stride(),
        *c.stride(),
        *a_s_strides,
        *w_s_strides,
        MUL_ROUTED_WEIGHT=routing_weights is not None,
        FP8=fp8,
        EVEN_K=k % cfg.block_k == 0,
        LOOP_WHILE=interpreting(),
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _check(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    config: FusedMoeConfig | None,
) -> bool:  # FP8 weights
    check_ndim(_OP, "x", x, 2, "[tokens, hidden]")
    check_ndim(_OP, "w13", w13, 3, "[experts, 2 * intermediate, hidden]")
    check_ndim(_OP, "w2", w2, 3, "[experts, hidden, intermediate]")
    check_ndim(_OP, "topk_weights", topk_weights, 2, "[tokens, top_k]")
    check_ndim(_OP, "topk_ids", topk_ids, 2, "[tokens, top_k]")
    check_dtype(_OP, "x", x, FLOAT_DTYPES)
    check_dtype(_OP, "topk_weights", topk_weights, (torch.float32,))
    check_dtype(_OP, "topk_ids", topk_ids, INDEX_DTYPES)
    num_tokens, hidden = x.shape
    num_experts, two_inter, w13_hidden = w13.shape
    if num_experts < 1 or two_inter < 2 or two_inter % 2 != 0 or w13_hidden != hidden:
        raise ValueError(
            f"{_OP}: w13 must be [experts >= 1, 2 * intermediate, hidden={hidden}], got {tuple(w13.shape)}"
        )
    inter = two_inter // 2
    if tuple(w2.shape) != (num_experts, hidden, inter):
        raise ValueError(f"{_OP}: w2 must be {(num_experts, hidden, inter)} (w13's), got {tuple(w2.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != num_tokens or topk_ids.shape[1] < 1:
        raise ValueError(
            f"{_OP}: topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
            f"must both be [tokens={num_tokens}, top_k >= 1]"
        )
    if (w13_scale is None) != (w2_scale is None):
        raise ValueError(f"{_OP}: give both w13_scale and w2_scale (FP8 weights) or neither")
    tensors = {"x": x, "w13": w13, "w2": w2, "topk_weights": topk_weights, "topk_ids": topk_ids}
    fp8 = w13_scale is not None and w2_scale is not None
    if fp8:
        assert w13_scale is not None and w2_scale is not None
        check_dtype(_OP, "w13", w13, (torch.float8_e4m3fn,))
        check_dtype(_OP, "w2", w2, (torch.float8_e4m3fn,))
        check_dtype(_OP, "w13_scale", w13_scale, (torch.float32,))
        check_dtype(_OP, "w2_scale", w2_scale, (torch.float32,))
        for name, scale, (rows, cols) in (
            ("w13_scale", w13_scale, (two_inter, hidden)),
            ("w2_scale", w2_scale, (hidden, inter)),
        ):
            want = (num_experts, triton.cdiv(rows, _FP8_BLOCK), triton.cdiv(cols, _FP8_BLOCK))
            if tuple(scale.shape) != want:
                raise ValueError(f"{_OP}: {name} must be {want} (128x128 blocks), got {tuple(scale.shape)}")
        tensors.update(w13_scale=w13_scale, w2_scale=w2_scale)
    elif w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(
            f"{_OP}: w13 ({w13.dtype}) and w2 ({w2.dtype}) must have x's dtype {x.dtype} "
            "(or be float8_e4m3fn with scales)"
        )
    if config is not None:
        _check_config(config, fp8)
    check_same_device(_OP, **tensors)
    return fp8


def _check_config(cfg: FusedMoeConfig, fp8: bool) -> None:
    for name in ("block_m", "block_n", "block_k"):
        size = getattr(cfg, name)
        if size < 16 or size & (size - 1):
            raise ValueError(f"{_OP}: config.{name} must be a power of two >= 16, got {size}")
    if fp8 and (cfg.block_k != _FP8_BLOCK or _FP8_BLOCK % cfg.block_n != 0):
        raise ValueError(
            f"{_OP}: FP8 weights need config.block_k == {_FP8_BLOCK} and block_n dividing it, got {cfg}"
        )
    if cfg.group_m < 1 or cfg.num_warps < 1 or cfg.num_stages < 1:
        raise ValueError(f"{_OP}: config.group_m, num_warps and num_stages must be >= 1, got {cfg}")


@triton.jit
def _moe_align_kernel(
    ids_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_padded_ptr,
    num_pairs,
    num_experts,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # Program e histograms every pair (to find where its padded run starts), then writes its
    # own run. E redundant histograms cost less than a second launch at decode sizes.
    e = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    # `while`, not `for`, in these short loops: Triton 3.6's interpreter cannot take a tensor as a
    # range() bound (triton-lang/triton#9171), and nothing here needs software pipelining.
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    start = 0
    while start < num_pairs:
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
        valid = (offs < num_pairs) & (ids >= 0) & (ids < num_experts)
        counts += tl.histogram(ids, BLOCK_E, mask=valid)
        start += CHUNK
    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M  # [BLOCK_E]
    starts = tl.cumsum(padded, 0) - padded
    mine = experts == e
    start_e = tl.sum(tl.where(mine, starts, 0))
    count_e = tl.sum(tl.where(mine, counts, 0))
    padded_e = tl.sum(tl.where(mine, padded, 0))
    if e == 0:
        tl.store(num_post_padded_ptr, tl.sum(padded))
    block = start_e // BLOCK_M
    while block < (start_e + padded_e) // BLOCK_M:
        tl.store(expert_ids_ptr + block, e)
        block += 1
    tail = count_e + tl.arange(0, BLOCK_M)
    tl.store(sorted_ids_ptr + start_e + tail, num_pairs, mask=tail < padded_e)
    # This expert's pairs in pair order: a running count plus the rank within each chunk.
    filled = 0
    start = 0
    while start < num_pairs:
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
        hit = ((ids == e) & (offs < num_pairs)).to(tl.int32)
        rank = tl.cumsum(hit, 0) - 1
        tl.store(sorted_ids_ptr + start_e + filled + rank, offs, mask=hit != 0)
        filled += tl.sum(hit)
        start += CHUNK


@triton.jit
def _moe_gemm_kernel(
    a_ptr,
    w_ptr,
    c_ptr,
    a_scale_ptr,
    w_scale_ptr,
    routing_weights_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_padded_ptr,
    N,
    K,
    num_pairs,
    rows_per_token,
    num_m_blocks,
    a_stride_m,
    a_stride_k,
    w_stride_e,
    w_stride_n,
    w_stride_k,
    c_stride_m,
    c_stride_n,
    as_stride_m,
    as_stride_k,
    ws_stride_e,
    ws_stride_n,
    ws_stride_k,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    FP8: tl.constexpr,
    EVEN_K: tl.constexpr,
    LOOP_WHILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # GROUP_M consecutive M-blocks (mostly one expert) walk the N tiles together, so a weight
    # tile is read from L2 rather than HBM by all but the first.
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n_blocks
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    if pid_m * BLOCK_M >= tl.load(num_post_padded_ptr):
        return

    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    m_mask = pair < num_pairs
    a_row = (pair // rows_per_token).to(tl.int64)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    # Columns past N wrap around instead of being masked: loads stay unpredicated, the store drops them.
    n_start = pid_n * BLOCK_N
    offs_n = (n_start + tl.arange(0, BLOCK_N)) % N  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * a_stride_m + offs_k[None, :] * a_stride_k  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + expert * w_stride_e + offs_n[None, :] * w_stride_n + offs_k[:, None] * w_stride_k
    # Read only with FP8; BLOCK_N divides 128, so the whole tile shares one weight-scale row.
    as_ptrs = a_scale_ptr + a_row * as_stride_m  # [BLOCK_M]
    ws_ptr = w_scale_ptr + expert * ws_stride_e + (n_start // 128) * ws_stride_n

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    num_k_blocks = tl.cdiv(K, BLOCK_K)
    # Compiled kernels take the `for` loop, which Triton software-pipelines; the interpreter
    # cannot use a tensor as a range() bound (triton-lang/triton#9171).
    if LOOP_WHILE:
        kb = 0
        while kb < num_k_blocks:
            acc = _moe_k_step(
                acc, a_ptrs, w_ptrs, as_ptrs, ws_ptr, kb, K, m_mask, offs_k, a_stride_k, w_stride_k,
                as_stride_k, ws_stride_k, FP8, EVEN_K, DOT_PRECISION, BLOCK_K,
            )  # fmt: skip
            kb += 1
    else:
        for kb in range(0, num_k_blocks):
            acc = _moe_k_step(
                acc, a_ptrs, w_ptrs, as_ptrs, ws_ptr, kb, K, m_mask, offs_k, a_stride_k, w_stride_k,
                as_stride_k, ws_stride_k, FP8, EVEN_K, DOT_PRECISION, BLOCK_K,
            )  # fmt: skip

    # Round where the reference rounds: the GEMM result to the output dtype, then the routing
    # weight product in float32, rounded again.
    out = acc.to(c_ptr.dtype.element_ty)
    if MUL_ROUTED_WEIGHT:
        rw = tl.load(routing_weights_ptr + pair, mask=m_mask, other=0.0)
        out = (out.to(tl.float32) * rw[:, None]).to(c_ptr.dtype.element_ty)
    cols = n_start + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + pair.to(tl.int64)[:, None] * c_stride_m + cols[None, :] * c_stride_n
    tl.store(c_ptrs, out, mask=m_mask[:, None] & (cols[None, :] < N))


@triton.jit
def _moe_k_step(
    acc,  # [BLOCK_M, BLOCK_N] float32
    a_ptrs,  # [BLOCK_M, BLOCK_K] at k = 0
    w_ptrs,  # [BLOCK_K, BLOCK_N] at k = 0
    as_ptrs,
    ws_ptr,
    kb,
    K,
    m_mask,
    offs_k,
    a_stride_k,
    w_stride_k,
    as_stride_k,
    ws_stride_k,
    FP8: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    a_ptrs += kb * BLOCK_K * a_stride_k
    w_ptrs += kb * BLOCK_K * w_stride_k
    if EVEN_K:
        a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
        w = tl.load(w_ptrs)
    else:
        k_mask = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
    if FP8:
        # BLOCK_K == 128: step kb is scale block kb of both operands. Hopper's FP8 MMA sums a
        # step's 128 products at reduced precision (~2^-9 relative); scaling each step into the
        # float32 acc keeps that from compounding over K. Exact sums (max_num_imprecise_acc=0)
        # measured 1.2-1.9x slower on H100 for a deviation already ~10x below FP8's own error.
        a_s = tl.load(as_ptrs + kb * as_stride_k, mask=m_mask, other=0.0)  # [BLOCK_M]
        w_s = tl.load(ws_ptr + kb * ws_stride_k)
        acc += tl.dot(a, w) * (a_s[:, None] * w_s)
    else:
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _moe_combine_kernel(
    y_ptr,
    ids_ptr,
    out_ptr,
    H,
    num_experts,
    top_k,
    y_stride,
    out_stride,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # The reference index_adds expert by expert in ascending id, rounding to out's dtype after
    # each add; summing a token's k rows in that order and rounding the same way matches it.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    slots = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + t * top_k + slots, mask=slots < top_k, other=-1)
    valid = (slots < top_k) & (ids >= 0) & (ids < num_experts)
    # rank[j]: how many of this token's valid experts have a smaller id.
    smaller = (ids[None, :] < ids[:, None]) & valid[None, :]  # [BLOCK_K, BLOCK_K]
    rank = tl.sum(smaller.to(tl.int32), axis=1)
    rows = t * top_k + slots
    y = tl.load(
        y_ptr + rows[:, None] * y_stride + cols[None, :],
        mask=valid[:, None] & (cols[None, :] < H),
        other=0.0,
    ).to(tl.float32)  # [BLOCK_K, BLOCK_H]; rows of unrouted pairs were never written
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    s = 0
    while s < top_k:  # `while`: see _moe_align_kernel
        pick = valid & (rank == s)
        acc += tl.sum(tl.where(pick[:, None], y, 0.0), axis=0)
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        s += 1
    tl.store(out_ptr + t * out_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < H)


def fused_moe_ref(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k] float32
    topk_ids: torch.Tensor,  # [T, k]
    *,
    w13_scale: torch.Tensor | None = None,  # [E, ceil(2I/128), ceil(H/128)]
    w2_scale: torch.Tensor | None = None,  # [E, ceil(H/128), ceil(I/128)]
) -> torch.Tensor:  # [T, H], x.dtype
    """Pure-torch `fused_moe`, one hit expert at a time (syncs with the host to find them).

    Ids outside [0, E) contribute nothing. With FP8 weights it emulates the kernel's
    quantization exactly: x and the silu*up intermediate are quantized per token in 128-wide
    groups, both operands are dequantized to float32 and multiplied in float32, and the result
    is cast to x.dtype where the unquantized path would round.
    """
    num_experts = w13.shape[0]
    out = torch.zeros_like(x)  # [T, H]; HF accumulates in the activation dtype
    for e in torch.unique(topk_ids).tolist():
        if not 0 <= e < num_experts:
            continue
        slot, token_idx = torch.where(topk_ids.t() == e)  # [n], [n]; HF's row order
        if w13_scale is None or w2_scale is None:
            h = F.linear(x[token_idx], w13[e])  # [n, 2I]
            y = F.linear(silu_and_mul_ref(h), w2[e])  # [n, H]
        else:
            h = _linear_fp8_ref(x[token_idx], w13[e], w13_scale[e], x.dtype)
            y = _linear_fp8_ref(silu_and_mul_ref(h), w2[e], w2_scale[e], x.dtype)
        weighted = y * topk_weights[token_idx, slot, None]  # float32 product, as HF
        out.index_add_(0, token_idx, weighted.to(out.dtype))
    return out


def _linear_fp8_ref(
    a: torch.Tensor,  # [n, K], activation dtype
    w_q: torch.Tensor,  # [N, K] float8_e4m3fn
    w_scale: torch.Tensor,  # [ceil(N/128), ceil(K/128)] float32
    out_dtype: torch.dtype,
) -> torch.Tensor:  # [n, N]
    from kernels.fp8_quant import block_dequant_fp8, per_token_group_quant_fp8_ref

    k = a.shape[1]
    a_q, a_s = per_token_group_quant_fp8_ref(a, _FP8_BLOCK)  # [n, K], [n, ceil(K/128)]
    a_deq = a_q.float() * a_s.repeat_interleave(_FP8_BLOCK, dim=1)[:, :k]
    w_deq = block_dequant_fp8(w_q, w_scale, (_FP8_BLOCK, _FP8_BLOCK), torch.float32)
    return (a_deq @ w_deq.t()).to(out_dtype)
