"""MLA (DeepSeek-V2/V3) decode attention over the latent KV pool, split over the context.

With the up-projections absorbed into the query, MLA decode is multi-query attention over one
latent head per token, whose first Dv entries double as the value:

    q             [B, H, Dk]           q_abs = [q_nope @ W_UK | q_rope], Dk = Dv + Dr
    kv_buffer     [num_slots, 1, Dk]   per slot [c | k_rope]: c = normalised compressed KV
                                       (Dv = kv_lora_rank), k_rope the rotated shared key (Dr)
    score(h, t)   q[b, h] . kv[slot_t]      over all Dk
    out[b, h]     sum_t softmax_t(score) * kv[slot_t, :Dv]      [B, H, Dv]; the caller applies W_UV

Like `kernels.decode_attention`, the keys are cut into `num_kv_splits` ranges:

    stage 1, grid (head_blocks, splits, B)   one program: BLOCK_H query heads over one key range
             -> partial output (normalised) and its log-sum-exp, both float32
    stage 2, grid (B, H)                     decode_attention's merge of the splits

Every head shares the one latent, so a program loads each latent block [BLOCK_N, Dk] once, as
its two column parts c [BLOCK_N, Dv] and k_rope [BLOCK_N, Dr], and uses it for all BLOCK_H heads
in both products: scores = q_c c^T + q_rope k_rope^T, acc += p c. Splitting Dk = 512 + 64 this way
needs no padding to 1024. c must be a power of two (>= 16, what tl.dot takes); a narrower or
ragged rope part (tiny test models) is padded up to one, the padding masked. Head
blocks vary fastest in the grid, so the head blocks that read the same latent range run together
and share it through L2. With one split, stage 1 writes the output itself and stage 2 is skipped.
For many heads (H >= 64, compute-bound) the products run transposed, heads on their N side
(`MLADecodeConfig.heads_on_n`); `default_mla_config` holds the measured tilings.

An FP8 pool (float8_e4m3fn, scale 1.0) is converted to q's dtype after each load. No host sync
when the caller passes `num_kv_splits` (CUDA graphs: plan it with `choose_mla_kv_splits` from
the batch size and a bound on the sequence length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.checks import (
    FP8_DTYPES,
    INDEX_DTYPES,
    check_dtype,
    check_index_vectors,
    check_kv_dtype,
    check_ndim,
    check_same_device,
)
from kernels.config import interpreting, reference_enabled
from kernels.decode_attention import merge_kv_splits

_OP = "mla_decode_attention"

# Split-K plan, as in decode_attention: enough programs to fill a large GPU, no split shorter
# than a few key blocks. 256 programs (about two per H100 SM) measured best at H=16, context 4096:
# B=64 with 4 splits 79% of copy bandwidth (2: 68%, 8: 74%), B=128 with 2 splits 87% (1: 73%).
_TARGET_PROGRAMS = 256
_MIN_TOKENS_PER_SPLIT = 256
_MAX_KV_SPLITS = 16
# tl.dot needs M, N, K >= 16.
_MIN_DIM = 16


@dataclass(frozen=True)
class MLADecodeConfig:
    """Stage-1 tiling: query heads and keys per tile, and the launch's warps and pipeline depth."""

    block_h: int = 16
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    # Put the heads on the N side of both products (scores^T = latent q^T, acc^T += latent^T p^T):
    # the latent block's 64 rows and the 512 value columns then fill Hopper's 64-row wgmma
    # tiles, which a 16..64-head tile on the M side does not (measured on an H100, H=128:
    # 177 vs 146 TFLOP/s at the best tiling of each).
    heads_on_n: bool = False

    def validate(self) -> None:
        for name in ("block_h", "block_n"):
            value = getattr(self, name)
            if value < _MIN_DIM or not _is_power_of_two(value):
                raise ValueError(f"{_OP}: config.{name} must be a power of two >= {_MIN_DIM}, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"{_OP}: bad launch settings in {self}")


def default_mla_config(num_heads: int, kv_dtype: torch.dtype = torch.bfloat16) -> MLADecodeConfig:
    """Stage-1 tiling for `num_heads` query heads over a pool of `kv_dtype` (Dk = 576 in mind).

    Measured on an H100 at context 4096 (percentages of the 3.0 TB/s copy bandwidth); other
    shapes are untuned:
    - bf16/fp16, H < 64 (H=16 is memory-bound): 16 heads x 64 keys, 4 warps, 2 stages; 236
      registers, no spills, 92 KB shared memory. B=64: 80%, B=128: 88% (16 x 32: 70-78%;
      8 warps or 3 stages no better).
    - bf16/fp16, H >= 64 (H=128 is compute-bound, ~240 FLOP per byte): 64 heads x 64 keys with
      the heads on the N side, 8 warps, 2 stages: 174-184 TFLOP/s, 25-27% (the best heads-on-M
      tiling, 32 x 32: 146 TFLOP/s). 224 KB shared memory: fits Hopper (227 KB), not an A100.
    - float8_e4m3fn: Triton converts the FP8 blocks in registers on their way to shared memory
      and does not pipeline those loads, so FP8 runs slower than bf16 (H=16, B=64: 182 vs 127 us
      with 16 x 32, 4 warps, 2 stages; H=128: 886 vs 419 us with 32 x 32, 4 warps, 1 stage).
    """
    fp8 = kv_dtype in FP8_DTYPES
    if num_heads >= 64:
        if fp8:
            return MLADecodeConfig(block_h=32, block_n=32, num_warps=4, num_stages=1)
        return MLADecodeConfig(block_h=64, block_n=64, num_warps=8, num_stages=2, heads_on_n=True)
    if fp8:
        return MLADecodeConfig(block_h=16, block_n=32, num_warps=4, num_stages=2)
    return MLADecodeConfig(block_h=16, block_n=64, num_warps=4, num_stages=2)


def choose_mla_kv_splits(
    max_seq_len: int,
    batch_size: int,
    num_heads: int,
    kv_dtype: torch.dtype = torch.bfloat16,
    config: MLADecodeConfig | None = None,
) -> int:
    """How many ranges to split the longest context into (1 when the batch alone fills the GPU).

    Depends on its arguments alone: from a batch size and a bound on the sequence length it plans
    a CUDA graph's decode step as well as an eager one. `kv_dtype` and `config` as given to
    `mla_decode_attention` (they set the head blocks per request).
    """
    config = config or default_mla_config(num_heads, kv_dtype)
    head_blocks = triton.cdiv(max(num_heads, 1), config.block_h)
    by_length = triton.cdiv(max(max_seq_len, 1), _MIN_TOKENS_PER_SPLIT)
    by_occupancy = triton.cdiv(_TARGET_PROGRAMS, max(batch_size * head_blocks, 1))
    return max(1, min(_MAX_KV_SPLITS, by_length, by_occupancy))


def mla_decode_attention(
    q: torch.Tensor,  # [B, H, Dk]
    kv_buffer: torch.Tensor,  # [num_slots, 1, Dk]
    req_to_token: torch.Tensor,  # [rows, max_ctx] int32/int64
    req_rows: torch.Tensor,  # [B] int32/int64
    seq_lens: torch.Tensor,  # [B] int32/int64, >= 1
    scaling: float,
    v_dim: int,
    *,
    max_seq_len: int | None = None,
    num_kv_splits: int | None = None,
    config: MLADecodeConfig | None = None,
) -> torch.Tensor:  # [B, H, v_dim], q's dtype
    """Absorbed-MLA attention of one new query per request over its cached latents.

    `kv_buffer` is q's dtype or float8_e4m3fn; `v_dim` (kv_lora_rank) must be a power of two
    >= 16 and `Dk - v_dim` (the rope width) at least 1. `max_seq_len` is max(seq_lens) if the caller knows
    it on the host (it sizes the split plan; without it the wrapper reads it from the device, a
    sync); `num_kv_splits` overrides the plan, `config` the tiling (for benchmarks).
    """
    _check(q, kv_buffer, req_to_token, req_rows, seq_lens, scaling, v_dim, num_kv_splits)
    config = config or default_mla_config(q.shape[1], kv_buffer.dtype)
    config.validate()
    if reference_enabled():
        return mla_decode_attention_ref(q, kv_buffer, req_to_token, req_rows, seq_lens, scaling, v_dim)
    batch_size, num_heads, k_dim = q.shape
    out = q.new_empty((batch_size, num_heads, v_dim))
    if batch_size == 0:
        return out
    if num_kv_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())
        num_kv_splits = choose_mla_kv_splits(max_seq_len, batch_size, num_heads, kv_buffer.dtype, config)
    head_blocks = triton.cdiv(num_heads, config.block_h)

    if num_kv_splits == 1:
        # Stage 1's normalised output is final: write it in place, in q's dtype.
        mid_out, mid_lse = out[:, :, None, :], out[:, 0, 0]  # mid_lse: a dummy, never written
    else:
        mid_out = torch.empty(
            (batch_size, num_heads, num_kv_splits, v_dim), dtype=torch.float32, device=q.device
        )
        mid_lse = torch.empty((batch_size, num_heads, num_kv_splits), dtype=torch.float32, device=q.device)
    _mla_stage1_kernel[(head_blocks, num_kv_splits, batch_size)](
        q,
        kv_buffer,
        req_to_token,
        req_rows,
        seq_lens,
        mid_out,
        mid_lse,
        scaling * math.log2(math.e),
        num_heads,
        *q.stride(),
        kv_buffer.stride(0),
        kv_buffer.stride(2),
        req_to_token.stride(0),
        *mid_out.stride(),
        *(mid_lse.stride() if num_kv_splits > 1 else (0, 0, 0)),
        STORE_LSE=num_kv_splits > 1,
        LOOP_WHILE=interpreting(),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        V_DIM=v_dim,
        ROPE_DIM=k_dim - v_dim,
        BLOCK_R=max(_MIN_DIM, triton.next_power_of_2(k_dim - v_dim)),
        BLOCK_H=config.block_h,
        BLOCK_N=config.block_n,
        HEADS_ON_N=config.heads_on_n,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if num_kv_splits > 1:
        merge_kv_splits(mid_out, mid_lse, out, v_dim)
    return out


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check(
    q: torch.Tensor,
    kv_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scaling: float,
    v_dim: int,
    num_kv_splits: int | None,
) -> None:
    check_ndim(_OP, "q", q, 3, "[batch, q_heads, latent_dim]")
    check_ndim(_OP, "kv_buffer", kv_buffer, 3, "[num_slots, 1, latent_dim]")
    check_ndim(_OP, "req_to_token", req_to_token, 2, "[rows, max_context]")
    check_kv_dtype(_OP, q, kv_buffer=kv_buffer)
    check_dtype(_OP, "req_to_token", req_to_token, INDEX_DTYPES)
    if req_to_token.stride(1) != 1:
        raise ValueError(f"{_OP}: req_to_token rows must be contiguous, got strides {req_to_token.stride()}")
    if kv_buffer.shape[1] != 1:
        raise ValueError(f"{_OP}: an MLA pool has one latent head, got kv_buffer {tuple(kv_buffer.shape)}")
    k_dim = q.shape[2]
    if kv_buffer.shape[2] != k_dim:
        raise ValueError(f"{_OP}: q latent_dim {k_dim} != pool latent_dim {kv_buffer.shape[2]}")
    if v_dim < _MIN_DIM or not _is_power_of_two(v_dim):
        raise ValueError(f"{_OP}: v_dim must be a power of two >= {_MIN_DIM}, got {v_dim}")
    if k_dim <= v_dim:
        raise ValueError(f"{_OP}: latent_dim {k_dim} leaves no rope columns after v_dim {v_dim}")
    if not scaling > 0:
        raise ValueError(f"{_OP}: scaling must be positive, got {scaling}")
    if num_kv_splits is not None and num_kv_splits < 1:
        raise ValueError(f"{_OP}: num_kv_splits must be >= 1, got {num_kv_splits}")
    check_index_vectors(_OP, q, q.shape[0], req_rows=req_rows, seq_lens=seq_lens)
    check_same_device(_OP, q=q, kv_buffer=kv_buffer, req_to_token=req_to_token)


@triton.jit
def _mla_stage1_kernel(
    q_ptr,
    kv_ptr,
    req_to_token_ptr,
    req_rows_ptr,
    seq_lens_ptr,
    mid_out_ptr,
    mid_lse_ptr,
    scale_log2,  # scaling * log2(e): the softmax runs in base 2
    num_heads,
    q_stride_b,
    q_stride_h,
    q_stride_d,
    kv_stride_s,
    kv_stride_d,
    r2t_stride_row,
    mo_stride_b,
    mo_stride_h,
    mo_stride_s,
    mo_stride_d,
    ml_stride_b,
    ml_stride_h,
    ml_stride_s,
    STORE_LSE: tl.constexpr,
    LOOP_WHILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    V_DIM: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,  # ROPE_DIM padded to a power of two >= 16 (the padding masked)
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEADS_ON_N: tl.constexpr,
):
    head_block = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    num_splits = tl.num_programs(1)

    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H], the last block masked
    head_mask = heads < num_heads
    dc = tl.arange(0, V_DIM)  # latent columns of c (also the value)
    r = tl.arange(0, BLOCK_R)
    r_mask = r < ROPE_DIM
    dr = V_DIM + r  # latent columns of k_rope
    q_row = q_ptr + b * q_stride_b + heads[:, None] * q_stride_h  # [BLOCK_H, 1]
    q_c = tl.load(q_row + dc[None, :] * q_stride_d, mask=head_mask[:, None], other=0.0)  # [BLOCK_H, V_DIM]
    q_r = tl.load(
        q_row + dr[None, :] * q_stride_d, mask=head_mask[:, None] & r_mask[None, :], other=0.0
    )  # [BLOCK_H, BLOCK_R]

    seq_len = tl.load(seq_lens_ptr + b)
    row = tl.load(req_rows_ptr + b).to(tl.int64)
    # Whole key blocks per split, so only a split's last block is partial.
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seq_len)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    if HEADS_ON_N:
        # Heads on the products' N side: acc^T [V_DIM, BLOCK_H] (see MLADecodeConfig.heads_on_n).
        acc = tl.zeros([V_DIM, BLOCK_H], dtype=tl.float32)
        q_c = tl.trans(q_c)  # [V_DIM, BLOCK_H]
        q_r = tl.trans(q_r)  # [BLOCK_R, BLOCK_H]
    else:
        acc = tl.zeros([BLOCK_H, V_DIM], dtype=tl.float32)
    # Compiled kernels take the `for` loop, which Triton software-pipelines; the interpreter
    # (Triton 3.6 with numpy >= 2.4) cannot use a tensor as a range() bound (triton-lang/triton#9171).
    if LOOP_WHILE:
        start = lo
        while start < hi:
            m_i, l_i, acc = _mla_block(
                q_c, q_r, m_i, l_i, acc, start, hi, row, dc, dr, r_mask, req_to_token_ptr, r2t_stride_row,
                kv_ptr, kv_stride_s, kv_stride_d, scale_log2, HEADS_ON_N, DOT_PRECISION, BLOCK_N,
            )  # fmt: skip
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _mla_block(
                q_c, q_r, m_i, l_i, acc, start, hi, row, dc, dr, r_mask, req_to_token_ptr, r2t_stride_row,
                kv_ptr, kv_stride_s, kv_stride_d, scale_log2, HEADS_ON_N, DOT_PRECISION, BLOCK_N,
            )  # fmt: skip

    # An empty split (lo >= hi: short request, many splits) leaves l_i = 0 and m_i = -inf: its
    # log-sum-exp is -inf and stage 2 gives it zero weight.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    if HEADS_ON_N:
        out = tl.trans(acc / l_safe[None, :])  # [BLOCK_H, V_DIM]
    else:
        out = acc / l_safe[:, None]
    tl.store(
        mid_out_ptr
        + b * mo_stride_b
        + heads[:, None] * mo_stride_h
        + split * mo_stride_s
        + dc[None, :] * mo_stride_d,
        out.to(mid_out_ptr.dtype.element_ty),
        mask=head_mask[:, None],
    )
    if STORE_LSE:
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # back to natural log for the merge
        tl.store(
            mid_lse_ptr + b * ml_stride_b + heads * ml_stride_h + split * ml_stride_s, lse, mask=head_mask
        )


@triton.jit
def _mla_block(
    q_c,  # [BLOCK_H, V_DIM], or its transpose when HEADS_ON_N
    q_r,  # [BLOCK_H, BLOCK_R], likewise
    m_i,  # [BLOCK_H] running max of the scores (base-2 units)
    l_i,  # [BLOCK_H] running sum of 2^(score - m_i)
    acc,  # [BLOCK_H, V_DIM] running sum of 2^(score - m_i) * c, likewise
    start,
    hi,
    row,
    dc,
    dr,
    r_mask,
    req_to_token_ptr,
    r2t_stride_row,
    kv_ptr,
    kv_stride_s,
    kv_stride_d,
    scale_log2,
    HEADS_ON_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Fold the latents at positions [start, min(start + BLOCK_N, hi)) into the online softmax."""
    pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    n_mask = pos < hi
    slots = tl.load(req_to_token_ptr + row * r2t_stride_row + pos, mask=n_mask, other=0).to(tl.int64)
    kv_row = kv_ptr + slots[:, None] * kv_stride_s  # [BLOCK_N, 1]
    # The block's one load, for every head and both products. Masked rows read as 0: a slot
    # past the context may hold anything (NaN in an uninitialised FP8 pool), and 0 * NaN is NaN.
    # .to: an FP8 pool is converted to q's dtype (a no-op otherwise).
    c = tl.load(kv_row + dc[None, :] * kv_stride_d, mask=n_mask[:, None], other=0.0)  # [BLOCK_N, V_DIM]
    k_r = tl.load(
        kv_row + dr[None, :] * kv_stride_d, mask=n_mask[:, None] & r_mask[None, :], other=0.0
    )  # [BLOCK_N, BLOCK_R]
    dt = q_c.dtype
    if HEADS_ON_N:
        scores_t = tl.dot(c.to(dt), q_c, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_H]
        scores = tl.trans(tl.dot(k_r.to(dt), q_r, scores_t, input_precision=DOT_PRECISION))
    else:
        scores = tl.dot(q_c, tl.trans(c.to(dt)), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
        scores = tl.dot(q_r, tl.trans(k_r.to(dt)), scores, input_precision=DOT_PRECISION)
    scores = tl.where(n_mask[None, :], scores * scale_log2, float("-inf"))
    # The block holds at least one key, so m_new is finite and alpha is 0 on the first block.
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if HEADS_ON_N:
        pv = tl.dot(tl.trans(c.to(dt)), tl.trans(p.to(dt)), input_precision=DOT_PRECISION)  # [V_DIM, BLOCK_H]
        acc = acc * alpha[None, :] + pv
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), c.to(dt), input_precision=DOT_PRECISION)
    return m_new, l_i, acc


def mla_decode_attention_ref(
    q: torch.Tensor,  # [B, H, Dk]
    kv_buffer: torch.Tensor,  # [num_slots, 1, Dk]
    req_to_token: torch.Tensor,  # [rows, max_ctx]
    req_rows: torch.Tensor,  # [B]
    seq_lens: torch.Tensor,  # [B]
    scaling: float,
    v_dim: int,
) -> torch.Tensor:  # [B, H, v_dim], q's dtype
    """Pure-torch `mla_decode_attention`: per request, gather the latents and softmax in float32
    (an FP8 pool is read as its float32 values)."""
    out = q.new_empty((q.shape[0], q.shape[1], v_dim))
    for b, (row, seq_len) in enumerate(zip(req_rows.tolist(), seq_lens.tolist())):
        latents = kv_buffer[req_to_token[row, :seq_len].long(), 0].float()  # [S, Dk]
        scores = q[b].float() @ latents.T * scaling  # [H, S]
        out[b] = (scores.softmax(dim=-1) @ latents[:, :v_dim]).to(q.dtype)
    return out
