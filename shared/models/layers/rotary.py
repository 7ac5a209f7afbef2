"""Rotary position embedding (neox layout, as HF Llama's `rotate_half`), applied by position.

The inverse frequencies follow transformers' formulas operation for operation (default, linear
and Llama 3 scaling), and the cos/sin table is built once in float32 for every position up to
`max_position`, so a lookup by position gives the same numbers HF computes per forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from shared.models.layers.fused import use_kernels


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their token's position; no parameters, one float32 cos/sin table."""

    def __init__(self, head_dim: int, max_position: int, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        # Built on CPU so the table is identical whatever device the model lives on.
        t = torch.arange(max_position, dtype=torch.int64, device="cpu").float()  # [P]
        freqs = t[:, None] * inv_freq[None, :]  # [P, D/2]
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [P, D]: cos | sin
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

    `rope_scaling` is None (plain RoPE) or a dict with `rope_type` "default", "linear" or
    "llama3" (keys as in HF configs); other types are a `ValueError`.
    """
    rope_scaling = rope_scaling or {}
    if rope_scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings are not supported")
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    inv_freq = default_inv_freq(head_dim, base)
    if rope_type == "linear":
        inv_freq = inv_freq / float(rope_scaling["factor"])
    elif rope_type == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, rope_scaling)
    elif rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (default, linear, llama3 are)")
    return RotaryEmbedding(head_dim, max_position, inv_freq)


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
