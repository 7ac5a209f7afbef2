"""Unit tests for the KV memory layer: allocator, KV pool, req->token table, radix cache."""

from __future__ import annotations

import random

import pytest
import torch

from shared.mem import MHAKVPool, MLAKVPool, PageAllocator, RadixCache, ReqToTokenPool, TreeNode
from shared.mem.kv_pool import FP8_E4M3_MAX
from shared.transfer.pages import page_runs


def page_slots(alloc: PageAllocator, n: int) -> torch.Tensor:
    """Fresh private slots for an n-token sequence (as a request would get them)."""
    slots = alloc.alloc_slots(None, 0, n)
    assert slots is not None
    return slots


def walk_sizes(cache: RadixCache) -> tuple[int, int]:
    """(evictable, protected) recomputed by a full tree walk, independent of the counters."""
    evictable = protected = 0
    stack = list(cache.root.children.values())
    while stack:
        node = stack.pop()
        if node.lock_ref > 0:
            protected += len(node.key)
        else:
            evictable += len(node.key)
        stack.extend(node.children.values())
    return evictable, protected


def assert_counters(cache: RadixCache) -> None:
    assert (cache.evictable_size(), cache.protected_size()) == walk_sizes(cache)
    cache.check_invariants()


# ---- PageAllocator ------------------------------------------------------------------------


def test_allocator_sizes() -> None:
    alloc = PageAllocator(num_pages=10, page_size=4)
    assert alloc.num_slots == 40
    assert alloc.pool_slots == 44
    assert alloc.num_free_pages() == 10
    assert alloc.num_free_slots() == 40


def test_allocator_never_hands_out_page_zero_and_pages_are_distinct() -> None:
    alloc = PageAllocator(num_pages=8, page_size=2)
    pages = alloc.alloc(8)
    assert pages is not None and pages.dtype == torch.int64
    assert sorted(pages.tolist()) == list(range(1, 9))
    assert alloc.num_free_pages() == 0


def test_allocator_exhaustion_returns_none_and_allocates_nothing() -> None:
    alloc = PageAllocator(num_pages=5, page_size=4)
    first = alloc.alloc(3)
    assert first is not None
    assert not alloc.can_alloc(3)
    assert alloc.alloc(3) is None
    assert alloc.num_free_pages() == 2  # the failed call took nothing
    assert alloc.alloc_slots(None, 0, 9) is None  # needs 3 pages
    assert alloc.num_free_pages() == 2
    assert alloc.can_alloc(2)
    rest = alloc.alloc(2)
    assert rest is not None and alloc.num_free_pages() == 0
    assert set(first.tolist()).isdisjoint(rest.tolist())


def test_allocator_free_and_reuse() -> None:
    alloc = PageAllocator(num_pages=4, page_size=1)
    pages = alloc.alloc(4)
    assert pages is not None
    alloc.free(pages[1:3])
    assert alloc.num_free_pages() == 2
    again = alloc.alloc(2)
    assert again is not None
    assert sorted(again.tolist()) == sorted(pages[1:3].tolist())
    assert alloc.alloc(1) is None


def test_allocator_takes_runs_from_the_bottom_and_single_pages_from_the_top() -> None:
    alloc = PageAllocator(num_pages=10, page_size=4)
    assert alloc.alloc(3).tolist() == [1, 2, 3]  # type: ignore[union-attr]
    assert alloc.alloc_page() == 10
    assert alloc.alloc(1).tolist() == [9]  # type: ignore[union-attr]
    alloc.free(torch.tensor([2]))
    assert alloc.alloc(2).tolist() == [2, 4]  # type: ignore[union-attr]  # the lowest free ids
    alloc.free(torch.tensor([9, 10]))
    assert alloc.alloc_page() == 10
    assert alloc.num_free_pages() == 5


