"""Who holds which KV slots: the radix cache, running requests, and the free page list.

Every usable page is in exactly one of three states, which gives the invariant checked after
every step in debug mode (and in tests):

    free (allocator) + evictable (tree, unlocked) + locked (tree, locked + requests' private) == total

Requests lock their cached prefix through its tree node and own their private pages whole
(see `shared/scheduler/request.py` for the layout). Allocation evicts unlocked tree leaves (LRU)
before it gives up; giving up leaves nothing half-allocated.

The allocator and the radix tree keep slot ids on the CPU (they are scheduler metadata), and
so does the scheduler's view of req_to_token (`ReqToTokenPool.host`; the device copy is
brought up to date once per step), so scheduling never waits for the device.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from shared.mem import MatchResult, PageAllocator, RadixCache, ReqToTokenPool
from shared.scheduler.request import Req


class KVCacheManager:
    def __init__(self, allocator: PageAllocator, req_pool: ReqToTokenPool, cache: RadixCache | None) -> None:
        self.allocator = allocator
        self.req_pool = req_pool
        self.cache = cache
        self.page_size = allocator.page_size

    # ---- queries -------------------------------------------------------------------------------

    def match(self, req: Req) -> MatchResult | None:
        """The cached prefix of a waiting request; the last token is always left to compute."""
        if self.cache is None:
            return None
        return self.cache.match_prefix(req.all_ids[: req.seq_len - 1])

    def private_pages(self, req: Req) -> int:
        return self.allocator.pages_needed(0, req.kv_len - req.cached_len)

    def pages_to_grow(self, req: Req, n: int) -> int:
        return self.allocator.pages_needed(req.kv_len - req.cached_len, n)

    def ensure_free_pages(self, n: int) -> bool:
        """Evict unlocked cache leaves until n pages are free; False if that is impossible."""
        short = n - self.allocator.num_free_pages()
        if short > 0 and self.cache is not None:
            self.cache.evict(short * self.page_size)
        return self.allocator.num_free_pages() >= n

    # ---- allocation ----------------------------------------------------------------------------

    def admit(
        self, req: Req, match: MatchResult | None, n: int, reserve_pages: int = 0
    ) -> torch.Tensor | None:
        """Give a waiting request a row, lock its cached prefix and slots for its first n tokens.

        `reserve_pages` stay free for others (the running requests' next decode step).
        Returns the new slots, or None with nothing held.
        """
        assert req.row is None
        row = self.req_pool.alloc()
        if row is None:
            return None
        prefix = match.slots if match is not None else torch.empty(0, dtype=torch.int64)
        if match is not None and self.cache is not None:
            self.cache.inc_lock_ref(match.node)  # before evicting: our own prefix must stay
        req.row, req.cached_len, req.kv_len, req.last_slot = row, len(prefix), len(prefix), None
        req.last_node = match.node if match is not None else None
        self.req_pool.write(row, 0, prefix)
        slots = self.extend(req, n, reserve_pages)
        if slots is None:
            self.release(req, cache_kv=False)
            return None
        if req.cached_tokens is None:
            req.cached_tokens = min(len(prefix), len(req.prompt_ids))
        return slots

    def extend(self, req: Req, n: int, reserve_pages: int = 0) -> torch.Tensor | None:
        """Slots for the next n tokens of a running request (their K/V is computed this step)."""
        assert req.row is not None
        private_len = req.kv_len - req.cached_len
        if not self.ensure_free_pages(self.pages_to_grow(req, n) + reserve_pages):
            return None
        slots = self.allocator.alloc_slots(req.last_slot if private_len else None, private_len, n)
        assert slots is not None  # ensure_free_pages made room
        self.req_pool.write(req.row, req.kv_len, slots)
        req.kv_len += n
        req.last_slot = int(slots[-1])
        return slots

    def extend_one(self, req: Req) -> int:
        """The slot of a running request's next token, as `extend(req, 1)` but without tensors.
        The caller has made sure a free page exists when the request needs a new one."""
        assert req.row is not None
        if (req.kv_len - req.cached_len) % self.page_size:
            assert req.last_slot is not None
            slot = req.last_slot + 1  # the rest of its last page
        else:
            page = self.allocator.alloc_page()
            assert page is not None  # ensured by the caller
            slot = page * self.page_size
        self.req_pool.write_one(req.row, req.kv_len, slot)
        req.kv_len += 1
        req.last_slot = slot
        return slot

    # ---- handing KV to the cache ---------------------------------------------------------------

    def cache_unfinished(self, req: Req) -> None:
        """Share the computed page-aligned prefix of a running request through the radix cache.

        Chunked prefill and n > 1 siblings then find it; pages that another request inserted
        first replace ours, and ours go back to the free list.
        """
        if self.cache is None or req.row is None:
            return
        aligned = self._insert(req)
        if aligned <= req.cached_len:
            return
        match = self.cache.match_prefix(req.all_ids[:aligned])
        assert len(match.slots) == aligned
        self.req_pool.write(req.row, req.cached_len, match.slots[req.cached_len :])
        self.cache.inc_lock_ref(match.node)
        if req.last_node is not None:
            self.cache.dec_lock_ref(req.last_node)
        req.last_node, req.cached_len = match.node, aligned

    def release(self, req: Req, cache_kv: bool = True) -> None:
        """Return everything a request holds: its KV goes to the cache (or the free list) and its row."""
        if req.row is None:
            return
        start = req.cached_len
        if cache_kv and self.cache is not None:
            start = max(start, self._insert(req))
        if req.kv_len > start:
            self.allocator.free_slots(self.req_pool.read(req.row, start, req.kv_len).clone())
        if req.last_node is not None and self.cache is not None:
            self.cache.dec_lock_ref(req.last_node)
        self.req_pool.free(req.row)
        req.row, req.kv_len, req.cached_len, req.last_node, req.last_slot = None, 0, 0, None, None

    def _insert(self, req: Req) -> int:
        """Insert the page-aligned computed prefix; free our duplicates. Returns the aligned length."""
        assert self.cache is not None and req.row is not None
        aligned = req.kv_len // self.page_size * self.page_size
        if aligned <= req.cached_len:
            return req.cached_len
        slots = self.req_pool.read(req.row, 0, aligned).clone()
        existed = self.cache.insert(req.all_ids[:aligned], slots)
        if existed > req.cached_len:
            # The tree already held [cached_len, existed) in other pages: ours are redundant.
            self.allocator.free_slots(slots[req.cached_len : existed])
        return aligned

    # ---- invariant -----------------------------------------------------------------------------

    def check_invariant(self, running: Iterable[Req]) -> None:
        running = list(running)
        private = sum(self.private_pages(r) for r in running) * self.page_size
        evictable = self.cache.evictable_size() if self.cache is not None else 0
        locked = self.cache.protected_size() if self.cache is not None else 0
        free = self.allocator.num_free_slots()
        total = self.allocator.num_slots
        if free + evictable + locked + private != total:
            raise AssertionError(
                f"KV accounting broken: free {free} + evictable {evictable} + locked {locked}"
                f" + private {private} != total {total}"
            )
        if self.req_pool.num_free() + len(running) != self.req_pool.req_to_token.shape[0]:
            raise AssertionError("req_to_token rows leaked")

    def usage(self) -> tuple[int, int, int, int]:
        """(free, evictable, locked-in-tree, total) in token slots."""
        evictable = self.cache.evictable_size() if self.cache is not None else 0
        locked = self.cache.protected_size() if self.cache is not None else 0
        return self.allocator.num_free_slots(), evictable, locked, self.allocator.num_slots
