"""Extend (prefill) attention for a ragged batch of new tokens over cached prefixes.

The backend stores every new token's K/V in the pool before calling this (the same contract as
the torch backend), so all keys, cached and new, are read from the pool through req_to_token:

    request b       keys (positions)                  queries (rows of q)
    cached prefix   [0, prefix_lens[b])               -
    new tokens      [prefix_lens[b], seq_len_b)       [extend_starts[b], extend_starts[b] + extend_lens[b])

    q             [T, Hq, D]                T = sum(extend_lens), request after request
    k/v_buffer    [num_slots, Hkv, D]       one layer of the token-slot pool
    req_to_token  [rows, max_ctx]           position -> slot, per request row

New token j of request b sits at position p = prefix_lens[b] + j and sees keys [0, p] (causal),
or (p - w, p] with a sliding window w.

Grid (B, Hq, query blocks of the longest extend): one program takes BLOCK_M new tokens of one
request for one head and runs an online softmax over the key blocks up to its last token's
position; blocks wholly before the window's start are skipped. One head per program keeps
the tile simple; the query heads of a GQA group re-read the same K/V blocks, mostly from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.checks import check_index_vectors, check_paged_attention
from kernels.config import interpreting, reference_enabled

_OP = "extend_attention"
_BLOCK_M = 64
_BLOCK_N = 64


def extend_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_buffer: torch.Tensor,  # [num_slots, Hkv, D]
    v_buffer: torch.Tensor,  # [num_slots, Hkv, D]
    req_to_token: torch.Tensor,  # [rows, max_ctx] int32/int64
    req_rows: torch.Tensor,  # [B] int32/int64
    prefix_lens: torch.Tensor,  # [B] int32/int64
    extend_lens: torch.Tensor,  # [B] int32/int64
    scaling: float,
    sliding_window: int | None = None,
    *,
    extend_starts: torch.Tensor | None = None,  # [B]: row of q where each request's tokens start
    max_extend_len: int | None = None,
) -> torch.Tensor:  # [T, Hq, D], q's dtype
    """Causal attention of each request's new tokens over its prefix and themselves.

    `extend_starts` defaults to the exclusive cumulative sum of `extend_lens`; `max_extend_len`
    (the grid size) to max(extend_lens), read from the device (a sync) when not given.
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
    num_tokens, num_heads, head_dim = q.shape
    batch_size = req_rows.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0 or batch_size == 0:
        return out
    if max_extend_len is None:
        max_extend_len = int(extend_lens.max())
    grid = (batch_size, num_heads, triton.cdiv(max_extend_len, _BLOCK_M))
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
        scaling,
        sliding_window or 0,
        *q.stride(),
        *k_buffer.stride(),
        *v_buffer.stride(),
        *out.stride(),
        req_to_token.stride(0),
        num_heads // k_buffer.shape[1],
        head_dim,
        HAS_WINDOW=sliding_window is not None,
        LOOP_WHILE=interpreting(),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
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
    scaling,
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
    head_dim,
    HAS_WINDOW: tl.constexpr,
    LOOP_WHILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    m_start = tl.program_id(2) * BLOCK_M
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
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q_mask = m_mask[:, None] & d_mask[None, :]
    tok = tok_start + m  # rows of q / out
    q = tl.load(
        q_ptr + tok[:, None] * q_stride_t + h * q_stride_h + d[None, :] * q_stride_d, mask=q_mask, other=0.0
    )  # [BLOCK_M, BLOCK_D]

    # Keys this block can see: up to its last query's position (causal), and from the first
    # query's window start.
    hi = prefix_len + tl.minimum(m_start + BLOCK_M, extend_len)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(prefix_len + m_start - window + 1, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Compiled kernels take the `for` loop, which Triton software-pipelines; the interpreter
    # (Triton 3.6 with numpy >= 2.4) cannot use a tensor as a range() bound (triton-lang/triton#9171).
    if LOOP_WHILE:
        start = lo
        while start < hi:
            m_i, l_i, acc = _extend_block(
                q, q_pos, m_i, l_i, acc, start, hi, window, row, kv_head, d, d_mask, req_to_token_ptr,
                r2t_stride_row, k_buf_ptr, k_stride_s, k_stride_h, k_stride_d, v_buf_ptr, v_stride_s,
                v_stride_h, v_stride_d, scaling, HAS_WINDOW, DOT_PRECISION, BLOCK_N,
            )  # fmt: skip
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _extend_block(
                q, q_pos, m_i, l_i, acc, start, hi, window, row, kv_head, d, d_mask, req_to_token_ptr,
                r2t_stride_row, k_buf_ptr, k_stride_s, k_stride_h, k_stride_d, v_buf_ptr, v_stride_s,
                v_stride_h, v_stride_d, scaling, HAS_WINDOW, DOT_PRECISION, BLOCK_N,
            )  # fmt: skip

    # Every real query sees at least itself, so l_i > 0 on the rows that are stored.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + tok[:, None] * o_stride_t + h * o_stride_h + d[None, :] * o_stride_d,
        out.to(out_ptr.dtype.element_ty),
        mask=q_mask,
    )


