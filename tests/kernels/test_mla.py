"""MLA decode over the latent pool, extend attention with values narrower than keys (MLA
prefill), and FP8 KV pools: Triton against the torch references.

Latent pools are laid out like the MHA pools of test_attention.py (pages handed out in random
order, page 0 the padding target), but page 0 holds NaN: a kernel that lets one padding key
into a sum gives NaN, not a slightly wrong number.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch

import kernels.mla_decode
from kernels.checks import FP8_E4M3_MAX
from kernels.config import reference_mode
from kernels.decode_attention import decode_attention, decode_attention_ref
from kernels.extend_attention import extend_attention, extend_attention_ref
from kernels.kv_store import store_kv, store_kv_ref, store_latent, store_latent_ref, to_kv_dtype_ref
from kernels.mla_decode import (
    MLADecodeConfig,
    choose_mla_kv_splits,
    mla_decode_attention,
    mla_decode_attention_ref,
)
from tests.kernels.test_attention import make_pool, setting

pytestmark = pytest.mark.kernels

FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class MLAShape:
    v_dim: int  # kv_lora_rank
    rope_dim: int
    dtype: torch.dtype
    atol: float
    max_len: int

    @property
    def latent_dim(self) -> int:
        return self.v_dim + self.rope_dim


def mla_shape(device: torch.device) -> MLAShape:
    if device.type == "cuda":  # DeepSeek-V2/V3
        return MLAShape(512, 64, torch.bfloat16, atol=2e-2, max_len=3000)
    # Small under the interpreter, which runs every program in Python.
    return MLAShape(32, 16, torch.float32, atol=2e-5, max_len=150)


@dataclass
class LatentPool:
    kv_buffer: torch.Tensor  # [num_slots, 1, Dk]
    req_to_token: torch.Tensor  # [rows, max_ctx] int64
    req_rows: torch.Tensor  # [B] int64


def make_latent_pool(
    seq_lens: list[int],
    page_size: int,
    latent_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    scale: float = 1.0,
) -> LatentPool:
    pool = make_pool(seq_lens, page_size, 1, latent_dim, torch.float32, torch.device("cpu"), seed)
    kv = pool.k_buffer * scale
    kv[:page_size] = float("nan")
    return LatentPool(
        to_kv_dtype_ref(kv, dtype).to(device), pool.req_to_token.to(device), pool.req_rows.to(device)
    )


def decode_lens(device: torch.device, max_len: int) -> list[int]:
    """A single key, a ragged middle, the longest."""
    return [1, 37, max_len] if device.type == "cpu" else [1, 37, 700, max_len, 129, 2048]


def mla_inputs(
    device: torch.device,
    num_heads: int,
    kv_dtype: torch.dtype | None = None,
    seed: int = 0,
    rope_dim: int | None = None,
) -> tuple[MLAShape, LatentPool, torch.Tensor, list[int]]:
    shape = mla_shape(device)
    if rope_dim is not None:
        shape = replace(shape, rope_dim=rope_dim)
    seq_lens = decode_lens(device, shape.max_len)
    pool = make_latent_pool(seq_lens, 16, shape.latent_dim, kv_dtype or shape.dtype, device, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    q = torch.randn((len(seq_lens), num_heads, shape.latent_dim), generator=gen).to(device, shape.dtype)
    return shape, pool, q, seq_lens


def mla_args(shape: MLAShape, pool: LatentPool, q: torch.Tensor, seq_lens: list[int]) -> tuple[Any, ...]:
    lens = torch.tensor(seq_lens, device=q.device)
    return (q, pool.kv_buffer, pool.req_to_token, pool.req_rows, lens, shape.latent_dim**-0.5, shape.v_dim)


def heads_for(device: torch.device) -> list[int]:
    # 20 and 130 leave the last 16-head block ragged.
    return [4, 20] if device.type == "cpu" else [16, 130]


@pytest.mark.parametrize("num_kv_splits", [None, 1, 4])
@pytest.mark.parametrize("head_index", [0, 1])
def test_mla_decode_matches_reference(
    device: torch.device, head_index: int, num_kv_splits: int | None
) -> None:
    num_heads = heads_for(device)[head_index]
    shape, pool, q, seq_lens = mla_inputs(device, num_heads)
    args = mla_args(shape, pool, q, seq_lens)

    out = mla_decode_attention(*args, max_seq_len=max(seq_lens), num_kv_splits=num_kv_splits)
    assert out.shape == (len(seq_lens), num_heads, shape.v_dim) and out.dtype == q.dtype
    torch.testing.assert_close(out, mla_decode_attention_ref(*args), atol=shape.atol, rtol=shape.atol)


@pytest.mark.parametrize(
    "config",
    [MLADecodeConfig(block_h=16, block_n=16), MLADecodeConfig(block_h=32, block_n=32, heads_on_n=True)],
    ids=["heads-on-m", "heads-on-n"],
)
def test_mla_decode_tilings(device: torch.device, config: MLADecodeConfig) -> None:
    """Both product orientations, a head block wider than the heads, several key blocks a split."""
    shape, pool, q, seq_lens = mla_inputs(device, 20, seed=2)
    args = mla_args(shape, pool, q, seq_lens)

    out = mla_decode_attention(*args, num_kv_splits=3, config=config)
    torch.testing.assert_close(out, mla_decode_attention_ref(*args), atol=shape.atol, rtol=shape.atol)


@pytest.mark.parametrize("rope_dim", [8, 24])
def test_mla_decode_pads_a_narrow_or_ragged_rope_part(device: torch.device, rope_dim: int) -> None:
    """Rope parts under 16 columns or not a power of two (tiny test models) are padded, masked."""
    shape, pool, q, seq_lens = mla_inputs(device, 20, seed=3, rope_dim=rope_dim)
    args = mla_args(shape, pool, q, seq_lens)

    out = mla_decode_attention(*args, num_kv_splits=2)
    torch.testing.assert_close(out, mla_decode_attention_ref(*args), atol=shape.atol, rtol=shape.atol)


def test_mla_decode_graph_plan_from_bounds(device: torch.device) -> None:
    """A CUDA-graph call: split count and max_seq_len planned from a bound far over the batch's
    lengths (most splits of the short requests are empty), int32 indices, q a strided view."""
    shape = mla_shape(device)
    seq_lens = decode_lens(device, shape.max_len)
    pool = make_latent_pool(seq_lens, 1, shape.latent_dim, shape.dtype, device, seed=4)
    num_heads = heads_for(device)[1]
    q_full = torch.randn((len(seq_lens), num_heads + 3, shape.latent_dim), device=device).to(shape.dtype)
    q = q_full[:, 3:]
    bound = 4 * shape.max_len
    splits = choose_mla_kv_splits(bound, len(seq_lens), num_heads)
    assert splits > 1
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    args = (q, pool.kv_buffer, pool.req_to_token.int(), pool.req_rows.int(), lens, 0.3, shape.v_dim)

    out = mla_decode_attention(*args, max_seq_len=bound, num_kv_splits=max(splits, 8))
    torch.testing.assert_close(out, mla_decode_attention_ref(*args), atol=shape.atol, rtol=shape.atol)


def test_mla_decode_reads_an_fp8_pool(device: torch.device) -> None:
    """float8_e4m3fn latents (including saturated ones) against the reference on the same pool."""
    shape = mla_shape(device)
    seq_lens = decode_lens(device, shape.max_len)
    pool = make_latent_pool(seq_lens, 16, shape.latent_dim, FP8, device, seed=5, scale=200.0)
    assert pool.kv_buffer.float().abs().nan_to_num().max() == FP8_E4M3_MAX
    num_heads = heads_for(device)[1]
    q = (torch.randn((len(seq_lens), num_heads, shape.latent_dim), device=device) / 200).to(shape.dtype)
    args = mla_args(shape, pool, q, seq_lens)

    out = mla_decode_attention(*args, num_kv_splits=3)
    assert out.dtype == q.dtype
    expect = mla_decode_attention_ref(*args)
    # The values are up to 448: compare on the scale of the inputs' noise.
    torch.testing.assert_close(out / 200, expect / 200, atol=shape.atol, rtol=shape.atol)


def test_mla_reference_is_decode_attention_over_the_latent() -> None:
    """The MLA reference against the MHA one with k = the latent, v = its first v_dim columns."""
    seq_lens = [1, 9, 30]
    pool = make_latent_pool(seq_lens, 4, 48, torch.float32, torch.device("cpu"), seed=6)
    q = torch.randn((3, 8, 48))
    lens = torch.tensor(seq_lens)
    mla = mla_decode_attention_ref(q, pool.kv_buffer, pool.req_to_token, pool.req_rows, lens, 0.2, 32)
    mha = decode_attention_ref(
        q, pool.kv_buffer, pool.kv_buffer[..., :32], pool.req_to_token, pool.req_rows, lens, 0.2
    )
    torch.testing.assert_close(mla, mha, atol=1e-5, rtol=1e-5)


def _mla_call(device: torch.device, **overrides: Any) -> torch.Tensor:
    args: dict[str, Any] = {
        "q": torch.randn(2, 4, 48, device=device),
        "kv_buffer": torch.randn(32, 1, 48, device=device),
        "req_to_token": torch.arange(32, device=device).view(2, 16),
        "req_rows": torch.tensor([1, 0], device=device),
        "seq_lens": torch.tensor([5, 16], device=device),
        "scaling": 0.25,
        "v_dim": 32,
    }
    args.update(overrides)
    return mla_decode_attention(**args)


MLA_BAD_CALLS: list[tuple[str, dict[str, Any], str]] = [
    ("v_dim not a power of two", {"v_dim": 24}, "v_dim"),
    ("v_dim not a power of two, narrow rope", {"v_dim": 40}, "v_dim"),
    ("no rope columns", {"q": (2, 4, 32), "kv_buffer": (32, 1, 32)}, "no rope columns"),
    ("two latent heads", {"kv_buffer": (16, 2, 48)}, "one latent head"),
    ("latent dim mismatch", {"q": (2, 4, 64)}, "latent_dim"),
    ("q dtype != pool dtype", {"q": torch.float16}, "share a dtype"),
    ("batch mismatch", {"seq_lens": [5]}, "batch sizes disagree"),
    ("no splits", {"num_kv_splits": 0}, "num_kv_splits"),
    ("scaling 0", {"scaling": 0.0}, "scaling"),
    ("bad config", {"config": MLADecodeConfig(block_h=12)}, "block_h"),
]


@pytest.mark.parametrize(
    ("overrides", "message"), [c[1:] for c in MLA_BAD_CALLS], ids=[c[0] for c in MLA_BAD_CALLS]
)
def test_mla_decode_bad_arguments_raise_value_error(
    device: torch.device, overrides: dict[str, Any], message: str
) -> None:
    resolved: dict[str, Any] = {}
    for name, value in overrides.items():
        if isinstance(value, tuple):  # a shape
            resolved[name] = torch.randn(value, device=device)
        elif isinstance(value, torch.dtype):
            resolved[name] = torch.randn(2, 4, 48, device=device, dtype=value)
        elif isinstance(value, list):
            resolved[name] = torch.tensor(value, device=device)
        else:
            resolved[name] = value
    with pytest.raises(ValueError, match=message):
        _mla_call(device, **resolved)
    with reference_mode(), pytest.raises(ValueError, match=message):  # checked on both paths
        _mla_call(device, **resolved)


def test_mla_decode_reference_switch(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kernels.config.use_reference` routes the op to its reference: no kernel launched."""

    class _NoLaunch:
        def __getitem__(self, grid: object) -> None:
            raise AssertionError("kernel launched in reference mode")

    monkeypatch.setattr(kernels.mla_decode, "_mla_stage1_kernel", _NoLaunch())
    with reference_mode():
        assert _mla_call(device).shape == (2, 4, 32)


