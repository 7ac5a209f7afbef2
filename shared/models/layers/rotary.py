"""Rotary position embedding (neox layout, as HF Llama's `rotate_half`), applied by position.

The inverse frequencies follow transformers' formulas operation for operation (default, linear,
Llama 3 and YaRN scaling), and the cos/sin table is built once in float32 for every position up
to `max_position`, so a lookup by position gives the same numbers HF computes per forward.

DeepSeek's rope is interleaved (rotation pairs (x0, x1), (x2, x3), ...). The models permute the
rope rows of their projections at load time so that they emit the de-interleaved layout
[evens | odds] (`deinterleave_rope_rows`); this neox rotation then applies unchanged. q.k is
invariant to the same permutation of both, and it is exactly how HF's DeepSeek-V3 rotates
(`apply_rotary_pos_emb_interleave` outputs [evens | odds] too).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from shared.models.layers.fused import use_kernels
from shared.models.weights import WeightLoader, set_weight_loader


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their token's position; no parameters, one float32 cos/sin table."""

    def __init__(
        self, head_dim: int, max_position: int, inv_freq: torch.Tensor, attention_factor: float = 1.0
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        # Built on CPU so the table is identical whatever device the model lives on.
        t = torch.arange(max_position, dtype=torch.int64, device="cpu").float()  # [P]
        freqs = t[:, None] * inv_freq[None, :]  # [P, D/2]
        cos, sin = freqs.cos(), freqs.sin()
        if attention_factor != 1.0:
            # YaRN's attention factor scales the table itself, as HF scales cos/sin.
            cos, sin = cos * attention_factor, sin * attention_factor
        cache = torch.cat([cos, sin], dim=-1)  # [P, D]: cos | sin
        self.cos_sin_cache: torch.Tensor
        self.register_buffer("cos_sin_cache", cache.to(torch.get_default_device()), persistent=False)

    def forward(
        self,
        positions: torch.Tensor,  # [T] int64
        q: torch.Tensor,  # [T, Hq * D] or [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv * D] or [T, Hkv, D]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if use_kernels(q):
            from kernels.rotary import apply_rotary

            return apply_rotary(positions, q, k, self.cos_sin_cache, self.head_dim)
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)  # [T, D/2] each
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # Explicit head count (not -1) so an empty batch (T = 0) reshapes too.
        x = x.reshape(shape[0], shape[1:].numel() // self.head_dim, self.head_dim)  # [T, H, D]
        # HF casts cos/sin to the activation dtype and rotates in it; do the same for parity.
        cos = cos.to(x.dtype).unsqueeze(1)  # [T, 1, D/2]
        sin = sin.to(x.dtype).unsqueeze(1)
        x1, x2 = x.chunk(2, dim=-1)  # [T, H, D/2] each
        # x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), written per half.
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.reshape(shape)


def get_rope(
    head_dim: int, max_position: int, base: float, rope_scaling: dict[str, Any] | None = None
) -> RotaryEmbedding:
    """Build the rotary embedding for a config's rope settings.

    `rope_scaling` is None (plain RoPE) or a dict with `rope_type` "default", "linear", "llama3"
    or "yarn" (keys as in HF configs); other types are a `ValueError`.
    """
    rope_scaling = rope_scaling or {}
    if rope_scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings are not supported")
    rope_type = _rope_type(rope_scaling)
    inv_freq = default_inv_freq(head_dim, base)
    attention_factor = 1.0
    if rope_type == "linear":
        inv_freq = inv_freq / float(rope_scaling["factor"])
    elif rope_type == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, rope_scaling)
    elif rope_type == "yarn":
        inv_freq, attention_factor = yarn_parameters(head_dim, base, max_position, rope_scaling)
    elif rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (default, linear, llama3, yarn are)")
    return RotaryEmbedding(head_dim, max_position, inv_freq, attention_factor)


def _rope_type(rope_scaling: dict[str, Any]) -> str:
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:  # [D/2] float32
    """1 / base^(2i / D) for i in [0, D/2), exactly as transformers computes it."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (base**exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths slowed by `factor`, short ones kept,
    the band between interpolated smoothly (transformers' `_compute_llama3_parameters`)."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context extended `scale` times (1 when not extended)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_parameters(
    head_dim: int, base: float, max_position: int, scaling: dict[str, Any]
) -> tuple[torch.Tensor, float]:
    """(inv_freq [D/2] float32, attention_factor) as transformers' `_compute_yarn_parameters`.

    High frequencies (more than `beta_fast` rotations over the original context) keep their
    frequency, low ones (fewer than `beta_slow`) are divided by `factor`, a linear ramp blends
    the band between. The attention factor multiplies the cos/sin table.
    """
    original_max = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    if factor is None:  # DeepSeek-V3 style: the ratio of the two context lengths
        factor = max_position / original_max
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(
                yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
            )
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    truncate = scaling.get("truncate", True)

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength fits `num_rotations` times into the original context.
        return (head_dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as HF: avoid a zero-width ramp

    pos_freqs = base ** (torch.arange(0, head_dim, 2, device="cpu").to(dtype=torch.float) / head_dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp(
        (torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1
    )
    extrapolation_factor = 1 - ramp
    inv_freq = (
        inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    )
    return inv_freq, float(attention_factor)


def yarn_softmax_scale(qk_head_dim: int, rope_scaling: dict[str, Any] | None) -> float:
    """DeepSeek's attention softmax scale: qk_head_dim**-0.5, times mscale(factor, mscale_all_dim)**2
    when the rope is scaled and `mscale_all_dim` is set (HF's `yarn_apply_mscale`)."""
    scaling = qk_head_dim**-0.5
    if rope_scaling and _rope_type(rope_scaling) != "default":
        mscale_all_dim = rope_scaling.get("mscale_all_dim", 0)
        if mscale_all_dim:
            mscale = yarn_get_mscale(rope_scaling["factor"], mscale_all_dim)
            scaling = scaling * mscale * mscale
    return scaling


def deinterleave_perm(rope_dim: int) -> torch.Tensor:
    """[rope_dim] int64: row order that turns interleaved pairs into [evens | odds]."""
    return torch.cat([torch.arange(0, rope_dim, 2, device="cpu"), torch.arange(1, rope_dim, 2, device="cpu")])


def deinterleave_rope_rows(linear: nn.Module, num_rows: int, row_starts: list[int], rope_dim: int) -> None:
    """Make `linear`'s weight loader permute, in the checkpoint tensor (`num_rows` rows: the full
    output size), rows [s, s + rope_dim) for every s in `row_starts` from interleaved pairs to
    [evens | odds], before the layer's own loading (and tensor-parallel slicing).

    The layer's `weight_loader` itself is wrapped (and re-attached to its parameters), so a
    parameter the layer re-creates later and attaches `self.weight_loader` to keeps the
    permutation. A pure row permutation: block-wise FP8 scales stay valid while every permuted
    range lies in one 128-row block; tensors with another row count (those scales) load as given.
    """
    perm = torch.arange(num_rows, device="cpu")
    for s in row_starts:
        perm[s : s + rope_dim] = s + deinterleave_perm(rope_dim)
    loader = _permuted_rows(cast(WeightLoader, linear.weight_loader), perm)
    setattr(linear, "weight_loader", loader)  # noqa: B010 (a plain attribute, not a submodule)
    for param in linear.parameters():
        set_weight_loader(param, loader, getattr(param, "shard_ids", ()))


def _permuted_rows(inner: WeightLoader, perm: torch.Tensor) -> WeightLoader:
    def load(param: nn.Parameter, loaded: torch.Tensor, *shard: Any) -> None:
        if loaded.shape[0] != perm.shape[0]:
            inner(param, loaded, *shard)
            return
        inner(param, loaded.index_select(0, perm.to(loaded.device)), *shard)

    return load
