"""Scatter one layer's new K/V rows (or MLA latents) into the token-slot KV pool.

    k         [T, Hkv, Dk]           new tokens (views of the qkv projection are fine: any strides)
    v         [T, Hkv, Dv]
    slots     [T]                    pool slot of each token
    k_buffer  [num_slots, Hkv, Dk]   one layer of the pool; row `slots[t]` receives `k[t]`
    v_buffer  [num_slots, Hkv, Dv]   (any strides: a view of a wider buffer is fine)

MLA pools hold one latent per token, `kv_buffer [num_slots, 1, Dc + Dr]`: the normalised
compressed KV (Dc = kv_lora_rank) followed by the rotated shared key (Dr = qk_rope_head_dim).
`store_latent` writes the two parts straight into their columns, so the model need not
concatenate them first; it is `store_kv` on two column views of the one buffer.

Values are cast to the pool's dtype, as `MHAKVPool.set_kv` does. An FP8 pool (float8_e4m3fn,
scale 1.0) saturates: values beyond +-448 are stored as +-448, since the plain cast would make
them NaN. The kernel encodes FP8 itself with integer arithmetic (round to nearest even, NaN
kept) rather than through Triton's cast, which saturates on some GPUs and not on others, and
rounds differently again under the CPU interpreter; so every device stores exactly the bytes
of the reference, `x.clamp(-448, 448).to(torch.float8_e4m3fn)`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.checks import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    FP8_E4M3_MAX,
    INDEX_DTYPES,
    KV_DTYPES,
    check_dtype,
    check_ndim,
    check_same_device,
)
from kernels.config import reference_enabled

_OP = "store_kv"
_LATENT_OP = "store_latent"


def store_kv(
    k: torch.Tensor,  # [T, Hkv, Dk]
    v: torch.Tensor,  # [T, Hkv, Dv]
    k_buffer: torch.Tensor,  # [num_slots, Hkv, Dk]
    v_buffer: torch.Tensor,  # [num_slots, Hkv, Dv]
    slots: torch.Tensor,  # [T] int32/int64
) -> None:
    """Write `k[t]`, `v[t]` into `k_buffer[slots[t]]`, `v_buffer[slots[t]]` in place.

    The buffers share a dtype: a float dtype (cast) or float8_e4m3fn (saturating cast).
    """
    for name, t in (("k", k), ("v", v)):
        check_ndim(_OP, name, t, 3, "[tokens, kv_heads, head_dim]")
        check_dtype(_OP, name, t, FLOAT_DTYPES)
    for name, t in (("k_buffer", k_buffer), ("v_buffer", v_buffer)):
        check_ndim(_OP, name, t, 3, "[num_slots, kv_heads, head_dim]")
        check_dtype(_OP, name, t, KV_DTYPES)
    _check_slots(_OP, slots, k.shape[0])
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"{_OP}: k {tuple(k.shape)} and v {tuple(v.shape)} differ in tokens or heads")
    if k_buffer.shape[0] != v_buffer.shape[0] or k_buffer.dtype != v_buffer.dtype:
        raise ValueError(f"{_OP}: k_buffer and v_buffer differ in slots or dtype")
    for name, rows, pool in (("k", k, k_buffer), ("v", v, v_buffer)):
        if rows.shape[1:] != pool.shape[1:]:
            raise ValueError(
                f"{_OP}: {name} rows {tuple(rows.shape[1:])} and pool rows {tuple(pool.shape[1:])} differ"
            )
    check_same_device(_OP, k=k, v=v, k_buffer=k_buffer, v_buffer=v_buffer, slots=slots)
    if reference_enabled():
        store_kv_ref(k, v, k_buffer, v_buffer, slots)
        return
    _launch(k, v, k_buffer, v_buffer, slots)


def store_latent(
    latent: torch.Tensor,  # [T, Dc]; the whole [T, Dk] latent when k_rope is None
    kv_buffer: torch.Tensor,  # [num_slots, 1, Dk]
    slots: torch.Tensor,  # [T] int32/int64
    k_rope: torch.Tensor | None = None,  # [T, Dk - Dc]: the rotated shared key
) -> None:
    """Write each token's MLA latent `[latent[t] | k_rope[t]]` into `kv_buffer[slots[t], 0]`.

    Same casts as `store_kv` (float8_e4m3fn saturates); any strides on the inputs.
    """
    check_ndim(_LATENT_OP, "latent", latent, 2, "[tokens, latent_dim]")
    check_dtype(_LATENT_OP, "latent", latent, FLOAT_DTYPES)
    check_ndim(_LATENT_OP, "kv_buffer", kv_buffer, 3, "[num_slots, 1, latent_dim]")
    check_dtype(_LATENT_OP, "kv_buffer", kv_buffer, KV_DTYPES)
    if kv_buffer.shape[1] != 1:
        raise ValueError(
            f"{_LATENT_OP}: an MLA pool has one latent head, got kv_buffer {tuple(kv_buffer.shape)}"
        )
    _check_slots(_LATENT_OP, slots, latent.shape[0])
    rope_dim = 0
    if k_rope is not None:
        check_ndim(_LATENT_OP, "k_rope", k_rope, 2, "[tokens, rope_dim]")
        check_dtype(_LATENT_OP, "k_rope", k_rope, FLOAT_DTYPES)
        if k_rope.shape[0] != latent.shape[0]:
            raise ValueError(f"{_LATENT_OP}: {k_rope.shape[0]} k_rope rows for {latent.shape[0]} tokens")
        rope_dim = k_rope.shape[1]
    if latent.shape[1] + rope_dim != kv_buffer.shape[2]:
        raise ValueError(
            f"{_LATENT_OP}: latent width {latent.shape[1]} + rope width {rope_dim} differ from the pool's "
            f"{kv_buffer.shape[2]}"
        )
    extra = {} if k_rope is None else {"k_rope": k_rope}
    check_same_device(_LATENT_OP, latent=latent, kv_buffer=kv_buffer, slots=slots, **extra)
    if reference_enabled():
        store_latent_ref(latent, kv_buffer, slots, k_rope)
        return
    latent_dim = latent.shape[1]
    if k_rope is None:
        _launch(latent[:, None], None, kv_buffer, None, slots)
    else:
        # Two column views of the one buffer: a single launch writes both parts.
        _launch(
            latent[:, None], k_rope[:, None], kv_buffer[..., :latent_dim], kv_buffer[..., latent_dim:], slots
        )


def _check_slots(op: str, slots: torch.Tensor, num_tokens: int) -> None:
    check_ndim(op, "slots", slots, 1, "[tokens]")
    check_dtype(op, "slots", slots, INDEX_DTYPES)
    if slots.shape[0] != num_tokens:
        raise ValueError(f"{op}: {slots.shape[0]} slots for {num_tokens} tokens")


def _launch(
    k: torch.Tensor,  # [T, H, Dk]
    v: torch.Tensor | None,  # [T, H, Dv]
    k_buffer: torch.Tensor,  # [num_slots, H, Dk]
    v_buffer: torch.Tensor | None,  # [num_slots, H, Dv]
    slots: torch.Tensor,  # [T]
) -> None:
    num_tokens, num_heads, k_dim = k.shape
    if num_tokens == 0:
        return
    fp8 = k_buffer.dtype in FP8_DTYPES
    if fp8:
        # The kernel writes the FP8 encoding it computed as bytes.
        k_buffer = k_buffer.view(torch.uint8)
        v_buffer = None if v_buffer is None else v_buffer.view(torch.uint8)
    has_v = v is not None and v_buffer is not None
    v_, v_buffer_ = (v, v_buffer) if has_v else (k, k_buffer)  # unused when not has_v
    assert v_ is not None and v_buffer_ is not None
    _store_kv_kernel[(num_tokens,)](
        k,
        v_,
        k_buffer,
        v_buffer_,
        slots,
        *k.stride(),
        *v_.stride(),
        *k_buffer.stride(),
        *v_buffer_.stride(),
        num_heads,
        k_dim,
        v_.shape[2],
        HAS_V=has_v,
        FP8=fp8,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_DK=triton.next_power_of_2(k_dim),
        BLOCK_DV=triton.next_power_of_2(v_.shape[2]),
        **pdl.launch_options(k),
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
    k_dim,
    v_dim,
    HAS_V: tl.constexpr,
    FP8: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.wait(USE_PDL)  # before any load: the kernel before may still run
    pdl.release(USE_PDL)
    # One program per token: its whole [Hkv, Dk] row of K and [Hkv, Dv] row of V.
    t = tl.program_id(0).to(tl.int64)
    # int64 so that slot * stride cannot overflow in pools of more than 2^31 elements.
    slot = tl.load(slots_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    _store_rows(
        k_ptr + t * k_stride_t, k_buf_ptr + slot * kb_stride_s, h, k_stride_h, k_stride_d, kb_stride_h,
        kb_stride_d, num_heads, k_dim, FP8, BLOCK_DK,
    )  # fmt: skip
    if HAS_V:
        _store_rows(
            v_ptr + t * v_stride_t, v_buf_ptr + slot * vb_stride_s, h, v_stride_h, v_stride_d, vb_stride_h,
            vb_stride_d, num_heads, v_dim, FP8, BLOCK_DV,
        )  # fmt: skip


@triton.jit
def _store_rows(
    src_ptr,  # the token's row
    dst_ptr,  # its slot's row
    h,  # [BLOCK_H, 1]
    src_stride_h,
    src_stride_d,
    dst_stride_h,
    dst_stride_d,
    num_heads,
    head_dim,
    FP8: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    d = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    mask = (h < num_heads) & (d < head_dim)
    x = tl.load(src_ptr + h * src_stride_h + d * src_stride_d, mask=mask)  # [BLOCK_H, BLOCK_D]
    if FP8:
        x = _e4m3fn_bits(x)
    tl.store(dst_ptr + h * dst_stride_h + d * dst_stride_d, x.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _e4m3fn_bits(x):
    """The float8_e4m3fn byte of `x` saturated to +-448: c10's fp32 -> e4m3fn conversion
    (round to nearest even; NaN -> 0x7F with x's sign) applied to x.clamp(-448, 448)."""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    abs_bits = bits & 0x7FFFFFFF
    is_nan = abs_bits > 0x7F800000
    a = tl.minimum(abs_bits.to(tl.float32, bitcast=True), 448.0)
    a_bits = a.to(tl.int32, bitcast=True)
    # Below 2^-6 the result is an FP8 subnormal, a multiple of 2^-9: adding 2^14, whose fp32 spacing
    # is 2^-9, rounds to that multiple (nearest even), and the sum's low mantissa bits count it.
    subnormal = (a + 16384.0).to(tl.int32, bitcast=True) - 0x46800000
    # Normal: move the exponent bias from 127 to 7 and round the 20 dropped mantissa bits to
    # nearest even; a carry out of the mantissa lands in the exponent, as it should.
    normal = (a_bits - (120 << 23) + 0x7FFFF + ((a_bits >> 20) & 1)) >> 20
    enc = tl.where(a_bits < (121 << 23), subnormal, normal)
    enc = tl.where(is_nan, 0x7F, enc)
    return (enc | sign).to(tl.uint8)


def to_kv_dtype_ref(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` as stored in a pool of `dtype`: a cast, saturating to +-448 for float8_e4m3fn."""
    if dtype in FP8_DTYPES:
        return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(dtype)
    return x.to(dtype)


def store_kv_ref(
    k: torch.Tensor,  # [T, Hkv, Dk]
    v: torch.Tensor,  # [T, Hkv, Dv]
    k_buffer: torch.Tensor,  # [num_slots, Hkv, Dk]
    v_buffer: torch.Tensor,  # [num_slots, Hkv, Dv]
    slots: torch.Tensor,  # [T]
) -> None:
    """Pure-torch `store_kv`: an indexed assignment, what `MHAKVPool.set_kv` does (plus the FP8
    saturation)."""
    k_buffer[slots] = to_kv_dtype_ref(k, k_buffer.dtype)
    v_buffer[slots] = to_kv_dtype_ref(v, v_buffer.dtype)


def store_latent_ref(
    latent: torch.Tensor,  # [T, Dc]
    kv_buffer: torch.Tensor,  # [num_slots, 1, Dk]
    slots: torch.Tensor,  # [T]
    k_rope: torch.Tensor | None = None,  # [T, Dk - Dc]
) -> None:
    """Pure-torch `store_latent`: each part cast on its own, as the kernel does."""
    latent_dim = latent.shape[1]
    kv_buffer[slots, 0, :latent_dim] = to_kv_dtype_ref(latent, kv_buffer.dtype)
    if k_rope is not None:
        kv_buffer[slots, 0, latent_dim:] = to_kv_dtype_ref(k_rope, kv_buffer.dtype)
