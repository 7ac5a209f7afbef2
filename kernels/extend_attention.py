"""Extend (prefill) attention for a ragged batch of new tokens over cached prefixes.

The backend stores every new token's K/V in the pool before calling this (the same contract as
the torch backend), so all keys, cached and new, are read from the pool through req_to_token:

    request b       keys (positions)                  queries (rows of q)
    cached prefix   [0, prefix_lens[b])               -
    new tokens      [prefix_lens[b], seq_len_b)       [extend_starts[b], extend_starts[b] + extend_lens[b])

    q             [T, Hq, Dk]               T = sum(extend_lens), request after request
    k_buffer      [num_slots, Hkv, Dk]      one layer of the token-slot pool
    v_buffer      [num_slots, Hkv, Dv]      any strides: e.g. v = latent[..., :Dv] for MLA
    req_to_token  [rows, max_ctx]           position -> slot, per request row
    out           [T, Hq, Dv]

New token j of request b sits at position p = prefix_lens[b] + j and sees keys [0, p] (causal),
or (p - w, p] with a sliding window w.

Grid (B, Hq, query blocks of the longest extend): one program takes BLOCK_M new tokens of one
request for one head and runs an online softmax (base 2, the scale folded into the scores) over
the key blocks up to its last token's position; blocks wholly before the window's start are
skipped. Without a window, the key blocks wholly before the program's first query are visible
to every row and run without the causal mask; only the blocks from there on (the diagonal) are
masked. The grid's last query blocks, the ones with the most keys, start first (a
causal grid's tail otherwise waits on its longest programs). One head per program keeps
the tile simple; the query heads of a GQA group re-read the same K/V blocks, mostly from L2
(Hkv = 1 with up to 128 query heads, MLA's absorbed prefill, works the same way, at the cost of
as many re-reads).

Head dims: the values may be narrower than the keys (MLA: Dk = 576 absorbed or 192 expanded,
Dv = 512 or 128). Dv is padded (masked) up to a power of two. Dk is cut into a power-of-two part
and a tail padded up to a power of two, scored as two products, so 576 = 512 + 64 and
192 = 128 + 64 need no padding (one 1024- or 256-wide tile would nearly double the work of the
first), and 80 = 64 + 16. Wide heads get narrower key blocks and more warps so the
accumulator fits in registers (`_tile_config`).

The pool may be float8_e4m3fn (an FP8 KV cache, scale 1.0): each K/V block is converted to q's
dtype after its load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.checks import check_index_vectors, check_paged_attention
from kernels.config import interpreting, reference_enabled

_OP = "extend_attention"
# tl.dot needs K >= 16.
_MIN_BLOCK_D = 16
_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))


def _split_key_dim(k_dim: int) -> tuple[int, int]:
    """(BLOCK_DK, BLOCK_DK2): a power-of-two part of the key head dim and its tail's padded width
    (0: no tail)."""
    if k_dim <= _MIN_BLOCK_D:
        return _MIN_BLOCK_D, 0
    main = 1 << (k_dim.bit_length() - 1)
    rest = k_dim - main
    return main, 0 if rest == 0 else max(_MIN_BLOCK_D, triton.next_power_of_2(rest))


def _tile_config(block_dk: int, block_dv: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the padded key and value widths.

    Measured on an H100 (bf16, 4k-token prefill, 16 heads):
    - Dk <= 256, Dv <= 128: 64 x 64, 4 warps, 3 stages. MHA 128/128: 164 TFLOP/s; expanded MLA
      192/128: 188 TFLOP/s (8 warps, 2 stages: 106; 128 x 64 with 8 warps: 184).
    - Dk > 256 or Dv > 256: 64 x 32, 8 warps, 2 stages, the 64-row tile Hopper's wgmma takes.
      Absorbed MLA 576/512 (Hkv 1): 134 TFLOP/s at 16 heads, 145 at 128 (32 x 32: 83 and 87).
      Small spills (~180 bytes); a 64 x 64 tile spills ~1 KB.
    - In between (Dv = 256): 64 x 64, 8 warps, 2 stages, untuned.
    """
    if block_dk <= 256 and block_dv <= 128:
        return 64, 64, 4, 3
    if block_dk <= 256 and block_dv <= 256:
        return 64, 64, 8, 2
    return 64, 32, 8, 2