def test_a_prompts_pages_stay_consecutive_under_decode_churn() -> None:
    """A decode engine's life: reservations of whole prompts, one page at a time as requests
    grow (interleaved across them), everything freed at the end. A reservation comes out as one
    run of consecutive pages, which the KV hand-off writes as one descriptor per buffer (a
    first-in-first-out free list gave one run per page here)."""
    alloc = PageAllocator(num_pages=1200, page_size=16)
    rng = random.Random(0)
    live: dict[int, tuple[list[int], list[int]]] = {}  # request -> (prompt pages, grown pages)
    left: dict[int, int] = {}  # request -> tokens still to decode
    runs = []
    admitted = 0
    for _ in range(3000):
        while len(live) < 16 and alloc.can_alloc(64 + 16):
            pages = alloc.alloc(64)
            assert pages is not None
            runs.append(len(page_runs(pages.tolist())))
            live[admitted], left[admitted] = (pages.tolist(), []), rng.randint(32, 256)
            admitted += 1
        for rid in list(live):
            left[rid] -= 1
            if left[rid] % 16 == 0:
                page = alloc.alloc_page()
                assert page is not None
                live[rid][1].append(page)
            if left[rid] <= 0:
                prompt, grown = live.pop(rid)
                alloc.free(torch.tensor(prompt + grown))
    assert len(runs) > 200 and max(runs) == 1
    for pages in live.values():
        alloc.free(torch.tensor(pages[0] + pages[1]))
    assert alloc.num_free_pages() == 1200
    assert sorted(alloc.alloc(1200).tolist()) == list(range(1, 1201))  # type: ignore[union-attr]


def test_allocator_double_free_raises_and_leaves_free_list_intact() -> None:
    alloc = PageAllocator(num_pages=4, page_size=4)
    pages = alloc.alloc(2)
    assert pages is not None
    alloc.free(pages[:1])
    with pytest.raises(AssertionError):
        alloc.free(pages)  # pages[0] is already free
    assert alloc.num_free_pages() == 3  # pages[1] was not freed by the failed call
    with pytest.raises(AssertionError):
        alloc.free(torch.tensor([0]))
    with pytest.raises(AssertionError):
        alloc.free(torch.tensor([pages[1].item(), pages[1].item()]))
    alloc.free(pages[1:])
    assert alloc.num_free_pages() == 4


def test_allocator_reset() -> None:
    alloc = PageAllocator(num_pages=3, page_size=2)
    assert alloc.alloc(3) is not None
    alloc.reset()
    assert alloc.num_free_pages() == 3
    assert alloc.alloc(3) is not None


