"""Argument checks the kernel wrappers share; every failure is a `ValueError` naming the op."""

from __future__ import annotations

import torch

from kernels.config import interpreting, reference_enabled

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
# An FP8 KV cache stores float8_e4m3fn with scale 1.0: writes saturate to +-FP8_E4M3_MAX, reads
# convert to the query's dtype.
FP8_DTYPES = (torch.float8_e4m3fn,)
KV_DTYPES = FLOAT_DTYPES + FP8_DTYPES
FP8_E4M3_MAX = 448.0


def check_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device that Triton can launch on; that device, else a `ValueError`.

    Reference mode runs anywhere. Otherwise a CPU tensor needs the interpreter: compiled Triton
    kernels only see GPU memory.
    """
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        found = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"{op}: tensors must share one device, got {found}")
    if first.type == "cpu" and not (reference_enabled() or interpreting()):
        raise ValueError(
            f"{op}: CPU tensors need TRITON_INTERPRET=1 (set before importing kernels) "
            "or kernels.config.use_reference(True)"
        )
    return first


def check_dtype(op: str, name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise ValueError(f"{op}: {name} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")


def check_ndim(op: str, name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(t.shape)}")


def check_index_vectors(op: str, q: torch.Tensor, batch_size: int | None, **vectors: torch.Tensor) -> None:
    """Integer `[batch]` vectors of one length (`batch_size` when given), on q's device."""
    sizes = set() if batch_size is None else {batch_size}
    for name, t in vectors.items():
        check_ndim(op, name, t, 1, "[batch]")
        check_dtype(op, name, t, INDEX_DTYPES)
        sizes.add(t.shape[0])
    if len(sizes) > 1:
        found = ", ".join(f"{name} {t.shape[0]}" for name, t in vectors.items())
        raise ValueError(f"{op}: batch sizes disagree ({found})")
    check_same_device(op, q=q, **vectors)


def check_kv_dtype(op: str, q: torch.Tensor, **buffers: torch.Tensor) -> None:
    """KV buffers of one dtype: the query's (a float dtype), or float8_e4m3fn (an FP8 cache)."""
    check_dtype(op, "q", q, FLOAT_DTYPES)
    dtypes = {t.dtype for t in buffers.values()}
    if len(dtypes) > 1 or not dtypes <= {q.dtype, *FP8_DTYPES}:
        found = ", ".join(f"{name} {t.dtype}" for name, t in buffers.items())
        raise ValueError(
            f"{op}: q and the KV buffers must share a dtype, or the buffers be float8_e4m3fn "
            f"(q {q.dtype}, {found})"
        )


def check_paged_attention(
    op: str,
    q: torch.Tensor,  # [N, Hq, Dk]
    k_buffer: torch.Tensor,  # [num_slots, Hkv, Dk]
    v_buffer: torch.Tensor,  # [num_slots, Hkv, Dv], any strides (e.g. a view of the MLA latent)
    req_to_token: torch.Tensor,  # [rows, max_ctx]
    scaling: float,
    sliding_window: int | None,
) -> None:
    """What decode and extend attention both need of q, the pool and the request table.

    The values may be narrower than the keys (Dv != Dk, as in MLA); the buffers share one dtype,
    q's or float8_e4m3fn.
    """
    check_ndim(op, "q", q, 3, "[tokens, q_heads, head_dim]")
    check_ndim(op, "k_buffer", k_buffer, 3, "[num_slots, kv_heads, head_dim]")
    check_ndim(op, "v_buffer", v_buffer, 3, "[num_slots, kv_heads, v_head_dim]")
    check_ndim(op, "req_to_token", req_to_token, 2, "[rows, max_context]")
    check_dtype(op, "req_to_token", req_to_token, INDEX_DTYPES)
    if req_to_token.stride(1) != 1:
        raise ValueError(f"{op}: req_to_token rows must be contiguous, got strides {req_to_token.stride()}")
    if k_buffer.shape[:2] != v_buffer.shape[:2]:
        raise ValueError(
            f"{op}: k_buffer {tuple(k_buffer.shape)} and v_buffer {tuple(v_buffer.shape)} differ in "
            "slots or KV heads"
        )
    check_kv_dtype(op, q, k_buffer=k_buffer, v_buffer=v_buffer)
    if q.shape[2] != k_buffer.shape[2]:
        raise ValueError(f"{op}: q head_dim {q.shape[2]} != pool head_dim {k_buffer.shape[2]}")
    if q.shape[1] % k_buffer.shape[1] != 0:
        raise ValueError(f"{op}: {q.shape[1]} query heads are not a multiple of {k_buffer.shape[1]} KV heads")
    if not scaling > 0:
        raise ValueError(f"{op}: scaling must be positive, got {scaling}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{op}: sliding_window must be None or >= 1, got {sliding_window}")
    check_same_device(op, q=q, k_buffer=k_buffer, v_buffer=v_buffer, req_to_token=req_to_token)
