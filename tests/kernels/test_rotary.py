"""Rotary embedding: Triton against the reference, the reference against the model's
RotaryEmbedding (neox layout, cos/sin rounded to the activation dtype)."""

from __future__ import annotations

import pytest
import torch

from kernels.rotary import apply_rotary, apply_rotary_ref
from shared.models.layers.rotary import get_rope
from tests.kernels import assert_close_to_rounding

pytestmark = pytest.mark.kernels


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 4, 64), (4, 1, 128), (6, 2, 80)])
def test_rotary_matches_reference(
    device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    # float16 on CPU checks the rounding order; the interpreter truncates bfloat16 casts.
    dtypes = [torch.float32, torch.float16] if device.type == "cpu" else [torch.float32, torch.bfloat16]
    scale = 1 if device.type == "cpu" else 8  # real shapes on the GPU
    num_tokens, num_heads, num_kv_heads = 9 * scale**3, num_heads * scale, num_kv_heads * scale
    rope = get_rope(head_dim, 4096, 10000.0)
    cache = rope.cos_sin_cache.to(device)
    positions = torch.randint(0, 4096, (num_tokens,), device=device)
    for dtype in dtypes:
        # Flat q as the qkv projection gives it (a strided view), k already split into heads.
        qkv = torch.randn((num_tokens, (num_heads + 2 * num_kv_heads) * head_dim), device=device).to(dtype)
        q = qkv[:, : num_heads * head_dim]
        k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].unflatten(-1, (-1, head_dim))
        q_out, k_out = apply_rotary(positions, q, k, cache, head_dim)
        q_ref, k_ref = apply_rotary_ref(positions, q, k, cache, head_dim)
        assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == dtype
        assert_close_to_rounding(q_out, q_ref)
        assert_close_to_rounding(k_out, k_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_reference_is_the_model_rotary(dtype: torch.dtype) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    }
    rope = get_rope(64, 1024, 500000.0, scaling)
    positions = torch.tensor([0, 1, 17, 1023, 300])
    q, k = torch.randn(5, 4 * 64).to(dtype), torch.randn(5, 2, 64).to(dtype)
    q_ref, k_ref = apply_rotary_ref(positions, q, k, rope.cos_sin_cache, 64)
    q_mod, k_mod = rope(positions, q, k)
    assert torch.equal(q_ref, q_mod) and torch.equal(k_ref, k_mod)
