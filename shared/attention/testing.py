"""A one-sequence forward batch for tests that run a model outside the engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from shared.attention.base import create_backend
from shared.batch import ForwardBatch, ForwardMode
from shared.mem import ReqToTokenPool, make_kv_pool

if TYPE_CHECKING:
    from shared.models.config import ModelConfig


def single_sequence_batch(
    input_ids: torch.Tensor,  # [T]
    model_config: ModelConfig,
    dtype: torch.dtype = torch.float32,
    backend: str = "torch",
) -> ForwardBatch:
    """Prefill of one sequence into a private pool of the model's kind (slots 0..T-1), `dtype`
    its storage; logits for every position."""
    t = int(input_ids.shape[0])
    device = input_ids.device
    req_pool = ReqToTokenPool(1, t, device)
    row = req_pool.alloc()
    assert row is not None
    slots = torch.arange(t, dtype=torch.int64, device=device)
    req_pool.req_to_token[row, :t] = slots
    kv_pool = make_kv_pool(model_config, t, dtype, device)
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)
    return ForwardBatch(
        mode=ForwardMode.EXTEND,
        input_ids=input_ids,
        positions=slots.clone(),
        out_cache_loc=slots,
        req_pool_indices=as_tensor([row]),
        seq_lens=as_tensor([t]),
        extend_prefix_lens=as_tensor([0]),
        extend_seq_lens=as_tensor([t]),
        logits_indices=slots.clone(),
        req_pool_indices_cpu=[row],
        seq_lens_cpu=[t],
        extend_prefix_lens_cpu=[0],
        extend_seq_lens_cpu=[t],
        req_to_token_pool=req_pool,
        kv_pool=kv_pool,
        attn_backend=create_backend(backend),
    )
