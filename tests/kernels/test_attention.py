"""Paged decode and extend attention and the KV store: Triton against the torch references, and
the references against a plain SDPA oracle built independently, query by query.

Pools are laid out as the engine lays them out: pages of `page_size` slots handed out in random
order (so a request's slots are not contiguous), page 0 left as the padding target, and request
rows picked at random. Page 0 holds huge K/V values and every unused req_to_token cell points at
it, so a kernel that reads one key too many is far off, not slightly off.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.kernel_bench import EXTEND_TILES, causal_flops
from kernels.decode_attention import choose_num_kv_splits, decode_attention, decode_attention_ref
from kernels.extend_attention import extend_attention, extend_attention_ref
from kernels.kv_store import store_kv, store_kv_ref

pytestmark = pytest.mark.kernels


@dataclass(frozen=True)
class Case:
    group: int  # query heads per KV head
    head_dim: int
    page_size: int
    window: int | None = None

    def __str__(self) -> str:
        return f"g{self.group}-d{self.head_dim}-p{self.page_size}-w{self.window}"


CASES = [
    Case(group=1, head_dim=64, page_size=1),
    Case(group=2, head_dim=128, page_size=16),
    Case(group=4, head_dim=64, page_size=16),
    Case(group=4, head_dim=64, page_size=1, window=24),
    Case(group=2, head_dim=80, page_size=16, window=40),  # head_dim not a power of two
]


@dataclass(frozen=True)
class Setting:
    dtype: torch.dtype
    atol: float
    rtol: float
    num_kv_heads: int
    max_len: int  # longest context drawn for a request


def setting(device: torch.device) -> Setting:
    if device.type == "cuda":
        return Setting(torch.bfloat16, atol=2e-2, rtol=2e-2, num_kv_heads=8, max_len=3000)
    # Small under the interpreter, which runs every program in Python.
    return Setting(torch.float32, atol=2e-5, rtol=2e-5, num_kv_heads=2, max_len=150)


@dataclass
class Pool:
    k_buffer: torch.Tensor  # [num_slots, Hkv, D]
    v_buffer: torch.Tensor
    req_to_token: torch.Tensor  # [rows, max_ctx] int64
    req_rows: torch.Tensor  # [B] int64


def make_pool(
    seq_lens: list[int],
    page_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> Pool:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    pages_per_req = [-(-n // page_size) for n in seq_lens]
    num_pages = 1 + sum(pages_per_req) + 3  # page 0 for padding, a few never handed out
    free_pages = list(range(1, num_pages))
    rng.shuffle(free_pages)
    num_rows = len(seq_lens) + 2
    req_to_token = torch.zeros((num_rows, max(seq_lens) + 5), dtype=torch.int64)  # unused -> page 0
    rows = rng.sample(range(num_rows), len(seq_lens))
    for row, seq_len, n_pages in zip(rows, seq_lens, pages_per_req):
        pages = torch.tensor([free_pages.pop() for _ in range(n_pages)])
        slots = (pages[:, None] * page_size + torch.arange(page_size)).flatten()
        req_to_token[row, :seq_len] = slots[:seq_len]
    num_slots = num_pages * page_size
    k_buffer = torch.randn((num_slots, num_kv_heads, head_dim), generator=gen)
    v_buffer = torch.randn((num_slots, num_kv_heads, head_dim), generator=gen)
    k_buffer[:page_size] = 8.0
    v_buffer[:page_size] = 100.0
    return Pool(
        k_buffer.to(device, dtype),
        v_buffer.to(device, dtype),
        req_to_token.to(device),
        torch.tensor(rows, device=device),
    )


def ragged_lens(device: torch.device, count: int, max_len: int, seed: int) -> list[int]:
    """Request lengths with the edge cases in: 1, a block boundary, the max, random others."""
    rng = random.Random(seed)
    fixed = [1, 64, max_len, 65]
    return (fixed + [rng.randrange(1, max_len + 1) for _ in range(count)])[:count]


def naive_attention(
    q: torch.Tensor,  # [Hq, D], one query
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    slots: torch.Tensor,  # [S] the slots of the keys it sees, in position order
    scaling: float,
) -> torch.Tensor:  # [Hq, D] float32
    keys = k_buffer[slots].float().transpose(0, 1)[None]  # [1, Hkv, S, D]
    values = v_buffer[slots].float().transpose(0, 1)[None]
    out = F.scaled_dot_product_attention(
        q.float()[None, :, None], keys, values, scale=scaling, enable_gqa=True
    )
    return out[0, :, 0]


def visible_slots(req_to_token: torch.Tensor, row: int, pos: int, window: int | None) -> torch.Tensor:
    first = 0 if window is None else max(0, pos - window + 1)
    return req_to_token[row, first : pos + 1]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_decode_matches_reference(device: torch.device, case: Case) -> None:
    s = setting(device)
    batch = 4 if device.type == "cpu" else 24
    seq_lens = ragged_lens(device, batch, s.max_len, seed=case.head_dim + case.group)
    pool = make_pool(seq_lens, case.page_size, s.num_kv_heads, case.head_dim, s.dtype, device)
    num_heads = s.num_kv_heads * case.group
    q = torch.randn((batch, num_heads, case.head_dim), device=device).to(s.dtype)
    lens = torch.tensor(seq_lens, device=device)
    scaling = case.head_dim**-0.5
    args = (q, pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.req_rows, lens, scaling, case.window)

    out = decode_attention(*args, max_seq_len=max(seq_lens))
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, decode_attention_ref(*args), atol=s.atol, rtol=s.rtol)


@pytest.mark.parametrize(
    ("num_kv_splits", "window"), [(None, None), (1, None), (3, 200), (16, None)], ids=str
)
def test_decode_split_k_over_a_long_context(
    device: torch.device, num_kv_splits: int | None, window: int | None
) -> None:
    """Several splits per request, empty ones included (16 splits of a 5-token context)."""
    s = setting(device)
    seq_lens = [700, 5, 300] if device.type == "cpu" else [16000, 5, 3000, 9000]
    if num_kv_splits is None:  # the default plan must split this batch, or the test proves nothing
        assert choose_num_kv_splits(max(seq_lens), len(seq_lens), s.num_kv_heads) > 1
    pool = make_pool(seq_lens, 16, s.num_kv_heads, 64, s.dtype, device, seed=3)
    q = torch.randn((len(seq_lens), 2 * s.num_kv_heads, 64), device=device).to(s.dtype)
    lens = torch.tensor(seq_lens, device=device)
    args = (q, pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.req_rows, lens, 0.125, window)

    out = decode_attention(*args, num_kv_splits=num_kv_splits)
    torch.testing.assert_close(out, decode_attention_ref(*args), atol=s.atol, rtol=s.rtol)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_extend_matches_reference(device: torch.device, case: Case) -> None:
    """Ragged batch: fresh prefills, chunks after cached prefixes, single tokens, >1 query block."""
    s = setting(device)
    if device.type == "cpu":
        prefix_lens, extend_lens = [0, 7, 40, 0, 100], [1, 30, 70, 9, 64]
    else:
        prefix_lens, extend_lens = [0, 700, 4000, 0, 129, 2048], [1, 300, 1000, 2000, 64, 512]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    pool = make_pool(seq_lens, case.page_size, s.num_kv_heads, case.head_dim, s.dtype, device, seed=1)
    q = torch.randn((sum(extend_lens), s.num_kv_heads * case.group, case.head_dim), device=device).to(s.dtype)
    as_tensor = lambda xs: torch.tensor(xs, device=device)
    args = (
        q,
        pool.k_buffer,
        pool.v_buffer,
        pool.req_to_token,
        pool.req_rows,
        as_tensor(prefix_lens),
        as_tensor(extend_lens),
        case.head_dim**-0.5,
        case.window,
    )

    out = extend_attention(*args)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, extend_attention_ref(*args), atol=s.atol, rtol=s.rtol)


@pytest.mark.parametrize("tile", EXTEND_TILES, ids=str)
@pytest.mark.parametrize("window", [None, 50], ids=str)
def test_extend_tiles_match_reference(
    device: torch.device, tile: tuple[int, int, int, int], window: int | None
) -> None:
    """Every tile shape the benchmark may pick: query blocks wider or narrower than key blocks
    (the unmasked blocks end where the diagonal starts), prefixes not a multiple of either."""
    s = setting(device)
    prefix_lens, extend_lens = [0, 70, 33], [150, 90, 1]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    pool = make_pool(seq_lens, 16, s.num_kv_heads, 64, s.dtype, device, seed=5)
    q = torch.randn((sum(extend_lens), s.num_kv_heads * 2, 64), device=device).to(s.dtype)
    as_tensor = lambda xs: torch.tensor(xs, device=device)
    args = (q, pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.req_rows)
    args += (as_tensor(prefix_lens), as_tensor(extend_lens), 0.125, window)

    out = extend_attention(*args, tile=tile)
    torch.testing.assert_close(out, extend_attention_ref(*args), atol=s.atol, rtol=s.rtol)


def test_extend_takes_int32_indices_strided_q_and_explicit_starts(device: torch.device) -> None:
    """q as a view into a fused qkv tensor, int32 index tensors, requests not packed in order."""
    s = setting(device)
    prefix_lens, extend_lens = [3, 0], [20, 11]
    pool = make_pool([23, 11], 4, 2, 64, s.dtype, device, seed=2)
    qkv = torch.randn((31, 4 + 2 * 2, 64), device=device).to(s.dtype)
    q = qkv[:, :4]  # [T, Hq, D], not contiguous
    as_i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)
    args = (
        q,
        pool.k_buffer,
        pool.v_buffer,
        pool.req_to_token.int(),
        pool.req_rows.int(),
        as_i32(prefix_lens),
        as_i32(extend_lens),
        0.125,
    )
    starts = as_i32([11, 0])  # the second request's tokens come first in q

    out = extend_attention(*args, extend_starts=starts, max_extend_len=20)
    torch.testing.assert_close(
        out, extend_attention_ref(*args, extend_starts=starts), atol=s.atol, rtol=s.rtol
    )


def test_kernel_bench_times_extend_against_a_base_copy(tmp_path: Path) -> None:
    """bench/kernel_bench.py --only extend end to end on the CPU (interpreter): the tree's kernel
    and a copy loaded from a file, torch's SDPA on the fresh prompts, the tile sweep."""
    root = Path(__file__).resolve().parents[2]
    base, out = tmp_path / "extend_base.py", tmp_path / "kernels.json"
    base.write_text((root / "kernels" / "extend_attention.py").read_text())
    cmd = [sys.executable, str(root / "bench" / "kernel_bench.py"), "--tiny", "--device", "cpu"]
    cmd += ["--only", "extend", "--extend-base", str(base), "--extend-sweep", "--json", str(out)]
    env = os.environ | {"TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh, chunk = json.loads(out.read_text())["extend"]
    assert (fresh["requests"], fresh["prefix"], fresh["new"]) == (2, 0, 40)
    assert fresh["flops"] == 2 * 4 * 64 * 4 * (40 * 41 / 2) == 2 * causal_flops(0, 40, 4, 64)
    assert chunk["flops"] == 4 * 64 * 4 * (50 * 30 + 50 * 51 / 2)
    for row in (fresh, chunk):
        assert min(row["tree_s"], row["base_s"], *row["sweep"].values()) > 0
        assert list(row["sweep"]) == [str(t) for t in EXTEND_TILES]
    assert fresh["sdpa_s"] > 0 and "sdpa_s" not in chunk  # SDPA only where no prefix is cached
    assert "tree/base time" in proc.stdout and "best (" in proc.stdout


@pytest.mark.parametrize("page_size", [1, 16])
def test_store_kv_writes_only_the_given_slots(device: torch.device, page_size: int) -> None:
    """Scattered int32 slots, k/v as strided views, cast to the pool's dtype on the way in."""
    pool_dtype = torch.float16 if device.type == "cpu" else torch.bfloat16
    num_tokens = 37 if device.type == "cpu" else 4096
    pool = make_pool([num_tokens], page_size, 2, 64, pool_dtype, device, seed=4)
    slots = pool.req_to_token[pool.req_rows[0], :num_tokens].int()
    kv = torch.randn((num_tokens, 3, 2, 64), device=device)  # [T, 3, Hkv, D] in float32
    k, v = kv[:, 0], kv[:, 2]
    expect_k, expect_v = pool.k_buffer.clone(), pool.v_buffer.clone()
    store_kv_ref(k, v, expect_k, expect_v, slots)

    store_kv(k, v, pool.k_buffer, pool.v_buffer, slots)
    assert torch.equal(pool.k_buffer, expect_k) and torch.equal(pool.v_buffer, expect_v)


@pytest.mark.parametrize("window", [None, 1, 6])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_references_match_naive_sdpa(group: int, window: int | None) -> None:
    """The references (pure torch, CPU) against SDPA called once per query over the keys it sees."""
    prefix_lens, extend_lens = [0, 9, 30], [12, 1, 5]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    pool = make_pool(seq_lens, 4, 2, 32, torch.float32, torch.device("cpu"), seed=5)
    q = torch.randn((sum(extend_lens), 2 * group, 32))
    scaling = 0.2
    extend = extend_attention_ref(
        q,
        pool.k_buffer,
        pool.v_buffer,
        pool.req_to_token,
        pool.req_rows,
        torch.tensor(prefix_lens),
        torch.tensor(extend_lens),
        scaling,
        window,
    )
    rows = pool.req_rows.tolist()
    t = 0
    for row, prefix_len, extend_len in zip(rows, prefix_lens, extend_lens):
        for pos in range(prefix_len, prefix_len + extend_len):
            slots = visible_slots(pool.req_to_token, row, pos, window)
            expect = naive_attention(q[t], pool.k_buffer, pool.v_buffer, slots, scaling)
            torch.testing.assert_close(extend[t], expect, atol=1e-5, rtol=1e-5)
            t += 1

    q_dec = torch.randn((len(seq_lens), 2 * group, 32))
    decode = decode_attention_ref(
        q_dec,
        pool.k_buffer,
        pool.v_buffer,
        pool.req_to_token,
        pool.req_rows,
        torch.tensor(seq_lens),
        scaling,
        window,
    )
    for b, (row, seq_len) in enumerate(zip(rows, seq_lens)):
        slots = visible_slots(pool.req_to_token, row, seq_len - 1, window)
        expect = naive_attention(q_dec[b], pool.k_buffer, pool.v_buffer, slots, scaling)
        torch.testing.assert_close(decode[b], expect, atol=1e-5, rtol=1e-5)
