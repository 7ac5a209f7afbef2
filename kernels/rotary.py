"""Rotary position embedding on q and k (neox layout), as `shared.models.layers.rotary` applies it.

    cos_sin_cache [P, D] float32     row p: cos(p * inv_freq) | sin(p * inv_freq), D/2 each
    x = x1 | x2 (halves of a head)   out = (x1 * cos - x2 * sin) | (x2 * cos + x1 * sin)

Like Hugging Face (and the torch module), cos and sin are cast to the activation dtype and each
product and sum is rounded to it, so bf16 results follow the torch path's roundings (with FMA
fusion off, which would skip them). One program rotates every head of q and k for one token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.checks import FLOAT_DTYPES, INDEX_DTYPES, check_dtype, check_ndim, check_same_device
from kernels.config import reference_enabled

_OP = "apply_rotary"


def apply_rotary(
    positions: torch.Tensor,  # [T] int32/int64
    q: torch.Tensor,  # [T, Hq * D] or [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv * D] or [T, Hkv, D]
    cos_sin_cache: torch.Tensor,  # [P, D] float32, P > max(positions)
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # rotated q and k, shapes and dtypes as given
    """Rotate every head of q and k by its token's position; returns new tensors."""
    check_ndim(_OP, "positions", positions, 1, "[tokens]")
    check_dtype(_OP, "positions", positions, INDEX_DTYPES)
    check_ndim(_OP, "cos_sin_cache", cos_sin_cache, 2, "[max_position, head_dim]")
    check_dtype(_OP, "cos_sin_cache", cos_sin_cache, FLOAT_DTYPES)
    if head_dim < 2 or head_dim % 2 != 0 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(
            f"{_OP}: head_dim {head_dim} must be even and match cos_sin_cache {tuple(cos_sin_cache.shape)}"
        )
    for name, t in (("q", q), ("k", k)):
        check_dtype(_OP, name, t, FLOAT_DTYPES)
        if t.dim() not in (2, 3) or t.shape[0] != positions.shape[0] or t.shape[1:].numel() % head_dim:
            raise ValueError(
                f"{_OP}: {name} must be [tokens, heads * head_dim] or [tokens, heads, head_dim] with "
                f"{positions.shape[0]} tokens and head_dim {head_dim}, got {tuple(t.shape)}"
            )
    check_same_device(_OP, positions=positions, q=q, k=k, cos_sin_cache=cos_sin_cache)
    if reference_enabled():
        return apply_rotary_ref(positions, q, k, cos_sin_cache, head_dim)

    q3, k3 = _heads(q, head_dim), _heads(k, head_dim)  # [T, H, D] views
    q_out = torch.empty(q3.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k3.shape, dtype=k.dtype, device=k.device)
    num_tokens = positions.shape[0]
    if num_tokens > 0:
        _rotary_kernel[(num_tokens,)](
            positions,
            q3,
            k3,
            q_out,
            k_out,
            cos_sin_cache,
            q3.stride(0),
            q3.stride(1),
            k3.stride(0),
            k3.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            k_out.stride(0),
            k_out.stride(1),
            cos_sin_cache.stride(0),
            q3.shape[1],
            k3.shape[1],
            head_dim // 2,
            BLOCK_HQ=triton.next_power_of_2(q3.shape[1]),
            BLOCK_HK=triton.next_power_of_2(k3.shape[1]),
            BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
            # Fused multiply-adds would skip the rounding of each product that torch does.
            enable_fp_fusion=False,
            **pdl.launch_options(q),
        )
    return q_out.view(q.shape), k_out.view(k.shape)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:  # -> [T, H, D] with unit stride on D
    x3 = x if x.dim() == 3 else x.unflatten(-1, (x.shape[-1] // head_dim, head_dim))
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    t,
    x_stride_t,
    x_stride_h,
    out_stride_t,
    out_stride_h,
    num_heads,
    half,
    cos,  # [1, BLOCK_HALF] float32, already rounded to x's dtype
    sin,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < num_heads) & (j < half)
    src = x_ptr + t * x_stride_t + h * x_stride_h + j
    x1 = tl.load(src, mask=mask, other=0.0)  # [BLOCK_H, BLOCK_HALF] first halves
    x2 = tl.load(src + half, mask=mask, other=0.0)  # second halves
    dt = x1.dtype
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    # Each product and sum rounded to dt, as the eager torch expression rounds them.
    o1 = ((x1f * cos).to(dt).to(tl.float32) - (x2f * sin).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2f * cos).to(dt).to(tl.float32) + (x1f * sin).to(dt).to(tl.float32)).to(dt)
    dst = out_ptr + t * out_stride_t + h * out_stride_h + j
    tl.store(dst, o1, mask=mask)
    tl.store(dst + half, o2, mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cache_ptr,
    q_stride_t,
    q_stride_h,
    k_stride_t,
    k_stride_h,
    qo_stride_t,
    qo_stride_h,
    ko_stride_t,
    ko_stride_h,
    cache_stride,
    num_q_heads,
    num_k_heads,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.wait(USE_PDL)  # before any load: the kernel before may still run
    pdl.release(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    j_mask = j < half
    cos = tl.load(cache_ptr + pos * cache_stride + j, mask=j_mask, other=0.0)  # [1, BLOCK_HALF]
    sin = tl.load(cache_ptr + pos * cache_stride + half + j, mask=j_mask, other=0.0)
    # The torch module casts the float32 table to the activation dtype before rotating.
    q_dt = q_ptr.dtype.element_ty
    k_dt = k_ptr.dtype.element_ty
    _rotate_heads(
        q_ptr,
        q_out_ptr,
        t,
        q_stride_t,
        q_stride_h,
        qo_stride_t,
        qo_stride_h,
        num_q_heads,
        half,
        cos.to(q_dt).to(tl.float32),
        sin.to(q_dt).to(tl.float32),
        BLOCK_HQ,
        BLOCK_HALF,
    )
    _rotate_heads(
        k_ptr,
        k_out_ptr,
        t,
        k_stride_t,
        k_stride_h,
        ko_stride_t,
        ko_stride_h,
        num_k_heads,
        half,
        cos.to(k_dt).to(tl.float32),
        sin.to(k_dt).to(tl.float32),
        BLOCK_HK,
        BLOCK_HALF,
    )


def apply_rotary_ref(
    positions: torch.Tensor,  # [T]
    q: torch.Tensor,  # [T, Hq * D] or [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv * D] or [T, Hkv, D]
    cos_sin_cache: torch.Tensor,  # [P, D]
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch `apply_rotary`: the model's `RotaryEmbedding.forward`, operation for operation."""
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)  # [T, D/2] each

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x3 = x.reshape(x.shape[0], x.shape[1:].numel() // head_dim, head_dim)  # [T, H, D]
        c = cos.to(x.dtype).unsqueeze(1)  # [T, 1, D/2]
        s = sin.to(x.dtype).unsqueeze(1)
        x1, x2 = x3.chunk(2, dim=-1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).reshape(x.shape)

    return rotate(q), rotate(k)