@pytest.mark.parametrize(
    ("page_size", "cur_len", "n", "expected"),
    [(1, 0, 3, 3), (1, 5, 2, 2), (4, 0, 0, 0), (4, 0, 1, 1), (4, 3, 1, 0), (4, 4, 1, 1),
     (4, 5, 7, 1), (4, 5, 8, 2), (16, 10, 6, 0), (16, 10, 7, 1), (16, 0, 33, 3)],
)  # fmt: skip
def test_pages_needed(page_size: int, cur_len: int, n: int, expected: int) -> None:
    assert PageAllocator(8, page_size).pages_needed(cur_len, n) == expected


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_alloc_slots_fills_partial_page_then_new_pages(page_size: int) -> None:
    alloc = PageAllocator(num_pages=8, page_size=page_size)
    # Grow one sequence in uneven steps and check the slots are exactly what a flat layout gives.
    steps = [1, page_size + 1, 2, 3 * page_size - 1, 1]
    seq: list[int] = []
    for n in steps:
        last = seq[-1] if seq else None
        before = alloc.num_free_pages()
        new = alloc.alloc_slots(last, len(seq), n)
        assert new is not None and new.dtype == torch.int64 and new.shape == (n,)
        assert before - alloc.num_free_pages() == alloc.pages_needed(len(seq), n)
        seq.extend(new.tolist())
    # token i sits at offset i % page_size of its page, and pages are whole and distinct
    assert all(s % page_size == i % page_size for i, s in enumerate(seq))
    assert len(set(seq)) == len(seq)
    pages = [s // page_size for s in seq]
    for i in range(0, len(seq), page_size):
        assert len(set(pages[i : i + page_size])) == 1
    assert len(set(pages)) == -(-len(seq) // page_size)
    assert 0 not in pages
    alloc.free_slots(torch.tensor(seq))
    assert alloc.num_free_pages() == 8


def test_alloc_slots_partial_page_needs_no_new_page() -> None:
    alloc = PageAllocator(num_pages=1, page_size=4)
    first = alloc.alloc_slots(None, 0, 2)
    assert first is not None and alloc.num_free_pages() == 0
    more = alloc.alloc_slots(int(first[-1]), 2, 2)  # fits in the page already held
    assert more is not None
    assert more.tolist() == [int(first[-1]) + 1, int(first[-1]) + 2]
    assert alloc.alloc_slots(int(more[-1]), 4, 1) is None


def test_free_slots_frees_each_page_once() -> None:
    alloc = PageAllocator(num_pages=6, page_size=4)
    slots = page_slots(alloc, 10)  # 3 pages, the last one partial
    assert alloc.num_free_pages() == 3
    alloc.free_slots(slots)
    assert alloc.num_free_pages() == 6
    with pytest.raises(AssertionError):
        alloc.free_slots(slots)


def test_allocator_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        PageAllocator(num_pages=4, page_size=0)
    with pytest.raises(ValueError):
        PageAllocator(num_pages=-1, page_size=4)


# ---- MHAKVPool -------------------------------------------------------------------------------


def test_kv_pool_set_get_round_trip_and_casts() -> None:
    pool = MHAKVPool(
        num_slots=16, num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.bfloat16, device="cpu"
    )
    assert pool.k_buffers[0].shape == (16, 2, 4)
    assert pool.k_buffers[1].dtype == torch.bfloat16
    slots = torch.tensor([3, 7, 11])
    k = torch.randn(3, 2, 4, dtype=torch.float32)
    v = torch.randn(3, 2, 4, dtype=torch.float32)
    pool.set_kv(1, slots, k, v)
    k_buf, v_buf = pool.get_kv(1)
    torch.testing.assert_close(k_buf[slots], k.to(torch.bfloat16))
    torch.testing.assert_close(v_buf[slots], v.to(torch.bfloat16))
    # other layer and other slots untouched
    assert pool.get_kv(0)[0].abs().sum() == 0
    assert k_buf[[0, 1, 2, 4]].abs().sum() == 0
    # get_kv hands out the live buffers, not copies
    assert k_buf.data_ptr() == pool.k_buffers[1].data_ptr()


def test_kv_pool_copy_slots_all_layers() -> None:
    pool = MHAKVPool(num_slots=8, num_layers=3, num_kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    for layer in range(3):
        vals = torch.arange(8, dtype=torch.float32)[:, None, None].expand(8, 1, 2) + 100 * layer
        pool.set_kv(layer, torch.arange(8), vals, -vals)
    # overlapping src/dst: dst must get the old src values
    pool.copy_slots(torch.tensor([1, 2]), torch.tensor([2, 5]))
    for layer in range(3):
        k, v = pool.get_kv(layer)
        assert k[:, 0, 0].tolist() == [x + 100 * layer for x in [0, 1, 1, 3, 4, 2, 6, 7]]
        assert v[:, 0, 1].tolist() == [-(x + 100 * layer) for x in [0, 1, 1, 3, 4, 2, 6, 7]]


def test_kv_pool_bytes() -> None:
    pool = MHAKVPool(
        num_slots=10, num_layers=4, num_kv_heads=8, head_dim=128, dtype=torch.float16, device="cpu"
    )
    assert pool.bytes_per_token() == 2 * 4 * 8 * 128 * 2
    assert pool.total_bytes() == 10 * pool.bytes_per_token()
    measured = sum(b.numel() * b.element_size() for b in pool.k_buffers + pool.v_buffers)
    assert pool.total_bytes() == measured


# ---- MLAKVPool and FP8 storage ----------------------------------------------------------------


def test_mla_pool_layout_round_trip_and_bytes() -> None:
    pool = MLAKVPool(
        num_slots=12, num_layers=3, kv_lora_rank=32, rope_dim=8, dtype=torch.bfloat16, device="cpu"
    )
    buffers = pool.buffers()
    # one buffer per layer, one latent "head" per token: what the KV transfer moves
    assert len(buffers) == 3 and all(b.shape == (12, 1, 40) and b.dtype == torch.bfloat16 for b in buffers)
    assert pool.bytes_per_token() == 3 * 40 * 2
    assert pool.total_bytes() == sum(b.numel() * b.element_size() for b in buffers)
    slots = torch.tensor([2, 9])
    latent = torch.randn(2, 40)
    pool.set_latent(1, slots, latent)
    assert pool.get_latent(1).data_ptr() == buffers[1].data_ptr()  # the live buffer
    torch.testing.assert_close(pool.get_latent(1)[slots, 0], latent.to(torch.bfloat16))
    assert pool.get_latent(0).abs().sum() == 0 and pool.get_latent(1)[[0, 1, 3]].abs().sum() == 0
    pool.copy_slots(torch.tensor([2]), torch.tensor([5]))
    assert torch.equal(pool.get_latent(1)[5], pool.get_latent(1)[2])


def test_pools_on_the_meta_device_allocate_nothing_and_size_like_real_ones() -> None:
    # The model runner sizes its pool from a one-slot meta pool's bytes_per_token.
    meta = MLAKVPool(1, 61, 512, 64, torch.bfloat16, "meta")
    assert meta.bytes_per_token() == MLAKVPool(1, 61, 512, 64, torch.bfloat16, "cpu").bytes_per_token()
    assert meta.bytes_per_token() == 61 * 576 * 2  # DeepSeek-V3: 70 KiB per token


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_fp8_storage_clamps_casts_and_reads_back(kind: str) -> None:
    fp8 = torch.float8_e4m3fn
    values = torch.tensor([0.0, 1.0, -3.3, 0.0123, 447.0, 1000.0, -5000.0, 250.5])  # [8]
    slots = torch.arange(8)
    if kind == "mla":
        pool = MLAKVPool(8, 1, kv_lora_rank=1, rope_dim=1, dtype=fp8, device="cpu")
        pool.set_latent(0, slots, values[:, None].expand(8, 2))
        back = pool.get_latent(0)[:, 0, 0].float()
        assert pool.bytes_per_token() == 2
    else:
        mha = MHAKVPool(8, 1, num_kv_heads=1, head_dim=1, dtype=fp8, device="cpu")
        mha.set_kv(0, slots, values[:, None, None], -values[:, None, None])
        back = mha.get_kv(0)[0][:, 0, 0].float()
        assert torch.equal(mha.get_kv(0)[1][:, 0, 0].float(), -back)
        assert mha.bytes_per_token() == 2
    clamped = values.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    assert torch.isfinite(back).all()
    assert back[5] == FP8_E4M3_MAX and back[6] == -FP8_E4M3_MAX  # saturated, not NaN
    # E4M3 keeps 3 mantissa bits: round-to-nearest is within 2^-4 relative (normal numbers),
    # and within half the smallest subnormal step (2^-10) near zero.
    assert ((back - clamped).abs() <= clamped.abs() * 2**-4 + 2**-10).all()


# ---- ReqToTokenPool --------------------------------------------------------------------------


def test_req_to_token_pool() -> None:
    pool = ReqToTokenPool(max_reqs=3, max_context_len=16, device="cpu")
    assert pool.req_to_token.shape == (3, 16) and pool.req_to_token.dtype == torch.int64
    assert pool.req_to_token.abs().sum() == 0
    rows = [pool.alloc(), pool.alloc(), pool.alloc()]
    assert sorted(r for r in rows if r is not None) == [0, 1, 2]
    assert pool.num_free() == 0
    assert pool.alloc() is None
    assert rows[1] is not None
    pool.free(rows[1])
    assert pool.num_free() == 1
    with pytest.raises(AssertionError):
        pool.free(rows[1])
    assert pool.alloc() == rows[1]
    pool.req_to_token[0, :4] = torch.tensor([5, 6, 7, 8])
    assert pool.req_to_token[0, :4].tolist() == [5, 6, 7, 8]


# ---- RadixCache -----------------------------------------------------------------------------


def make_cache(num_pages: int, page_size: int) -> tuple[PageAllocator, RadixCache]:
    alloc = PageAllocator(num_pages=num_pages, page_size=page_size)
    return alloc, RadixCache(alloc)


def test_radix_empty_match() -> None:
    _, cache = make_cache(8, 1)
    m = cache.match_prefix([1, 2, 3])
    assert m.slots.numel() == 0 and m.slots.dtype == torch.int64
    assert m.node is cache.root
    assert cache.total_size() == 0


def test_radix_insert_match_split_page_size_1() -> None:
    alloc, cache = make_cache(32, 1)
    a = page_slots(alloc, 5)
    assert cache.insert([1, 2, 3, 4, 5], a) == 0
    assert cache.evictable_size() == 5

    m = cache.match_prefix([1, 2, 3, 9])
    assert m.slots.tolist() == a[:3].tolist()
    assert len(m.node.key) == 3  # split at 3
    assert_counters(cache)
    # the full key is still there, now across two nodes
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).slots.tolist() == a.tolist()

    b = page_slots(alloc, 4)
    assert cache.insert([1, 2, 7, 8], b) == 2  # [1, 2] already held
    alloc.free_slots(b[:2])  # our duplicates of the tree's [1, 2]
    assert cache.match_prefix([1, 2, 7, 8]).slots.tolist() == a[:2].tolist() + b[2:].tolist()
    assert cache.total_size() == 7
    assert alloc.num_free_slots() + cache.total_size() == alloc.num_slots
    assert_counters(cache)


def test_radix_page_size_4_aligns_and_splits_on_page_boundaries() -> None:
    alloc, cache = make_cache(16, 4)
    toks = list(range(10))
    a = page_slots(alloc, 10)
    assert cache.insert(toks, a) == 0
    assert cache.total_size() == 8  # only the two whole pages are stored
    alloc.free_slots(a[8:])  # the partial page stays ours

    # diverging inside the second page -> match only the first page, split after 4 tokens
    m = cache.match_prefix([0, 1, 2, 3, 4, 5, 99, 7])
    assert m.slots.tolist() == a[:4].tolist()
    assert m.node.key == (0, 1, 2, 3)
    # a query shorter than one page matches nothing
    assert cache.match_prefix([0, 1, 2]).slots.numel() == 0
    # diverging in the first page matches nothing
    assert cache.match_prefix([0, 1, 9, 3, 4, 5, 6, 7]).node is cache.root

    b = page_slots(alloc, 8)
    assert cache.insert([0, 1, 2, 3, 4, 5, 99, 7], b) == 4
    alloc.free_slots(b[:4])
    for node in [cache.root, *cache.root.children.values()]:
        for child in node.children.values():
            assert len(child.key) % 4 == 0
    assert cache.match_prefix([0, 1, 2, 3, 4, 5, 99, 7, 8]).slots.tolist() == a[:4].tolist() + b[4:].tolist()
    assert cache.total_size() == 12
    assert alloc.num_free_slots() + cache.total_size() == alloc.num_slots
    assert_counters(cache)


def test_radix_insert_returns_already_present_length() -> None:
    alloc, cache = make_cache(16, 2)
    a = page_slots(alloc, 6)
    assert cache.insert([1, 2, 3, 4, 5, 6], a) == 0
    b = page_slots(alloc, 6)
    assert cache.insert([1, 2, 3, 4, 5, 6], b) == 6  # fully present: tree takes nothing
    alloc.free_slots(b)
    c = page_slots(alloc, 4)
    assert cache.insert([1, 2, 3, 4], c) == 4  # a prefix of a stored key
    alloc.free_slots(c)
    d = page_slots(alloc, 5)
    assert cache.insert([1, 2, 3, 9, 9], d) == 2  # shares one page; odd tail not stored
    alloc.free_slots(d[:2])
    alloc.free_slots(d[4:])
    assert cache.total_size() == 8
    assert alloc.num_free_slots() + cache.total_size() == alloc.num_slots


def test_radix_namespaces_are_isolated() -> None:
    alloc, cache = make_cache(16, 1)
    a = page_slots(alloc, 3)
    b = page_slots(alloc, 3)
    assert cache.insert([1, 2, 3], a, namespace="lora-a") == 0
    assert cache.match_prefix([1, 2, 3]).slots.numel() == 0
    assert cache.match_prefix([1, 2, 3], namespace="lora-b").slots.numel() == 0
    assert cache.insert([1, 2, 3], b, namespace=None) == 0
    assert cache.match_prefix([1, 2, 3], namespace="lora-a").slots.tolist() == a.tolist()
    assert cache.match_prefix([1, 2, 3]).slots.tolist() == b.tolist()
    assert cache.total_size() == 6
    assert cache.evict(100) == 6
    assert alloc.num_free_pages() == 16


def test_radix_lock_prevents_eviction_and_moves_counters() -> None:
    alloc, cache = make_cache(16, 1)
    cache.insert([1, 2, 3, 4], page_slots(alloc, 4))
    dup = page_slots(alloc, 4)
    assert cache.insert([1, 2, 5, 6], dup) == 2
    alloc.free_slots(dup[:2])
    assert_counters(cache)
    m = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock_ref(m.node)
    # [1, 2] (shared ancestor) and [3, 4] are protected; [5, 6] is evictable
    assert cache.protected_size() == 4 and cache.evictable_size() == 2
    assert_counters(cache)
    assert cache.evict(100) == 2
    assert cache.match_prefix([1, 2, 5, 6]).slots.numel() == 2
    assert cache.match_prefix([1, 2, 3, 4]).slots.numel() == 4
    cache.inc_lock_ref(m.node)  # locks nest
    cache.dec_lock_ref(m.node)
    assert cache.evict(100) == 0
    cache.dec_lock_ref(m.node)
    assert cache.protected_size() == 0 and cache.evictable_size() == 4
    assert_counters(cache)
    with pytest.raises(AssertionError):
        cache.dec_lock_ref(m.node)
    assert cache.evict(100) == 4
    assert cache.total_size() == 0


def test_radix_evicts_least_recently_used_first() -> None:
    alloc, cache = make_cache(16, 1)
    for first in [1, 2, 3]:
        cache.insert([first, 0], page_slots(alloc, 2))
    cache.match_prefix([1, 0])  # 1 is now the most recently used; 2 the least
    assert cache.evict(1) == 2
    assert cache.match_prefix([2, 0]).slots.numel() == 0
    assert cache.match_prefix([3, 0]).slots.numel() == 2
    assert cache.match_prefix([1, 0]).slots.numel() == 2
    assert cache.evict(1) == 2
    assert cache.match_prefix([3, 0]).slots.numel() == 0  # 3 was older than 1's refresh
    assert cache.match_prefix([1, 0]).slots.numel() == 2


def test_radix_evicts_leaves_before_parents() -> None:
    alloc, cache = make_cache(16, 1)
    a = page_slots(alloc, 4)
    cache.insert([1, 2, 3, 4], a)
    b = page_slots(alloc, 4)
    cache.insert([1, 2, 7, 8], b)
    alloc.free_slots(b[:2])
    # The shared parent [1, 2] is older than neither leaf, but only leaves may go first.
    assert cache.evict(1) == 2
    assert cache.match_prefix([1, 2]).slots.numel() == 2
    assert cache.evict(3) == 4  # the other leaf, then the parent (now a leaf)
    assert cache.total_size() == 0
    assert alloc.num_free_pages() == 16


def test_radix_evict_frees_pages_to_allocator() -> None:
    alloc, cache = make_cache(8, 4)
    slots = page_slots(alloc, 16)
    cache.insert(list(range(16)), slots)
    assert alloc.num_free_pages() == 4
    assert cache.evict(1) == 16  # whole node
    assert alloc.num_free_pages() == 8
    assert cache.total_size() == 0
    assert cache.evict(1) == 0


def test_radix_split_of_locked_node_keeps_lock_accounting() -> None:
    alloc, cache = make_cache(16, 2)
    cache.insert([1, 2, 3, 4, 5, 6], page_slots(alloc, 6))
    m = cache.match_prefix([1, 2, 3, 4, 5, 6])
    cache.inc_lock_ref(m.node)
    assert cache.protected_size() == 6
    # splitting the locked node: both halves stay locked
    m2 = cache.match_prefix([1, 2, 3, 4, 9, 9])
    assert m2.node is not m.node and len(m2.node.key) == 4
    assert m2.node.lock_ref == 1 and m.node.lock_ref == 1
    assert_counters(cache)
    cache.dec_lock_ref(m.node)
    assert cache.protected_size() == 0 and cache.evictable_size() == 6
    assert_counters(cache)


def test_radix_reset_frees_everything_and_asserts_unlocked() -> None:
    alloc, cache = make_cache(8, 2)
    cache.insert([1, 2, 3, 4], page_slots(alloc, 4))
    cache.insert([5, 6], page_slots(alloc, 2))
    m = cache.match_prefix([5, 6])
    cache.inc_lock_ref(m.node)
    with pytest.raises(AssertionError):
        cache.reset()
    cache.dec_lock_ref(m.node)
    cache.reset()
    assert alloc.num_free_pages() == 8
    assert cache.total_size() == 0 and not cache.root.children


def test_radix_rejects_slots_that_are_not_whole_pages() -> None:
    alloc, cache = make_cache(8, 4)
    slots = page_slots(alloc, 8)
    with pytest.raises(AssertionError):
        cache.insert(list(range(8)), slots.flip(0))


def test_radix_pretty_mentions_nodes() -> None:
    alloc, cache = make_cache(8, 1)
    cache.insert([7, 8, 9], page_slots(alloc, 3), namespace="t1")
    text = cache.pretty()
    assert "'t1'" in text and "[7, 8, 9]" in text and "evictable=3" in text


def test_tree_node_is_exported() -> None:
    alloc, cache = make_cache(4, 1)
    cache.insert([1], page_slots(alloc, 1))
    assert isinstance(cache.match_prefix([1]).node, TreeNode)


def test_req_to_token_mirror_flushes_the_last_write_of_a_cell() -> None:
    # A device table behind a host mirror (a "meta"-free stand-in: a second CPU tensor) must end
    # up with the last value written to a cell, even when the cell was written twice in a step.
    pool = ReqToTokenPool(2, 8, "cpu")
    pool.req_to_token = torch.full((2, 8), -1, dtype=torch.int64)  # pretend the device copy is separate
    pool.write(0, 0, torch.tensor([1, 2, 3]))
    pool.write(0, 0, torch.tensor([7, 8, 9, 10]))  # the row was freed and reused
    assert pool.read(0, 0, 4).tolist() == [7, 8, 9, 10]
    assert pool.req_to_token[0, :4].tolist() == [-1, -1, -1, -1]  # nothing on the device yet
    pool.flush()
    assert pool.req_to_token[0, :4].tolist() == [7, 8, 9, 10]
