"""Scatter one layer's new K/V rows into the token-slot KV pool.

    k, v      [T, Hkv, D]            new tokens (views of the qkv projection are fine: any strides)
    slots     [T]                    pool slot of each token
    k_buffer  [num_slots, Hkv, D]    one layer of the pool; row `slots[t]` receives `k[t]`

Values are cast to the pool's dtype, as `MHAKVPool.set_kv` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.checks import FLOAT_DTYPES, INDEX_DTYPES, check_dtype, check_ndim, check_same_device
from kernels.config import reference_enabled

_OP = "store_kv"


def store_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_buffer: torch.Tensor,  # [num_slots, Hkv, D]
    v_buffer: torch.Tensor,  # [num_slots, Hkv, D]
    slots: torch.Tensor,  # [T] int32/int64
) -> None:
    """Write `k[t]`, `v[t]` into `k_buffer[slots[t]]`, `v_buffer[slots[t]]` in place."""
    for name, t in (("k", k), ("v", v), ("k_buffer", k_buffer), ("v_buffer", v_buffer)):
        check_ndim(_OP, name, t, 3, "[tokens, kv_heads, head_dim]")
        check_dtype(_OP, name, t, FLOAT_DTYPES)
    check_ndim(_OP, "slots", slots, 1, "[tokens]")
    check_dtype(_OP, "slots", slots, INDEX_DTYPES)
    if k.shape != v.shape:
        raise ValueError(f"{_OP}: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if k_buffer.shape != v_buffer.shape or k_buffer.dtype != v_buffer.dtype:
        raise ValueError(f"{_OP}: k_buffer and v_buffer differ in shape or dtype")
    if k.shape[1:] != k_buffer.shape[1:]:
        raise ValueError(
            f"{_OP}: k rows {tuple(k.shape[1:])} do not fit pool rows {tuple(k_buffer.shape[1:])}"
        )
    if slots.shape[0] != k.shape[0]:
        raise ValueError(f"{_OP}: {slots.shape[0]} slots for {k.shape[0]} tokens")
    check_same_device(_OP, k=k, v=v, k_buffer=k_buffer, v_buffer=v_buffer, slots=slots)
    if reference_enabled():
        store_kv_ref(k, v, k_buffer, v_buffer, slots)
        return
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_buffer,
        v_buffer,
        slots,
        *k.stride(),
        *v.stride(),
        *k_buffer.stride(),
        *v_buffer.stride(),
        num_heads,
        head_dim,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_buf_ptr,
    v_buf_ptr,
    slots_ptr,
    k_stride_t,
    k_stride_h,
    k_stride_d,
    v_stride_t,
    v_stride_h,
    v_stride_d,
    kb_stride_s,
    kb_stride_h,
    kb_stride_d,
    vb_stride_s,
    vb_stride_h,
    vb_stride_d,
    num_heads,
    head_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per token: its whole [Hkv, D] row of K and of V.
    t = tl.program_id(0).to(tl.int64)
    # int64 so that slot * stride cannot overflow in pools of more than 2^31 elements.
    slot = tl.load(slots_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    d = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    mask = (h < num_heads) & (d < head_dim)

    k = tl.load(k_ptr + t * k_stride_t + h * k_stride_h + d * k_stride_d, mask=mask)
    tl.store(
        k_buf_ptr + slot * kb_stride_s + h * kb_stride_h + d * kb_stride_d,
        k.to(k_buf_ptr.dtype.element_ty),
        mask=mask,
    )
    v = tl.load(v_ptr + t * v_stride_t + h * v_stride_h + d * v_stride_d, mask=mask)
    tl.store(
        v_buf_ptr + slot * vb_stride_s + h * vb_stride_h + d * vb_stride_d,
        v.to(v_buf_ptr.dtype.element_ty),
        mask=mask,
    )


def store_kv_ref(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_buffer: torch.Tensor,  # [num_slots, Hkv, D]
    v_buffer: torch.Tensor,  # [num_slots, Hkv, D]
    slots: torch.Tensor,  # [T]
) -> None:
    """Pure-torch `store_kv`: an indexed assignment, exactly what `MHAKVPool.set_kv` does."""
    k_buffer[slots] = k.to(k_buffer.dtype)
    v_buffer[slots] = v.to(v_buffer.dtype)
