"""The page allocator: the free list of KV pages.

KV memory is handed out in pages of `page_size` token slots. Token slot `s` lives in page
`s // page_size`, at offset `s % page_size`:

    page     0 (reserved)   1             2              ...   N = num_pages
    slots    [0, ps)        [ps, 2ps)     [2ps, 3ps)     ...   [N*ps, (N+1)*ps)

Page 0 is never handed out: padded batch entries (CUDA-graph padding, unused req_to_token cells,
which are zero) point at it, so their writes land somewhere harmless. The KV pool therefore
needs `pool_slots = (num_pages + 1) * page_size` slots for `num_slots = num_pages * page_size`
usable ones.

Ownership: whoever `alloc`s a page owns it until it passes it to `free` (directly, or through
`free_slots`). A request owns its private pages; the radix cache owns the pages it stores. The
allocator itself is single-threaded (the scheduler's loop) and takes no locks.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch


class PageAllocator:
    """Owns the free list of KV pages; page 0 is reserved as a padding target and never handed out.

    Usable pages are `1..num_pages`. `alloc` returns None (allocating nothing) when it cannot
    satisfy the whole request, so callers may check-then-allocate or just try. Freeing a page that
    is not allocated (already free, page 0, out of range) is a broken internal invariant:
    AssertionError.

    Placement: pages taken together (a prompt's chunk, a decode reservation) are the lowest free
    ids; a single page (a decode step crossing into a new page) is the highest. A prompt's pages
    then mostly form one run of consecutive ids, which the KV hand-off moves as one descriptor per
    buffer rather than one per page (shared/transfer/nixl.py: at 1024 tokens of the Llama-3-8B
    shape, 64 descriptors instead of 4096, milliseconds of the host's time per prompt), and the
    decode steps' pages, taken one at a time across the running requests, come from the other end
    instead of cutting those runs. Both ends are heaps with lazy deletion: an entry whose page is
    no longer free is skipped when popped.
    """

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._low: list[int] = []  # min-heap of free page ids (and stale entries)
        self._high: list[int] = []  # min-heap of negated free page ids (and stale entries)
        self._num_free = 0
        self._is_free = bytearray(num_pages + 1)  # index = page id; page 0 stays 0 (never free)
        self.reset()

    @property
    def num_slots(self) -> int:
        """Usable token slots: `num_pages * page_size`."""
        return self.num_pages * self.page_size

    @property
    def pool_slots(self) -> int:
        """Slots the KV pool must have, reserved page 0 included: `(num_pages + 1) * page_size`."""
        return (self.num_pages + 1) * self.page_size

    def num_free_pages(self) -> int:
        return self._num_free

    def num_free_slots(self) -> int:
        return self._num_free * self.page_size

    def can_alloc(self, n_pages: int) -> bool:
        return 0 <= n_pages <= self._num_free

    def alloc(self, n_pages: int) -> torch.Tensor | None:
        """Take `n_pages` pages: int64 page ids `[n_pages]` (ascending, the lowest free ones; one
        page: the highest), or None (nothing taken) if too few."""
        assert n_pages >= 0, n_pages
        if n_pages > self._num_free:
            return None
        if n_pages == 1:
            pages = [self._take_high()]
        else:
            pages = [self._take_low() for _ in range(n_pages)]
        return torch.tensor(pages, dtype=torch.int64)

    def alloc_page(self) -> int | None:
        """Take one page (the decode fast path: no tensors), or None if none is free."""
        if not self._num_free:
            return None
        return self._take_high()

    def _take_low(self) -> int:
        return self._take(self._low, 1)

    def _take_high(self) -> int:
        return self._take(self._high, -1)

    def _take(self, heap: list[int], sign: int) -> int:
        """Pop `heap` (ids times `sign`) until a page that is still free comes out; take it."""
        while True:
            page = sign * heapq.heappop(heap)
            if self._is_free[page]:
                self._is_free[page] = 0
                self._num_free -= 1
                return page

    def free(self, pages: torch.Tensor) -> None:
        """Return pages to the free list. The caller must own every page, each listed once."""
        ids = pages.tolist()
        # Check everything before mutating, so a failed assertion leaves the free list intact.
        assert len(set(ids)) == len(ids), f"page freed twice in one call: {ids}"
        for p in ids:
            assert 0 < p <= self.num_pages, f"page {p} is not an allocatable page"
            assert not self._is_free[p], f"double free of page {p}"
        for p in ids:
            self._is_free[p] = 1
            heapq.heappush(self._low, p)
            heapq.heappush(self._high, -p)
        self._num_free += len(ids)
        if len(self._low) + len(self._high) > 4 * self._num_free + 4096:
            self._rebuild()  # mostly stale entries: amortized over as many pops

    def pages_needed(self, cur_len: int, n: int) -> int:
        """New pages a sequence of `cur_len` tokens (from a page boundary) needs to grow by `n`."""
        ps = self.page_size
        return -(-(cur_len + n) // ps) - -(-cur_len // ps)

    def alloc_slots(self, last_slot: int | None, cur_len: int, n: int) -> torch.Tensor | None:
        """Slots (int64 `[n]`) for `n` new tokens of a sequence holding `cur_len` private tokens.

        `cur_len` counts from a page boundary (the private region starts on a fresh page) and
        `last_slot` is the slot of its last token (None when `cur_len == 0`). The rest of that last
        page is used first, then fresh pages. Returns None, allocating nothing, if pages run out.

            ps = 4, cur_len = 6, n = 5, last_slot = 4*7 + 1 (page 7, offset 1):
            page 7  [x x _ _]  -> slots 30, 31      (fills the partial page)
            page q  [_ _ _ _]  -> slots 4q .. 4q+2  (one fresh page)
        """
        assert n >= 0 and cur_len >= 0, (cur_len, n)
        ps = self.page_size
        used = cur_len % ps
        head = 0 if used == 0 else min(ps - used, n)
        n_pages = self.pages_needed(cur_len, n)
        if n_pages > self._num_free:
            return None
        parts: list[torch.Tensor] = []
        if head:
            assert last_slot is not None and last_slot % ps == used - 1, (last_slot, cur_len)
            parts.append(torch.arange(last_slot + 1, last_slot + 1 + head, dtype=torch.int64))
        if n_pages:
            pages = self.alloc(n_pages)
            assert pages is not None  # checked above
            offsets = torch.arange(ps, dtype=torch.int64)
            fresh = (pages[:, None] * ps + offsets).reshape(-1)  # [n_pages * ps]
            parts.append(fresh[: n - head])
        if not parts:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat(parts)

    def free_slots(self, slots: torch.Tensor) -> None:
        """Free the distinct pages `slots` live in; the caller owns those pages whole."""
        if slots.numel() == 0:
            return
        self.free(torch.unique(slots // self.page_size))

    def reset(self) -> None:
        """Mark every usable page free (forgets all owners; only for a fresh start)."""
        self._is_free = bytearray([0]) + bytearray([1]) * self.num_pages
        self._rebuild()

    def _rebuild(self) -> None:
        """Both heaps from the free pages alone (a sorted list is a heap)."""
        free = np.flatnonzero(np.frombuffer(self._is_free, dtype=np.uint8))
        self._low = free.tolist()
        self._high = (-free[::-1]).tolist()
        self._num_free = len(free)
