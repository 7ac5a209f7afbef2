"""KV pools: per-layer KV storage indexed by token slot.

A pool is a dumb array. Which slots belong to whom is the allocator's and the radix cache's
business; the pool never checks ownership. Slot 0..page_size-1 (page 0) is the padding target and
may hold garbage. Variants are separate classes chosen by the model config: `MHAKVPool` (K and V
per KV head) for MHA/GQA models, `MLAKVPool` (one latent vector per token) for multi-head latent
attention (DeepSeek-V2/V3).

Storage may be float8_e4m3fn (an FP8 KV cache with scale 1.0): writes clamp to the format's range
(+-448) before the cast, so an outlier saturates instead of becoming NaN; readers upcast.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shared.models.config import ModelConfig

FP8_E4M3_MAX = 448.0


def to_storage(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` cast to a pool's storage dtype, saturating at +-448 when that is float8_e4m3fn."""
    if dtype == torch.float8_e4m3fn:
        return x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(dtype)
    return x.to(dtype)


class KVPool(ABC):
    """Per-layer KV storage indexed by token slot: what every pool variant shares.

    Writers and readers are the attention backends, through each variant's own accessors, for
    the slots the scheduler assigned to a step's new tokens. No locking: one model-runner thread.
    The memory sizing and the KV transfer see only this interface.
    """

    num_layers: int
    num_slots: int
    dtype: torch.dtype
    device: torch.device

    @abstractmethod
    def buffers(self) -> list[torch.Tensor]:
        """Every storage tensor, each `[num_slots, ...]` (the KV transfer moves slot ranges of all)."""

    @abstractmethod
    def bytes_per_token(self) -> int:
        """Bytes one token slot takes across all layers."""

    def total_bytes(self) -> int:
        return self.bytes_per_token() * self.num_slots

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy every buffer's `src` slots to `dst` slots (`[N]` each, pairwise)."""
        assert src.shape == dst.shape, (src.shape, dst.shape)
        for buf in self.buffers():
            # the gather on the right is a copy, so overlapping src/dst read the old values
            buf[dst] = buf[src]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


class MHAKVPool(KVPool):
    """K and V per layer, each `[num_slots, num_kv_heads, head_dim]`.

    Writers: attention backends through `set_kv`. Readers: through `get_kv`, which returns the
    live buffers (no copy), so a backend may index them directly.
    """

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        _check_positive(
            num_slots=num_slots, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim
        )
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_slots, num_kv_heads, head_dim)
        self.k_buffers = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]

    def set_kv(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the K/V of `len(slots)` tokens of one layer at those slots."""
        # slots: [T] int64; k, v: [T, Hkv, D] in any float dtype, cast to the pool's
        self.k_buffers[layer_id][slots] = to_storage(k, self.dtype)
        self.v_buffers[layer_id][slots] = to_storage(v, self.dtype)

    def get_kv(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The full K and V buffers of one layer (views of the storage, not copies)."""
        return self.k_buffers[layer_id], self.v_buffers[layer_id]

    def buffers(self) -> list[torch.Tensor]:
        return [buf for pair in zip(self.k_buffers, self.v_buffers) for buf in pair]

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * _itemsize(self.dtype)


class MLAKVPool(KVPool):
    """One latent vector per token and layer: `[num_slots, 1, kv_lora_rank + rope_dim]` per layer.

    Each entry is `[c | k_rope]`: the normed compressed KV (`kv_lora_rank` wide), which every
    head's keys and values are derived from, then the rotated rope key shared by all heads. The
    middle axis is the single KV head (the layout attention kernels index like an MHA buffer).
    Writers: attention backends through `set_latent`; readers through `get_latent` (live buffer).
    """

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        _check_positive(
            num_slots=num_slots, num_layers=num_layers, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim
        )
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.latent_dim = kv_lora_rank + rope_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_slots, 1, self.latent_dim)
        self.latent_buffers = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]

    def set_latent(self, layer_id: int, slots: torch.Tensor, latent: torch.Tensor) -> None:
        """Write `len(slots)` tokens' latents (`[T, kv_lora_rank + rope_dim]`) of one layer."""
        self.latent_buffers[layer_id][slots] = to_storage(latent, self.dtype).unsqueeze(1)

    def get_latent(self, layer_id: int) -> torch.Tensor:
        """One layer's full buffer `[num_slots, 1, kv_lora_rank + rope_dim]` (the storage, no copy)."""
        return self.latent_buffers[layer_id]

    def buffers(self) -> list[torch.Tensor]:
        return list(self.latent_buffers)

    def bytes_per_token(self) -> int:
        return self.num_layers * self.latent_dim * _itemsize(self.dtype)


def make_kv_pool(
    model_config: ModelConfig, num_slots: int, dtype: torch.dtype, device: torch.device | str
) -> KVPool:
    """The pool variant a model needs, `dtype` its storage: one latent per token and layer for MLA
    (`model_config.mla`), else K and V per KV head."""
    mc = model_config
    if mc.mla is not None:
        return MLAKVPool(
            num_slots, mc.num_hidden_layers, mc.mla.kv_lora_rank, mc.mla.qk_rope_head_dim, dtype, device
        )
    return MHAKVPool(num_slots, mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, dtype, device)
