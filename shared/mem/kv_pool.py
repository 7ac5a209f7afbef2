"""KV pools: per-layer K/V storage indexed by token slot.

A pool is a dumb array. Which slots belong to whom is the allocator's and the radix cache's
business; the pool never checks ownership. Slot 0..page_size-1 (page 0) is the padding target and
may hold garbage. Variants are separate classes chosen by the model config: `MHAKVPool` for
MHA/GQA models, an MLA pool (one latent vector per token) joins later.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class KVPool(ABC):
    """Per-layer KV storage indexed by token slot.

    Writers: attention backends through `set_kv`, for the slots the scheduler assigned to the new
    tokens of a step. Readers: attention backends through `get_kv`, which returns the live buffers
    (no copy), so a backend may index them directly. No locking: one model-runner thread.
    """

    num_layers: int
    num_slots: int
    dtype: torch.dtype
    device: torch.device

    @abstractmethod
    def set_kv(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the K/V of `len(slots)` tokens of one layer at those slots."""

    @abstractmethod
    def get_kv(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The full K and V buffers of one layer (views of the storage, not copies)."""

    @abstractmethod
    def buffers(self) -> list[torch.Tensor]:
        """Every storage tensor, each `[num_slots, ...]` (the KV transfer moves slot ranges of all)."""

    @abstractmethod
    def bytes_per_token(self) -> int:
        """Bytes one token slot takes across all layers."""

    def total_bytes(self) -> int:
        return self.bytes_per_token() * self.num_slots


class MHAKVPool(KVPool):
    """K and V per layer, each `[num_slots, num_kv_heads, head_dim]`."""

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        for name, value in [
            ("num_slots", num_slots),
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
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
        # slots: [T] int64; k, v: [T, Hkv, D] in any float dtype, cast to the pool's
        self.k_buffers[layer_id][slots] = k.to(self.dtype)
        self.v_buffers[layer_id][slots] = v.to(self.dtype)

    def get_kv(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffers[layer_id], self.v_buffers[layer_id]

    def buffers(self) -> list[torch.Tensor]:
        return [buf for pair in zip(self.k_buffers, self.v_buffers) for buf in pair]

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy every layer's K/V from `src` slots to `dst` slots (`[N]` each, pairwise)."""
        assert src.shape == dst.shape, (src.shape, dst.shape)
        for k_buf, v_buf in zip(self.k_buffers, self.v_buffers):
            # the gather on the right is a copy, so overlapping src/dst read the old values
            k_buf[dst] = k_buf[src]
            v_buf[dst] = v_buf[src]

    def bytes_per_token(self) -> int:
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize
