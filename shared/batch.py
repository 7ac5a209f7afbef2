"""The device-side forward batch: what one model forward needs, built by the model runner.

There are two batch types in Tandem (see docs/architecture.md): the scheduler owns the CPU-side
`ScheduleBatch` (requests, their token lists, sampling state); the model runner turns it into this
`ForwardBatch` of flat tensors once per step. Models and attention backends only see this one.

Token layout for a batch of B requests, T tokens in all (ragged, request after request):

    request        0                1            ...
    cached prefix  [0, pre_0)       [0, pre_1)        <- K/V already in the pool, not recomputed
    new tokens     [pre_0, seq_0)   [pre_1, seq_1)    <- these are the T rows of input_ids/positions
    extend_len     seq_0 - pre_0    seq_1 - pre_1

A decode step is the special case where every extend_len is 1.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shared.attention.base import AttentionBackend
    from shared.distributed.dp_attention import DpLayout
    from shared.mem import KVPool, ReqToTokenPool


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # ragged new tokens after a cached prefix: prefill, chunked prefill, mixed
    DECODE = "decode"  # exactly one new token per request


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64: KV slot each new token's K/V is written to
    req_pool_indices: torch.Tensor  # [B] int64: row of each request in req_to_token
    seq_lens: torch.Tensor  # [B] int64: tokens with K/V after this step (prefix + extend)
    extend_prefix_lens: torch.Tensor  # [B] int64
    extend_seq_lens: torch.Tensor  # [B] int64
    logits_indices: torch.Tensor  # [N] int64: rows of the hidden states that need logits
    # Host copies of the small per-request vectors: backends loop or plan on them without a sync.
    req_pool_indices_cpu: list[int]
    seq_lens_cpu: list[int]
    extend_prefix_lens_cpu: list[int]
    extend_seq_lens_cpu: list[int]
    req_to_token_pool: ReqToTokenPool
    kv_pool: KVPool
    attn_backend: AttentionBackend
    # DP attention (shared/distributed/dp_attention.py): every rank's token count this step.
    dp: DpLayout | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def to_device(
    values: Sequence[object], device: torch.device, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """A small host list as a tensor on `device`. On CUDA it goes through pinned memory with a
    non-blocking copy, which queues behind the work already launched; a pageable copy would wait
    for the GPU to drain first (e.g. for the forward just launched)."""
    return _upload(torch.tensor(values, dtype=dtype), device)


def to_device_int64(
    parts: Sequence[Sequence[int] | torch.Tensor], device: torch.device
) -> list[torch.Tensor]:
    """Several small int64 host lists (or CPU tensors) on `device` in one copy, as `to_device`
    makes it: packed into one host tensor, uploaded once, returned as views of it in order. Each
    view starts 16 bytes aligned (Triton specializes a kernel on its pointers' alignment)."""
    flat: list[int] = []
    starts: list[int] = []
    for p in parts:
        starts.append(len(flat))
        flat += [0] * len(p) if isinstance(p, torch.Tensor) else p  # a tensor's values come below
        flat += [0] * (len(p) & 1)
    host = torch.tensor(flat, dtype=torch.int64)
    for p, start in zip(parts, starts):
        if isinstance(p, torch.Tensor):
            host[start : start + len(p)] = p
    dev = _upload(host, device)
    return [dev[start : start + len(p)] for p, start in zip(parts, starts)]


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