def extend_attention(
    q: torch.Tensor,  # [T, Hq, Dk]
    k_buffer: torch.Tensor,  # [num_slots, Hkv, Dk]
    v_buffer: torch.Tensor,  # [num_slots, Hkv, Dv]
    req_to_token: torch.Tensor,  # [rows, max_ctx] int32/int64
    req_rows: torch.Tensor,  # [B] int32/int64
    prefix_lens: torch.Tensor,  # [B] int32/int64
    extend_lens: torch.Tensor,  # [B] int32/int64
    scaling: float,
    sliding_window: int | None = None,
    *,
    extend_starts: torch.Tensor | None = None,  # [B]: row of q where each request's tokens start
    max_extend_len: int | None = None,
    tile: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:  # [T, Hq, Dv], q's dtype
    """Causal attention of each request's new tokens over its prefix and themselves.

    The pool is q's dtype or float8_e4m3fn; the values may be narrower than the keys and a
    strided view (Dv != Dk, as in MLA).

    `extend_starts` defaults to the exclusive cumulative sum of `extend_lens`; `max_extend_len`
    (the grid size) to max(extend_lens), read from the device (a sync) when not given. `tile`:
    (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of `_tile_config`'s (benchmarks, tests).
    """
    check_paged_attention(_OP, q, k_buffer, v_buffer, req_to_token, scaling, sliding_window)
    check_index_vectors(_OP, q, None, req_rows=req_rows, prefix_lens=prefix_lens, extend_lens=extend_lens)
    if extend_starts is None:
        extend_starts = torch.cumsum(extend_lens, 0) - extend_lens
    else:
        check_index_vectors(_OP, q, req_rows.shape[0], extend_starts=extend_starts)
    if reference_enabled():
        return extend_attention_ref(
            q,
            k_buffer,
            v_buffer,
            req_to_token,
            req_rows,
            prefix_lens,
            extend_lens,
            scaling,
            sliding_window,
            extend_starts=extend_starts,
        )
    num_tokens, num_heads, k_dim = q.shape
    v_dim = v_buffer.shape[2]
    batch_size = req_rows.shape[0]
    out = q.new_empty((num_tokens, num_heads, v_dim))
    if num_tokens == 0 or batch_size == 0:
        return out
    if max_extend_len is None:
        max_extend_len = int(extend_lens.max())
    block_dk, block_dk2 = _split_key_dim(k_dim)
    block_dv = max(_MIN_BLOCK_D, triton.next_power_of_2(v_dim))
    block_m, block_n, num_warps, num_stages = tile or _tile_config(block_dk + block_dk2, block_dv)
    grid = (batch_size, num_heads, triton.cdiv(max_extend_len, block_m))
    _extend_kernel[grid](
        q,
        k_buffer,
        v_buffer,
        out,
        req_to_token,
        req_rows,
        prefix_lens,
        extend_lens,
        extend_starts,
        scaling * _LOG2E,
        sliding_window or 0,
        *q.stride(),
        *k_buffer.stride(),
        *v_buffer.stride(),
        *out.stride(),
        req_to_token.stride(0),
        num_heads // k_buffer.shape[1],
        k_dim,
        v_dim,
        HAS_WINDOW=sliding_window is not None,
        LOOP_WHILE=interpreting(),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_DK=block_dk,
        # Unused when 0, but it must still be a valid tile width.
        BLOCK_DK2=block_dk2 or _MIN_BLOCK_D,
        HAS_DK2=block_dk2 > 0,
        BLOCK_DV=block_dv,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


@triton.jit
def _extend_kernel(
    q_ptr,
    k_buf_ptr,
    v_buf_ptr,
    out_ptr,
    req_to_token_ptr,
    req_rows_ptr,
    prefix_lens_ptr,
    extend_lens_ptr,
    extend_starts_ptr,
    qk_scale,  # the softmax scale times log2(e)
    window,
    q_stride_t,
    q_stride_h,
    q_stride_d,
    k_stride_s,
    k_stride_h,
    k_stride_d,
    v_stride_s,
    v_stride_h,
    v_stride_d,
    o_stride_t,
    o_stride_h,
    o_stride_d,
    r2t_stride_row,
    group,
    k_dim,
    v_dim,
    HAS_WINDOW: tl.constexpr,
    LOOP_WHILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DK2: tl.constexpr,
    HAS_DK2: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    m_start = (tl.num_programs(2) - 1 - tl.program_id(2)) * BLOCK_M  # the longest programs first
    extend_len = tl.load(extend_lens_ptr + b)
    if m_start >= extend_len:  # the grid is sized for the longest request
        return
    kv_head = h // group
    prefix_len = tl.load(prefix_lens_ptr + b)
    tok_start = tl.load(extend_starts_ptr + b).to(tl.int64)
    row = tl.load(req_rows_ptr + b).to(tl.int64)

    m = m_start + tl.arange(0, BLOCK_M)  # [BLOCK_M] index among this request's new tokens
    m_mask = m < extend_len
    q_pos = prefix_len + m  # absolute positions of the queries
    tok = tok_start + m  # rows of q / out
    q_row = q_ptr + tok[:, None] * q_stride_t + h * q_stride_h  # [BLOCK_M, 1]
    # Key dims [0, BLOCK_DK) and, when HAS_DK2, the tail [BLOCK_DK, k_dim).
    dk = tl.arange(0, BLOCK_DK)
    dk_mask = dk < k_dim
    q = tl.load(q_row + dk[None, :] * q_stride_d, mask=m_mask[:, None] & dk_mask[None, :], other=0.0)
    dk2 = BLOCK_DK + tl.arange(0, BLOCK_DK2)
    dk2_mask = dk2 < k_dim
    q2 = q  # unused unless HAS_DK2
    if HAS_DK2:
        q2 = tl.load(q_row + dk2[None, :] * q_stride_d, mask=m_mask[:, None] & dk2_mask[None, :], other=0.0)
    dv = tl.arange(0, BLOCK_DV)
    dv_mask = dv < v_dim

    # Keys this block can see: up to its last query's position (causal), and from the first
    # query's window start. Without a window the blocks before `diag` are visible to every row.
    hi = prefix_len + tl.minimum(m_start + BLOCK_M, extend_len)
    lo = 0
    diag = 0
    if HAS_WINDOW:
        lo = tl.maximum(prefix_len + m_start - window + 1, 0)
    else:
        diag = (prefix_len + m_start) // BLOCK_N * BLOCK_N

    keys_slots = req_to_token_ptr + row * r2t_stride_row  # position -> slot of this request's keys
    k_head = k_buf_ptr + kv_head * k_stride_h
    v_head = v_buf_ptr + kv_head * v_stride_h
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # Compiled kernels take the `for` loops, which Triton software-pipelines; the interpreter
    # (Triton 3.6 with numpy >= 2.4) cannot use a tensor as a range() bound (triton-lang/triton#9171).
    if LOOP_WHILE:
        start = 0
        while start < diag:
            m_i, l_i, acc = _extend_block(
                q, q2, q_pos, m_i, l_i, acc, start, hi, window, keys_slots, k_head, v_head, dk, dk_mask,
                dk2, dk2_mask, dv, dv_mask, k_stride_s, k_stride_d, v_stride_s, v_stride_d, qk_scale,
                False, False, HAS_DK2, DOT_PRECISION, BLOCK_N,
            )  # fmt: skip
            start += BLOCK_N
        start = tl.maximum(lo, diag)
        while start < hi:
            m_i, l_i, acc = _extend_block(
                q, q2, q_pos, m_i, l_i, acc, start, hi, window, keys_slots, k_head, v_head, dk, dk_mask,
                dk2, dk2_mask, dv, dv_mask, k_stride_s, k_stride_d, v_stride_s, v_stride_d, qk_scale,
                True, HAS_WINDOW, HAS_DK2, DOT_PRECISION, BLOCK_N,
            )  # fmt: skip
            start += BLOCK_N
    else:
        for start in range(0, diag, BLOCK_N):
            m_i, l_i, acc = _extend_block(
                q, q2, q_pos, m_i, l_i, acc, start, hi, window, keys_slots, k_head, v_head, dk, dk_mask,
                dk2, dk2_mask, dv, dv_mask, k_stride_s, k_stride_d, v_stride_s, v_stride_d, qk_scale,
                False, False, HAS_DK2, DOT_PRECISION, BLOCK_N,
            )  # fmt: skip
        for start in range(tl.maximum(lo, diag), hi, BLOCK_N):
            m_i, l_i, acc = _extend_block(
                q, q2, q_pos, m_i, l_i, acc, start, hi, window, keys_slots, k_head, v_head, dk, dk_mask,
                dk2, dk2_mask, dv, dv_mask, k_stride_s, k_stride_d, v_stride_s, v_stride_d, qk_scale,
                True, HAS_WINDOW, HAS_DK2, DOT_PRECISION, BLOCK_N,
            )  # fmt: skip

    # Every real query sees at least itself, so l_i > 0 on the rows that are stored.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + tok[:, None] * o_stride_t + h * o_stride_h + dv[None, :] * o_stride_d,
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & dv_mask[None, :],
    )


@triton.jit
def _extend_block(
    q,  # [BLOCK_M, BLOCK_DK]
    q2,  # [BLOCK_M, BLOCK_DK2] the key dims' tail (when HAS_DK2)
    q_pos,  # [BLOCK_M] absolute query positions
    m_i,  # [BLOCK_M] running max of the visible scores (base 2)
    l_i,  # [BLOCK_M] running sum of exp2(score - m_i)
    acc,  # [BLOCK_M, BLOCK_DV] running sum of exp2(score - m_i) * v
    start,
    hi,
    window,
    keys_slots,  # the request's req_to_token row
    k_head,  # the KV head's keys in slot 0 of the pool
    v_head,
    dk,
    dk_mask,
    dk2,
    dk2_mask,
    dv,
    dv_mask,
    k_stride_s,
    k_stride_d,
    v_stride_s,
    v_stride_d,
    qk_scale,
    MASKED: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DK2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Fold the keys at positions [start, min(start + BLOCK_N, hi)) into the online softmax
    (base 2). Not MASKED: every key of the block exists and every row sees it."""
    pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    n_mask = pos < hi
    # Masks of the K and V loads: the head dims' padding, and when MASKED the keys past `hi`.
    k_mask = dk_mask[None, :]
    k2_mask = dk2_mask[None, :]
    v_mask = dv_mask[None, :]
    if MASKED:
        slots = tl.load(keys_slots + pos, mask=n_mask, other=0)
        k_mask = n_mask[:, None] & k_mask
        k2_mask = n_mask[:, None] & k2_mask
        v_mask = n_mask[:, None] & v_mask
    else:
        slots = tl.load(keys_slots + pos)
    slots = slots.to(tl.int64)
    k_row = k_head + slots[:, None] * k_stride_s  # [BLOCK_N, 1]
    # .to: an FP8 pool is converted to q's dtype (a no-op otherwise).
    k = tl.load(k_row + dk[None, :] * k_stride_d, mask=k_mask, other=0.0)
    scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if HAS_DK2:
        k2 = tl.load(k_row + dk2[None, :] * k_stride_d, mask=k2_mask, other=0.0)
        scores = tl.dot(q2, tl.trans(k2.to(q.dtype)), scores, input_precision=DOT_PRECISION)
    scores *= qk_scale
    if MASKED:
        visible = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
        if HAS_WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # A row can see nothing in this block (its window starts later, or it is padding): keep its
    # max at -inf but subtract 0, so that exp2 gives 0 rather than NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(scores - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_head + slots[:, None] * v_stride_s + dv[None, :] * v_stride_d, mask=v_mask, other=0.0)
    v = v.to(q.dtype)  # [BLOCK_N, BLOCK_DV]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


def extend_attention_ref(
    q: torch.Tensor,  # [T, Hq, Dk]
    k_buffer: torch.Tensor,  # [num_slots, Hkv, Dk]
    v_buffer: torch.Tensor,  # [num_slots, Hkv, Dv]
    req_to_token: torch.Tensor,  # [rows, max_ctx]
    req_rows: torch.Tensor,  # [B]
    prefix_lens: torch.Tensor,  # [B]
    extend_lens: torch.Tensor,  # [B]
    scaling: float,
    sliding_window: int | None = None,
    *,
    extend_starts: torch.Tensor | None = None,  # [B]; None: requests packed in order
) -> torch.Tensor:  # [T, Hq, Dv], q's dtype
    """Pure-torch `extend_attention`: per request, an explicit masked softmax in float32 (an FP8
    pool is read as its float32 values)."""
    out = q.new_empty((q.shape[0], q.shape[1], v_buffer.shape[2]))
    group = q.shape[1] // k_buffer.shape[1]
    if extend_starts is None:
        extend_starts = torch.cumsum(extend_lens, 0) - extend_lens
    for row, prefix_len, extend_len, start in zip(
        req_rows.tolist(), prefix_lens.tolist(), extend_lens.tolist(), extend_starts.tolist()
    ):
        seq_len = prefix_len + extend_len
        slots = req_to_token[row, :seq_len].long()
        keys = k_buffer[slots].float().repeat_interleave(group, dim=1)  # [S, Hq, Dk]
        values = v_buffer[slots].float().repeat_interleave(group, dim=1)  # [S, Hq, Dv]
        queries = q[start : start + extend_len].float()  # [E, Hq, Dk]
        q_pos = torch.arange(prefix_len, seq_len, device=q.device)[:, None]  # [E, 1]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]  # [1, S]
        visible = k_pos <= q_pos  # [E, S]
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        scores = torch.einsum("ehd,shd->hes", queries, keys) * scaling  # [Hq, E, S]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[start : start + extend_len] = torch.einsum("hes,shd->ehd", probs, values).to(q.dtype)
    return out
