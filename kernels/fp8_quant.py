"""Block-wise FP8 (E4M3) quantization, DeepSeek-V3 style: one float32 scale per group of values.

Activations are quantized at run time per token in groups of `group_size` consecutive columns
(`per_token_group_quant_fp8`, a Triton kernel); weights once at load time per `bn x bk` block
(`block_quant_fp8`, torch). Every group g follows one rule, computed in float32:

    scale_g = max(amax(|x_g|), FP8_EPS) / FP8_MAX        the dequantization multiplier
    q       = clamp(x / scale_g, -FP8_MAX, FP8_MAX) -> E4M3, rounded to nearest, ties to even

so x ~= q * scale_g. A ragged last group (K % group_size != 0, tiny test models) uses only its
real elements.

Rounding: the kernel first rounds x / scale to the E4M3 grid in float32 (`_round_to_e4m3`) and
only then casts, so the cast is exact. On a GPU that is what `cvt.rn.satfinite` would do anyway;
under TRITON_INTERPRET=1 it is what makes the result right at all, because Triton 3.6's
interpreter casts float32 to FP8 in software with a broken carry (a mantissa 111 that rounds up
can come out as half the value: 31.04 -> 16.0). With the pre-rounding the kernel matches the
torch reference bit for bit in both places.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.checks import FLOAT_DTYPES, check_dtype, check_ndim, check_same_device
from kernels.config import reference_enabled

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
FP8_EPS = 1e-10  # keeps an all-zero group's scale positive (its q is then all zeros)

# Whether an FP8 linear's producer quantizes its output itself (RMSNorm before qkv and gate_up,
# SiLU-and-mul before down: `rmsnorm_fp8`, `silu_and_mul_fp8`), one launch fewer each, the same
# codes and scales bit for bit. Off until measured on a GPU (docs/benchmarks.md, r31).
FUSE_INTO_PRODUCERS = False


class Fp8Activation(NamedTuple):
    """An activation its producer quantized: E4M3 codes and their per-token-group scales, as
    `per_token_group_quant_fp8` gives them for the float activation, and that activation's dtype
    (the dtype an FP8 linear of it returns)."""

    codes: torch.Tensor  # [T, K] float8_e4m3fn
    scales: torch.Tensor  # [T, ceil(K / group)] float32
    dtype: torch.dtype


_OP = "per_token_group_quant_fp8"
# Elements one program quantizes: whole groups of one row, enough to keep loads wide.
_TILE_ELEMENTS = 2048


def per_token_group_quant_fp8(
    x: torch.Tensor,  # [M, K] float32/float16/bfloat16, any strides
    group_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([M, K] float8_e4m3fn, [M, ceil(K / group_size)] float32)
    """Quantize each row of `x` to E4M3 in groups of `group_size` columns, with one dequantization
    scale per (row, group): x ~= q.float() * scale (scale repeated over its group's columns).

    One launch, no host sync: safe inside CUDA-graph capture.
    """
    _check_per_token(x, group_size)
    if reference_enabled():
        return per_token_group_quant_fp8_ref(x, group_size)
    q, scale = quant_rows_fp8(x.unsqueeze(0), group_size)
    return q[0], scale[0]


def quant_rows_fp8(
    x: torch.Tensor,  # [B, M, K] float, any strides (e.g. a [M, B, K] tensor transposed)
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([B, M, K] float8_e4m3fn, [B, M, ceil(K / group_size)] f32)
    """The kernel launch behind `per_token_group_quant_fp8`, for a batch of matrices (`fp8_bmm`):
    the same rule for every row of every matrix, outputs contiguous. No checks: callers check."""
    batch, m, k = x.shape
    groups = triton.cdiv(k, group_size)
    q = torch.empty((batch, m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((batch, m, groups), dtype=torch.float32, device=x.device)
    if q.numel() == 0:
        return q, scale
    block_g = triton.next_power_of_2(group_size)  # columns of a group, padded
    groups_per_program = min(triton.next_power_of_2(groups), max(1, _TILE_ELEMENTS // block_g))
    # Axis 0 (the large one) walks the B * M rows; outputs are contiguous, so output row r is
    # simply r * K (resp. r * groups).
    grid = (batch * m, triton.cdiv(groups, groups_per_program))
    _per_token_group_quant_kernel[grid](
        x,
        q,
        scale,
        m,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        k,
        groups,
        group_size,
        FP8_MAX,
        FP8_EPS,
        BLOCK_GROUPS=groups_per_program,
        BLOCK_G=block_g,
        **pdl.launch_options(x),
    )
    return q, scale


def _check_per_token(x: torch.Tensor, group_size: int) -> None:
    check_ndim(_OP, "x", x, 2, "[tokens, hidden]")
    check_dtype(_OP, "x", x, FLOAT_DTYPES)
    if group_size < 1:
        raise ValueError(f"{_OP}: group_size must be >= 1, got {group_size}")
    check_same_device(_OP, x=x)


@triton.jit
def _round_to_e4m3(v):
    """Round float32 v (|v| <= 448) to the nearest E4M3 value, ties to even, still in float32.

    The E4M3 step at |v| is 2^(e - 3) for 2^e <= |v| (e >= -6), else the subnormal step 2^-9.
    Adding and subtracting c = 1.5 * 2^(step + 23) makes the float32 adder round to that step:
    |v| is far below c, so |v| + c lies in [2^(step+23), 2^(step+24)), whose spacing is the step.
    The sign goes back on as a bit, so -0.0 and negatives that round to zero stay -0.0 (torch's
    cast keeps it too).
    """
    bits = v.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127  # unbiased float32 exponent
    step = tl.maximum(exp, -6) - 3
    c = (((step + 23 + 127) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
    magnitude = (tl.abs(v) + c) - c
    sign = bits & (-2147483648)  # 0x80000000 as int32
    return (magnitude.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def quant_groups_e4m3(x, fp8_max, eps):
    """The quantization rule on a [R, G] float32 tile holding one group per row (padding zeros
    leave the amax alone): (x / scale on the E4M3 grid, still float32 so the cast is exact;
    scale [R]). Shared with the GEMM that quantizes its activation in place (`fp8_gemm`), so
    both give the same codes and scales bit for bit."""
    amax = tl.max(tl.abs(x), axis=1)  # [R]
    # Correctly rounded divisions (a plain `/` may compile to an approximate one): the reference's
    # arithmetic exactly.
    scale = tl.math.div_rn(tl.maximum(amax, eps), fp8_max)
    v = tl.math.div_rn(x, scale[:, None])
    v = tl.minimum(tl.maximum(v, -fp8_max), fp8_max)
    return _round_to_e4m3(v), scale


@triton.jit
def store_groups_e4m3(
    y, q_ptr, scale_ptr, col0, n_cols, fp8_max, eps, BLOCK: tl.constexpr, GROUP: tl.constexpr
):
    """Quantize one row's [BLOCK] float32 tile `y`, columns [col0, col0 + BLOCK) of a row of
    `n_cols` (zeros past the end), in groups of GROUP (BLOCK a multiple of it, col0 too) with the
    rule above, and store the codes at q_ptr + column and the scales at scale_ptr + group: what a
    producer that quantizes its own output (`rmsnorm_fp8`, `silu_and_mul_fp8`) ends with."""
    v, scale = quant_groups_e4m3(tl.reshape(y, (BLOCK // GROUP, GROUP)), fp8_max, eps)
    g = tl.arange(0, BLOCK // GROUP)
    cols = col0 + g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [BLOCK // GROUP, GROUP]
    tl.store(q_ptr + cols, v.to(q_ptr.dtype.element_ty), mask=cols < n_cols)
    first = col0 // GROUP + g
    tl.store(scale_ptr + first, scale, mask=first * GROUP < n_cols)


def check_producer_group(op: str, group_size: int) -> None:
    """The group size of a producer that quantizes its own output (`rmsnorm_fp8`,
    `silu_and_mul_fp8`): a power of two, the tile its program reshapes the row into."""
    if group_size < 1 or triton.next_power_of_2(group_size) != group_size:
        raise ValueError(f"{op}: group_size must be a power of two, got {group_size}")


def empty_fp8_activation(
    shape: tuple[int, ...], group_size: int, dtype: torch.dtype, device: torch.device
) -> Fp8Activation:
    """Uninitialised codes and scales for a [..., K] activation of `dtype`, flattened to [T, K]."""
    k, t = shape[-1], math.prod(shape[:-1])
    codes = torch.empty((t, k), dtype=FP8_DTYPE, device=device)
    scales = torch.empty((t, triton.cdiv(k, group_size)), dtype=torch.float32, device=device)
    return Fp8Activation(codes, scales, dtype)


@triton.jit
def _per_token_group_quant_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    rows_per_batch,
    x_stride_b,
    x_stride_m,
    x_stride_k,
    k,
    groups,
    group_size,
    fp8_max,
    eps,
    BLOCK_GROUPS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.wait(USE_PDL)  # before any load: the kernel before may still run
    pdl.release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = (row // rows_per_batch) * x_stride_b + (row % rows_per_batch) * x_stride_m
    g = tl.program_id(1) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)  # [BLOCK_GROUPS]
    j = tl.arange(0, BLOCK_G)  # [BLOCK_G] column within the group
    cols = g[:, None] * group_size + j[None, :]  # [BLOCK_GROUPS, BLOCK_G]
    mask = (j[None, :] < group_size) & (cols < k)
    x = tl.load(x_ptr + x_row + cols * x_stride_k, mask=mask, other=0.0).to(tl.float32)
    v, scale = quant_groups_e4m3(x, fp8_max, eps)  # [BLOCK_GROUPS, BLOCK_G], [BLOCK_GROUPS]
    tl.store(q_ptr + row * k + cols, v.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row * groups + g, scale, mask=g < groups)


def per_token_group_quant_fp8_ref(
    x: torch.Tensor,  # [M, K]
    group_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([M, K] float8_e4m3fn, [M, ceil(K / group_size)] float32)
    """Pure-torch `per_token_group_quant_fp8`: torch's E4M3 cast rounds to nearest even."""
    m, k = x.shape
    groups = -(-k // group_size)
    # Zero padding completes the last group without changing its amax.
    xp = torch.nn.functional.pad(x.float(), (0, groups * group_size - k)).view(m, groups, group_size)
    scale = _scale_of(xp.abs().amax(dim=-1))  # [M, G]
    q = (xp / scale[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(m, groups * group_size)[:, :k].contiguous(), scale


def _scale_of(amax: torch.Tensor) -> torch.Tensor:
    # A tensor divisor, not the Python float: CUDA torch turns division by a scalar into a
    # multiplication by its reciprocal, which rounds differently from the kernel's (and CPU
    # torch's) correctly rounded division.
    return amax.clamp(min=FP8_EPS) / torch.tensor(FP8_MAX, device=amax.device)


def block_quant_fp8(
    w: torch.Tensor,  # [N, K] float
    block: tuple[int, int] = (128, 128),
) -> tuple[torch.Tensor, torch.Tensor]:  # ([N, K] float8_e4m3fn, [ceil(N / bn), ceil(K / bk)] float32)
    """Quantize a weight to E4M3 with one dequantization scale per `bn x bk` block (load time,
    torch only): w ~= block_dequant_fp8(w_q, scale_inv, block). Edge blocks use their real rows
    and columns."""
    check_ndim("block_quant_fp8", "w", w, 2, "[out_features, in_features]")
    check_dtype("block_quant_fp8", "w", w, FLOAT_DTYPES)
    bn, bk = check_block("block_quant_fp8", block)
    n, k = w.shape
    nb, kb = -(-n // bn), -(-k // bk)
    wp = torch.nn.functional.pad(w.float(), (0, kb * bk - k, 0, nb * bn - n))
    blocks = wp.view(nb, bn, kb, bk)
    scale = _scale_of(blocks.abs().amax(dim=(1, 3)))  # [nb, kb]
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nb * bn, kb * bk)[:n, :k].contiguous(), scale


def block_dequant_fp8(
    w_q: torch.Tensor,  # [N, K] float8_e4m3fn
    scale_inv: torch.Tensor,  # [ceil(N / bn), ceil(K / bk)] float32
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [N, K] dtype
    """w_q * scale_inv, each scale repeated over its block (products in float32)."""
    return (w_q.float() * expand_block_scale(scale_inv, w_q.shape, block)).to(dtype)


def expand_block_scale(
    scale: torch.Tensor,  # [..., ceil(N / bn), ceil(K / bk)]
    shape: torch.Size | tuple[int, ...],  # [..., N, K]
    block: tuple[int, int],
) -> torch.Tensor:  # [..., N, K] float32
    """Each block's scale repeated over the elements it covers (edge blocks cut to `shape`)."""
    bn, bk = block
    n, k = shape[-2], shape[-1]
    full = scale.float().repeat_interleave(bn, dim=-2).repeat_interleave(bk, dim=-1)
    return full[..., :n, :k]


def check_block(op: str, block: tuple[int, int]) -> tuple[int, int]:
    """(bn, bk) of a weight block shape, else a `ValueError` naming the op."""
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"{op}: block must be two positive sizes (rows, columns), got {block}")
    return int(block[0]), int(block[1])
