"""Paged decode attention with grouped-query heads, split over the context (flash-decoding).

Each request has one new query (already rotated) whose K/V the backend stored before this call,
so request b attends over the keys at positions [0, seq_lens[b]) of its req_to_token row:

    q             [B, Hq, Dk]
    k_buffer      [num_slots, Hkv, Dk]       one layer of the token-slot pool
    v_buffer      [num_slots, Hkv, Dv]       (any strides: e.g. a column view of k_buffer)
    req_to_token  [rows, max_ctx]            position -> slot, per request row
    req_rows      [B]                        row of each request
    seq_lens      [B]                        keys per request, the new token included

A single program per (request, head) would leave most of a GPU idle on a small batch with long
contexts, so the keys are cut into `num_kv_splits` ranges that run in parallel:

    stage 1, grid (B, Hkv * head_blocks, splits)    one program: BLOCK_H query heads of one KV
             head over one key range -> partial output o_s (normalised) and its log-sum-exp l_s
    stage 2, grid (B, Hq)                           out = sum_s exp(l_s - L) * o_s, L = logsumexp_s l_s

Stage 1 puts the query heads that share a KV head (the GQA group) in the rows of one tile, so
each K/V block is loaded once for the whole group and both products run on the tensor cores.
With a sliding window w the query at position p = seq_len - 1 sees keys (p - w, p]; only that
range is split.

The pool may be float8_e4m3fn (an FP8 KV cache, scale 1.0): each K/V block is converted after
its load and the products run on the tensor cores as on a 16-bit pool. With a bfloat16 query
they run in float16: every E4M3 value is exact in float16, the conversion is one instruction per
pair on Hopper where bf16 takes several (an H100 sweep, batch 128 at 1k context: the FP8 pool
was only 1.3x faster than bf16 for half the bytes), and float16 holds q and the probabilities
more finely than bfloat16 (q is clamped to float16's range first). Head dims that are
not powers of two are padded (masked) up to one; MLA's 576-wide latent has its own kernel,
`kernels.mla_decode`, that avoids the padding and loads each latent block once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.checks import check_index_vectors, check_paged_attention
from kernels.config import interpreting, reference_enabled
from kernels.extend_attention import extend_attention_ref

_OP = "decode_attention"

# Split-K plan: enough programs to fill a large GPU, but no split shorter than a few key blocks,
# since every split adds a partial result to write and merge.
_TARGET_PROGRAMS = 512
_MIN_TOKENS_PER_SPLIT = 256
_MAX_KV_SPLITS = 16
_BLOCK_N = 64
# Stage-1 launch over an FP8 pool. H100 sweep (bench/fast_path_sweep.py), batch 128 at 1k
# context: 131 us a layer with 2 warps and 3 stages against 152 with Triton's default 4 warps
# (bf16 pools: the defaults were within 1% of the best).
_FP8_LAUNCH = {"num_warps": 2, "num_stages": 3}
# tl.dot needs at least 16 rows; a GQA group is padded up to this.
_MIN_BLOCK_H = 16
_MAX_BLOCK_H = 64


def choose_num_kv_splits(max_kv_len: int, batch_size: int, head_programs: int) -> int:
    """How many ranges to split the longest context into (1 when the batch alone fills the GPU).

    `head_programs` is the number of stage-1 programs per request and range (KV heads times
    query-head blocks).
    """
    by_length = triton.cdiv(max(max_kv_len, 1), _MIN_TOKENS_PER_SPLIT)
    by_occupancy = triton.cdiv(_TARGET_PROGRAMS, max(batch_size * head_programs, 1))
    return max(1, min(_MAX_KV_SPLITS, by_length, by_occupancy))


def decode_attention(
    q: torch.Tensor,  # [B, Hq, Dk]
    k_buffer: torch.Tensor,  # [num_slots, Hkv, Dk]
    v_buffer: torch.Tensor,  # [num_slots, Hkv, Dv]
    req_to_token: torch.Tensor,  # [rows, max_ctx] int32/int64
    req_rows: torch.Tensor,  # [B] int32/int64
    seq_lens: torch.Tensor,  # [B] int32/int64, >= 1
    scaling: float,
    sliding_window: int | None = None,
    *,
    max_seq_len: int | None = None,
    num_kv_splits: int | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:  # [B, Hq, Dv], q's dtype
    """Attention of one new query per request over its cached keys (GQA, optional window).

    The pool is q's dtype or float8_e4m3fn; the values may be narrower than the keys (Dv != Dk).

    `max_seq_len` is max(seq_lens) if the caller knows it on the host (it sizes the split plan;
    without it the wrapper reads it from the device, a sync). `num_kv_splits` overrides the plan;
    `config` the stage-1 launch (keys BLOCK_N, num_warps, num_stages: sweeps and tests).
    """
    _check(q, k_buffer, v_buffer, req_to_token, req_rows, seq_lens, scaling, sliding_window, num_kv_splits)
    if reference_enabled():
        return decode_attention_ref(
            q, k_buffer, v_buffer, req_to_token, req_rows, seq_lens, scaling, sliding_window
        )
    batch_size, num_heads, k_dim = q.shape
    num_kv_heads, v_dim = v_buffer.shape[1:]
    out = q.new_empty((batch_size, num_heads, v_dim))
    if batch_size == 0:
        return out
    group = num_heads // num_kv_heads
    block_h = min(_MAX_BLOCK_H, max(_MIN_BLOCK_H, triton.next_power_of_2(group)))
    head_blocks = triton.cdiv(group, block_h)
    if num_kv_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())
        max_kv_len = min(max_seq_len, sliding_window) if sliding_window else max_seq_len
        num_kv_splits = choose_num_kv_splits(max_kv_len, batch_size, num_kv_heads * head_blocks)

    # Partial results of stage 1, in float32 whatever the model dtype.
    mid_out = torch.empty((batch_size, num_heads, num_kv_splits, v_dim), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((batch_size, num_heads, num_kv_splits), dtype=torch.float32, device=q.device)
    block_dv = max(16, triton.next_power_of_2(v_dim))
    fp8 = k_buffer.dtype == torch.float8_e4m3fn
    launch = {"BLOCK_N": _BLOCK_N, **(_FP8_LAUNCH if fp8 else {}), **(config or {})}
    _decode_stage1_kernel[(batch_size, num_kv_heads * head_blocks, num_kv_splits)](
        q,
        k_buffer,
        v_buffer,
        req_to_token,
        req_rows,
        seq_lens,
        mid_out,
        mid_lse,
        scaling,
        sliding_window or 0,
        *q.stride(),
        *k_buffer.stride(),
        *v_buffer.stride(),
        req_to_token.stride(0),
        *mid_out.stride(),
        *mid_lse.stride(),
        group,
        head_blocks,
        k_dim,
        v_dim,
        HAS_WINDOW=sliding_window is not None,
        LOOP_WHILE=interpreting(),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        Q_TO_F16=fp8 and q.dtype == torch.bfloat16,
        BLOCK_H=block_h,
        BLOCK_DK=max(16, triton.next_power_of_2(k_dim)),
        BLOCK_DV=block_dv,
        **launch,
        **pdl.launch_options(q),
    )
    merge_kv_splits(mid_out, mid_lse, out, block_dv)
    return out


def merge_kv_splits(
    mid_out: torch.Tensor,  # [B, H, S, Dv] float32: each split's normalised partial output
    mid_lse: torch.Tensor,  # [B, H, S] float32: each split's log-sum-exp
    out: torch.Tensor,  # [B, H, Dv]
    block_d: int,  # power of two >= Dv
) -> None:
    """Stage 2 of split-K decode (MHA and MLA alike): weight the splits' partial outputs by
    their softmax mass and write the result into `out`."""
    batch_size, num_heads, num_kv_splits, v_dim = mid_out.shape
    _decode_stage2_kernel[(batch_size, num_heads)](
        mid_out,
        mid_lse,
        out,
        *mid_out.stride(),
        *mid_lse.stride(),
        *out.stride(),
        num_kv_splits,
        v_dim,
        BLOCK_S=triton.next_power_of_2(num_kv_splits),
        BLOCK_D=block_d,
        **pdl.launch_options(mid_out),
    )


def _check(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scaling: float,
    sliding_window: int | None,
    num_kv_splits: int | None,
) -> None:
    check_paged_attention(_OP, q, k_buffer, v_buffer, req_to_token, scaling, sliding_window)
    check_index_vectors(_OP, q, q.shape[0], req_rows=req_rows, seq_lens=seq_lens)
    if num_kv_splits is not None and num_kv_splits < 1:
        raise ValueError(f"{_OP}: num_kv_splits must be >= 1, got {num_kv_splits}")


@triton.jit
def _decode_stage1_kernel(
    q_ptr,
    k_buf_ptr,
    v_buf_ptr,
    req_to_token_ptr,
    req_rows_ptr,
    seq_lens_ptr,
    mid_out_ptr,
    mid_lse_ptr,
    scaling,
    window,
    q_stride_b,
    q_stride_h,
    q_stride_d,
    k_stride_s,
    k_stride_h,
    k_stride_d,
    v_stride_s,
    v_stride_h,
    v_stride_d,
    r2t_stride_row,
    mo_stride_b,
    mo_stride_h,
    mo_stride_s,
    mo_stride_d,
    ml_stride_b,
    ml_stride_h,
    ml_stride_s,
    group,
    head_blocks,
    k_dim,
    v_dim,
    HAS_WINDOW: tl.constexpr,
    LOOP_WHILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    Q_TO_F16: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.wait(USE_PDL)  # before any load: the kernel before may still run
    pdl.release(USE_PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1) // head_blocks
    head_block = tl.program_id(1) % head_blocks
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    # Query heads kv_head * group + [head_block * BLOCK_H, +BLOCK_H), masked to the group.
    in_group = head_block * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    head_mask = in_group < group
    heads = kv_head * group + in_group
    dk = tl.arange(0, BLOCK_DK)
    dk_mask = dk < k_dim
    dv = tl.arange(0, BLOCK_DV)
    dv_mask = dv < v_dim

    seq_len = tl.load(seq_lens_ptr + b)
    row = tl.load(req_rows_ptr + b).to(tl.int64)
    kv_start = 0
    if HAS_WINDOW:
        kv_start = tl.maximum(seq_len - window, 0)
    split_len = tl.cdiv(seq_len - kv_start, num_splits)
    lo = kv_start + split * split_len
    hi = tl.minimum(lo + split_len, seq_len)

    q = tl.load(
        q_ptr + b * q_stride_b + heads[:, None] * q_stride_h + dk[None, :] * q_stride_d,
        mask=head_mask[:, None] & dk_mask[None, :],
        other=0.0,
    )  # [BLOCK_H, BLOCK_DK]
    if Q_TO_F16:  # an FP8 pool under a bf16 query: the blocks convert to q's dtype (see above)
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)

    # Every block below holds at least one key (lo < hi), so m_i is finite after the first one.
    # Compiled kernels take the `for` loop, which Triton software-pipelines; the interpreter
    # (Triton 3.6 with numpy >= 2.4) cannot use a tensor as a range() bound (triton-lang/triton#9171).
    if LOOP_WHILE:
        start = lo
        while start < hi:
            m_i, l_i, acc = _decode_block(
                q, m_i, l_i, acc, start, hi, row, kv_head, dk, dk_mask, dv, dv_mask, req_to_token_ptr,
                r2t_stride_row,
                k_buf_ptr, k_stride_s, k_stride_h, k_stride_d, v_buf_ptr, v_stride_s, v_stride_h, v_stride_d,
                scaling, DOT_PRECISION, BLOCK_N,
            )  # fmt: skip
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _decode_block(
                q, m_i, l_i, acc, start, hi, row, kv_head, dk, dk_mask, dv, dv_mask, req_to_token_ptr,
                r2t_stride_row,
                k_buf_ptr, k_stride_s, k_stride_h, k_stride_d, v_buf_ptr, v_stride_s, v_stride_h, v_stride_d,
                scaling, DOT_PRECISION, BLOCK_N,
            )  # fmt: skip

    # An empty split (lo >= hi: short request, many splits) leaves l_i = 0 and m_i = -inf, so its
    # log-sum-exp is -inf and stage 2 gives it zero weight.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    lse = m_i + tl.log(l_safe)
    out = acc / l_safe[:, None]
    tl.store(
        mid_out_ptr
        + b * mo_stride_b
        + heads[:, None] * mo_stride_h
        + split * mo_stride_s
        + dv[None, :] * mo_stride_d,
        out,
        mask=head_mask[:, None] & dv_mask[None, :],
    )
    tl.store(mid_lse_ptr + b * ml_stride_b + heads * ml_stride_h + split * ml_stride_s, lse, mask=head_mask)


@triton.jit
def _decode_block(
    q,  # [BLOCK_H, BLOCK_DK]
    m_i,  # [BLOCK_H] running max of the scores
    l_i,  # [BLOCK_H] running sum of exp(score - m_i)
    acc,  # [BLOCK_H, BLOCK_DV] running sum of exp(score - m_i) * v
    start,
    hi,
    row,
    kv_head,
    dk,
    dk_mask,
    dv,
    dv_mask,
    req_to_token_ptr,
    r2t_stride_row,
    k_buf_ptr,
    k_stride_s,
    k_stride_h,
    k_stride_d,
    v_buf_ptr,
    v_stride_s,
    v_stride_h,
    v_stride_d,
    scaling,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Fold the keys at positions [start, min(start + BLOCK_N, hi)) into the online softmax."""
    pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    n_mask = pos < hi
    slots = tl.load(req_to_token_ptr + row * r2t_stride_row + pos, mask=n_mask, other=0).to(tl.int64)
    # .to: an FP8 pool is converted to q's dtype (a no-op otherwise).
    k = tl.load(
        k_buf_ptr + slots[:, None] * k_stride_s + kv_head * k_stride_h + dk[None, :] * k_stride_d,
        mask=n_mask[:, None] & dk_mask[None, :],
        other=0.0,
    ).to(q.dtype)  # [BLOCK_N, BLOCK_DK]
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scaling  # [BLOCK_H, BLOCK_N]
    scores = tl.where(n_mask[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp(m_i - m_new)  # rescales what was summed under the old max
    p = tl.exp(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_buf_ptr + slots[:, None] * v_stride_s + kv_head * v_stride_h + dv[None, :] * v_stride_d,
        mask=n_mask[:, None] & dv_mask[None, :],
        other=0.0,
    ).to(q.dtype)  # [BLOCK_N, BLOCK_DV]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_stage2_kernel(
    mid_out_ptr,
    mid_lse_ptr,
    out_ptr,
    mo_stride_b,
    mo_stride_h,
    mo_stride_s,
    mo_stride_d,
    ml_stride_b,
    ml_stride_h,
    ml_stride_s,
    o_stride_b,
    o_stride_h,
    o_stride_d,
    num_splits,
    head_dim,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.wait(USE_PDL)  # before any load: the kernel before may still run
    pdl.release(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_mask = s < num_splits
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim

    lse = tl.load(
        mid_lse_ptr + b * ml_stride_b + h * ml_stride_h + s * ml_stride_s, mask=s_mask, other=float("-inf")
    )  # [BLOCK_S]
    part = tl.load(
        mid_out_ptr + b * mo_stride_b + h * mo_stride_h + s[:, None] * mo_stride_s + d[None, :] * mo_stride_d,
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    m = tl.max(lse, 0)
    # All splits empty only for seq_len 0 (no keys): keep the output at 0 instead of NaN.
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)  # [BLOCK_S]; each split's softmax mass relative to the largest
    total = tl.sum(w, 0)
    total = tl.where(total > 0, total, 1.0)
    out = tl.sum(part * w[:, None], 0) / total  # [BLOCK_D]
    tl.store(
        out_ptr + b * o_stride_b + h * o_stride_h + d * o_stride_d,
        out.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


def decode_attention_ref(
    q: torch.Tensor,  # [B, Hq, Dk]
    k_buffer: torch.Tensor,  # [num_slots, Hkv, Dk]
    v_buffer: torch.Tensor,  # [num_slots, Hkv, Dv]
    req_to_token: torch.Tensor,  # [rows, max_ctx]
    req_rows: torch.Tensor,  # [B]
    seq_lens: torch.Tensor,  # [B]
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [B, Hq, Dv], q's dtype
    """Pure-torch `decode_attention`: the extend reference with one new token per request
    (a decode step is exactly that case; see shared/batch.py)."""
    ones = torch.ones_like(seq_lens)
    return extend_attention_ref(
        q, k_buffer, v_buffer, req_to_token, req_rows, seq_lens - ones, ones, scaling, sliding_window
    )