@triton.jit
def _extend_block(
    q,  # [BLOCK_M, BLOCK_D]
    q_pos,  # [BLOCK_M] absolute query positions
    m_i,  # [BLOCK_M] running max of the visible scores
    l_i,  # [BLOCK_M] running sum of exp(score - m_i)
    acc,  # [BLOCK_M, BLOCK_D] running sum of exp(score - m_i) * v
    start,
    hi,
    window,
    row,
    kv_head,
    d,
    d_mask,
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
    HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Fold the keys at positions [start, min(start + BLOCK_N, hi)) into the online softmax."""
    pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    n_mask = pos < hi
    slots = tl.load(req_to_token_ptr + row * r2t_stride_row + pos, mask=n_mask, other=0).to(tl.int64)
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(
        k_buf_ptr + slots[:, None] * k_stride_s + kv_head * k_stride_h + d[None, :] * k_stride_d,
        mask=kv_mask,
        other=0.0,
    )  # [BLOCK_N, BLOCK_D]
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scaling  # [BLOCK_M, BLOCK_N]
    visible = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
    if HAS_WINDOW:
        visible = visible & (pos[None, :] > q_pos[:, None] - window)
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # A row can see nothing in this block (its window starts later, or it is padding): keep its
    # max at -inf but subtract 0, so that exp gives 0 rather than NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_sub)
    p = tl.exp(scores - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_buf_ptr + slots[:, None] * v_stride_s + kv_head * v_stride_h + d[None, :] * v_stride_d,
        mask=kv_mask,
        other=0.0,
    )  # [BLOCK_N, BLOCK_D]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


def extend_attention_ref(
    q: torch.Tensor,  # [T, Hq, D]
    k_buffer: torch.Tensor,  # [num_slots, Hkv, D]
    v_buffer: torch.Tensor,  # [num_slots, Hkv, D]
    req_to_token: torch.Tensor,  # [rows, max_ctx]
    req_rows: torch.Tensor,  # [B]
    prefix_lens: torch.Tensor,  # [B]
    extend_lens: torch.Tensor,  # [B]
    scaling: float,
    sliding_window: int | None = None,
    *,
    extend_starts: torch.Tensor | None = None,  # [B]; None: requests packed in order
) -> torch.Tensor:  # [T, Hq, D], q's dtype
    """Pure-torch `extend_attention`: per request, an explicit masked softmax in float32."""
    out = torch.empty_like(q)
    group = q.shape[1] // k_buffer.shape[1]
    if extend_starts is None:
        extend_starts = torch.cumsum(extend_lens, 0) - extend_lens
    for row, prefix_len, extend_len, start in zip(
        req_rows.tolist(), prefix_lens.tolist(), extend_lens.tolist(), extend_starts.tolist()
    ):
        seq_len = prefix_len + extend_len
        slots = req_to_token[row, :seq_len].long()
        keys = k_buffer[slots].float().repeat_interleave(group, dim=1)  # [S, Hq, D]
        values = v_buffer[slots].float().repeat_interleave(group, dim=1)  # [S, Hq, D]
        queries = q[start : start + extend_len].float()  # [E, Hq, D]
        q_pos = torch.arange(prefix_len, seq_len, device=q.device)[:, None]  # [E, 1]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]  # [1, S]
        visible = k_pos <= q_pos  # [E, S]
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        scores = torch.einsum("ehd,shd->hes", queries, keys) * scaling  # [Hq, E, S]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[start : start + extend_len] = torch.einsum("hes,shd->ehd", probs, values).to(q.dtype)
    return out