# ---- extend attention with values narrower than keys (MLA prefill) ----


@dataclass(frozen=True)
class ExtendCase:
    name: str
    num_kv_heads: int
    group: int
    k_dim: int
    v_dim: int
    latent: bool  # v is a column view of the key buffer (absorbed MLA); else a separate strided buffer

    def __str__(self) -> str:
        return self.name


def extend_cases(device: torch.device) -> list[ExtendCase]:
    if device.type == "cuda":
        return [
            ExtendCase("absorbed-576-512-h128", 1, 128, 576, 512, latent=True),
            ExtendCase("expanded-192-128", 16, 1, 192, 128, latent=False),
        ]
    return [
        ExtendCase("absorbed-48-32-h20", 1, 20, 48, 32, latent=True),
        ExtendCase("expanded-48-32", 2, 1, 48, 32, latent=False),
    ]


@pytest.mark.parametrize("index", [0, 1])
def test_extend_with_narrower_strided_values(device: torch.device, index: int) -> None:
    case = extend_cases(device)[index]
    s = setting(device)
    if device.type == "cpu":
        prefix_lens, extend_lens = [0, 40, 7], [1, 70, 9]
    else:
        prefix_lens, extend_lens = [0, 700, 129, 2000], [1, 300, 64, 700]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    pool = make_pool(seq_lens, 16, case.num_kv_heads, case.k_dim, s.dtype, device, seed=7)
    if case.latent:
        k_buffer, v_buffer = pool.k_buffer, pool.k_buffer[..., : case.v_dim]
    else:  # V of another width, every other row of a wider buffer
        wide = torch.randn((pool.k_buffer.shape[0], case.num_kv_heads, 2, case.v_dim), device=device)
        k_buffer, v_buffer = pool.k_buffer, wide.to(s.dtype)[:, :, 1]
    num_heads = case.num_kv_heads * case.group
    q = torch.randn((sum(extend_lens), num_heads, case.k_dim), device=device).to(s.dtype)
    as_tensor = lambda xs: torch.tensor(xs, device=device)
    args = (
        q,
        k_buffer,
        v_buffer,
        pool.req_to_token,
        pool.req_rows,
        as_tensor(prefix_lens),
        as_tensor(extend_lens),
        case.k_dim**-0.5,
    )

    out = extend_attention(*args)
    assert out.shape == (q.shape[0], num_heads, case.v_dim) and out.dtype == q.dtype
    torch.testing.assert_close(out, extend_attention_ref(*args), atol=s.atol, rtol=s.rtol)


# ---- FP8 KV pools: store, decode and extend ----


def fp8_pool_inputs(
    device: torch.device, seq_lens: list[int], head_dim: int, v_dim: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_buffer, v_buffer, req_to_token, req_rows) in float8_e4m3fn, values up to the saturation point."""
    s = setting(device)
    pool = make_pool(seq_lens, 16, s.num_kv_heads, head_dim, torch.float32, torch.device("cpu"), seed=seed)
    v = pool.v_buffer[..., :v_dim] * 100.0
    k = pool.k_buffer * 100.0
    return (
        to_kv_dtype_ref(k, FP8).to(device),
        to_kv_dtype_ref(v, FP8).to(device),
        pool.req_to_token.to(device),
        pool.req_rows.to(device),
    )


def test_store_kv_saturates_into_an_fp8_pool(device: torch.device) -> None:
    """Bit-exact against clamp(-448, 448).to(fp8): out-of-range values, ties, subnormals, NaN;
    k and v of different widths, v_buffer a column view."""
    num_tokens = 37 if device.type == "cpu" else 4096
    src_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    k = torch.randn((num_tokens, 2, 64), device=device) * torch.logspace(-4, 3, 64, device=device)
    k[0, 0, :8] = torch.tensor([1000.0, -1000.0, 448.0, -449.0, 2**-10, 3 * 2**-11, 464.0, float("nan")])
    v = torch.randn((num_tokens, 2, 32), device=device) * 300
    k, v = k.to(src_dtype), v.to(src_dtype)
    k_buffer = torch.zeros((num_tokens + 9, 2, 64), dtype=FP8, device=device)
    v_buffer = torch.zeros((num_tokens + 9, 2, 48), dtype=FP8, device=device)[..., 8:40]
    slots = torch.randperm(num_tokens + 9, device=device)[:num_tokens].int()
    expect_k, expect_v = k_buffer.clone(), v_buffer.clone()
    store_kv_ref(k, v, expect_k, expect_v, slots)

    store_kv(k, v, k_buffer, v_buffer, slots)
    assert torch.equal(k_buffer.view(torch.uint8), expect_k.view(torch.uint8))
    assert torch.equal(v_buffer.view(torch.uint8), expect_v.view(torch.uint8))


@pytest.mark.parametrize("pool_dtype", [torch.float32, FP8], ids=["float32", "fp8"])
@pytest.mark.parametrize("with_rope", [True, False], ids=["parts", "whole"])
def test_store_latent(device: torch.device, pool_dtype: torch.dtype, with_rope: bool) -> None:
    """The latent as [c | k_rope] from two strided inputs, or whole."""
    num_tokens = 11
    shape = mla_shape(device)
    proj = torch.randn((num_tokens, shape.latent_dim + 8), device=device) * 200  # a fused projection
    latent: torch.Tensor = proj[:, : shape.v_dim]
    k_rope: torch.Tensor | None = proj[:, shape.v_dim + 8 :]
    if not with_rope:
        latent, k_rope = proj[:, 8:], None
    kv_buffer = torch.zeros((20, 1, shape.latent_dim), device=device).to(pool_dtype)
    slots = torch.randperm(20, device=device)[:num_tokens]
    expect = kv_buffer.clone()
    store_latent_ref(latent, expect, slots, k_rope)

    store_latent(latent, kv_buffer, slots, k_rope)
    assert torch.equal(kv_buffer.view(torch.uint8), expect.view(torch.uint8))
    assert kv_buffer.float().abs().max() <= FP8_E4M3_MAX or pool_dtype != FP8


def test_decode_reads_an_fp8_pool(device: torch.device) -> None:
    s = setting(device)
    seq_lens = [1, 64, s.max_len, 65] if device.type == "cpu" else [1, 700, s.max_len, 2048]
    k_buffer, v_buffer, req_to_token, req_rows = fp8_pool_inputs(device, seq_lens, 64, 64, seed=8)
    q = (torch.randn((len(seq_lens), 2 * s.num_kv_heads, 64), device=device) / 100).to(s.dtype)
    lens = torch.tensor(seq_lens, device=device)
    args = (q, k_buffer, v_buffer, req_to_token, req_rows, lens, 0.125)

    out = decode_attention(*args, num_kv_splits=3)
    assert out.dtype == q.dtype
    torch.testing.assert_close(out, decode_attention_ref(*args), atol=s.atol * 100, rtol=s.rtol)


def test_extend_reads_an_fp8_pool_with_narrower_values(device: torch.device) -> None:
    s = setting(device)
    if device.type == "cpu":
        prefix_lens, extend_lens = [0, 40], [9, 70]
    else:
        prefix_lens, extend_lens = [0, 700, 2000], [64, 300, 1000]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    k_buffer, v_buffer, req_to_token, req_rows = fp8_pool_inputs(device, seq_lens, 80, 64, seed=9)
    q = (torch.randn((sum(extend_lens), 2 * s.num_kv_heads, 80), device=device) / 100).to(s.dtype)
    as_tensor = lambda xs: torch.tensor(xs, device=device)
    args = (
        q,
        k_buffer,
        v_buffer,
        req_to_token,
        req_rows,
        as_tensor(prefix_lens),
        as_tensor(extend_lens),
        0.1,
    )

    out = extend_attention(*args, sliding_window=50)
    assert out.shape == (q.shape[0], q.shape[1], 64)
    torch.testing.assert_close(
        out, extend_attention_ref(*args, sliding_window=50), atol=s.atol * 100, rtol=s.rtol
    )
