"""Property tests for the KV memory layer: a model client drives allocator + radix cache.

The client behaves like the scheduler: match a prefix and lock it, allocate private slots for the
rest, "write KV" for them, grow during decode, hand full pages to the tree (freeing its own
duplicates as `insert`'s contract says), re-lock the longer prefix, finish or abort. It also pins
prefixes without a request and grabs raw pages. After every step:

    free slots + evictable + protected + client-private slots == total slots
    O(1) counters == a full tree walk; every node's lock_ref == the locks the client holds on it
    every slot the tree stores holds the KV written for exactly its token prefix (no slot was
    freed and reused while the tree still pointed at it)

The fake KV of a slot is the (namespace, token prefix) whose last token was written there, which
is what the real K/V depends on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from shared.mem import PageAllocator, RadixCache, TreeNode

Key = tuple[str | None, tuple[int, ...]]

# Prompts are a cut of one of a few base prompts plus a random tail, so prefixes collide often
# and diverge both on and off page boundaries (page size 4: at 3, 6 and 8 tokens into base 0).
BASES = [
    [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2],
    [0, 1, 2, 0, 1, 2, 2, 2, 0, 0, 0, 0],
    [0, 1, 2, 0, 1, 2, 0, 1, 1, 1, 1, 1],
    [0, 1, 2, 1, 1, 1, 1, 1],
    [2, 2, 2, 2, 2, 2, 2, 2],
]
TOKENS = st.builds(
    lambda base, cut, tail: base[:cut] + tail,
    st.sampled_from(BASES),
    st.integers(0, 12),
    st.lists(st.integers(0, 2), max_size=4),
)
NAMESPACES = st.sampled_from([None, "tenant-a"])
PICK = st.integers(0, 1 << 16)  # index into a client list, taken modulo its length


@dataclass
class Req:
    tokens: list[int]
    namespace: str | None
    slots: list[int]  # slot of each token
    matched_len: int  # slots[:matched_len] are the tree's, locked through `node`
    node: TreeNode

    @property
    def private(self) -> list[int]:
        return self.slots[self.matched_len :]


class MemMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.reqs: list[Req] = []
        self.pins: list[TreeNode] = []  # locks held without a request
        self.raw: list[torch.Tensor] = []  # pages held outside any sequence
        self.kv: dict[int, Key] = {}  # fake KV: slot -> (namespace, prefix ending at its token)

    @initialize(page_size=st.sampled_from([1, 4]), budget=st.integers(12, 48))
    def setup(self, page_size: int, budget: int) -> None:
        # a few prompts' worth of slots: enough to build a tree, little enough to force eviction
        self.ps = page_size
        self.alloc = PageAllocator(num_pages=budget // page_size, page_size=page_size)
        self.cache = RadixCache(self.alloc)

    # ---- helpers ----------------------------------------------------------------------------

    def check_prefix_kv(self, namespace: str | None, tokens: list[int], slots: list[int]) -> None:
        for i, s in enumerate(slots):
            assert self.kv[s] == (namespace, tuple(tokens[: i + 1])), (i, s)

    def write_kv(self, req: Req, start: int) -> None:
        for i in range(start, len(req.tokens)):
            self.kv[req.slots[i]] = (req.namespace, tuple(req.tokens[: i + 1]))

    def alloc_or_evict(self, last_slot: int | None, cur_len: int, n: int) -> torch.Tensor | None:
        slots = self.alloc.alloc_slots(last_slot, cur_len, n)
        if slots is None:
            before = self.alloc.num_free_pages()
            self.cache.evict(self.alloc.pages_needed(cur_len, n) * self.ps)
            assert self.alloc.num_free_pages() >= before
            slots = self.alloc.alloc_slots(last_slot, cur_len, n)
        return slots

    def give_to_tree(self, req: Req) -> int:
        """Insert the request's tokens; free our duplicates; return the aligned length."""
        ret = self.cache.insert(req.tokens, torch.tensor(req.slots, dtype=torch.int64), req.namespace)
        aligned = len(req.tokens) // self.ps * self.ps
        assert ret % self.ps == 0 and req.matched_len <= ret <= aligned
        # The whole aligned part is in the tree now.
        assert self.cache.match_prefix(req.tokens, req.namespace).slots.numel() == aligned
        dup = req.slots[req.matched_len : ret]
        if dup:
            self.alloc.free_slots(torch.tensor(dup))
        return aligned

    # ---- rules ------------------------------------------------------------------------------

    def match(self, tokens: list[int], namespace: str | None) -> tuple[list[int], TreeNode]:
        """match_prefix, checked against a brute-force longest stored prefix and the fake KV."""
        stored = set()
        for node in self.walk():
            path = self.path(node)
            for k in range(len(path) - len(node.key) + self.ps, len(path) + 1, self.ps):
                stored.add((node.namespace, path[:k]))
        expected = max(
            (k for k in range(0, len(tokens) + 1, self.ps) if (namespace, tuple(tokens[:k])) in stored),
            default=0,
        )
        m = self.cache.match_prefix(tokens, namespace)
        slots = m.slots.tolist()
        assert len(slots) == expected
        assert self.path(m.node) == tuple(tokens[:expected])  # the node ends exactly there
        self.check_prefix_kv(namespace, tokens, slots)
        return slots, m.node

    def path(self, node: TreeNode) -> tuple[int, ...]:
        keys = []
        while node is not self.cache.root:
            keys.append(node.key)
            assert node.parent is not None
            node = node.parent
        return tuple(t for key in reversed(keys) for t in key)

    def begin(self, tokens: list[int], namespace: str | None) -> Req | None:
        matched, node = self.match(tokens, namespace)
        self.cache.inc_lock_ref(node)
        new = self.alloc_or_evict(None, 0, len(tokens) - len(matched))
        if new is None:
            self.cache.dec_lock_ref(node)
            return None
        # eviction could not have touched the locked prefix
        assert self.cache.match_prefix(tokens, namespace).slots.tolist()[: len(matched)] == matched
        req = Req(tokens, namespace, matched + new.tolist(), len(matched), node)
        self.write_kv(req, len(matched))
        return req

    def end(self, req: Req) -> None:
        aligned = self.give_to_tree(req)
        tail = req.slots[aligned:]
        if tail:
            self.alloc.free_slots(torch.tensor(tail))
        self.cache.dec_lock_ref(req.node)

    @precondition(lambda self: len(self.reqs) < 6)
    @rule(tokens=TOKENS, namespace=NAMESPACES)
    def start(self, tokens: list[int], namespace: str | None) -> None:
        req = self.begin(tokens, namespace)
        if req is not None:
            self.reqs.append(req)

    @rule(tokens=TOKENS, namespace=NAMESPACES)
    def serve(self, tokens: list[int], namespace: str | None) -> None:
        """A whole request at once: match, lock, allocate, write, insert, unlock."""
        req = self.begin(tokens, namespace)
        if req is not None:
            self.end(req)

    @precondition(lambda self: self.reqs)
    @rule(pick=PICK, extra=st.lists(st.integers(0, 2), min_size=1, max_size=5))
    def extend(self, pick: int, extra: list[int]) -> None:
        req = self.reqs[pick % len(self.reqs)]
        private = req.private
        new = self.alloc_or_evict(private[-1] if private else None, len(private), len(extra))
        if new is None:
            return
        start = len(req.tokens)
        req.tokens = req.tokens + extra
        req.slots = req.slots + new.tolist()
        self.write_kv(req, start)

    @precondition(lambda self: self.reqs)
    @rule(pick=PICK)
    def cache_unfinished(self, pick: int) -> None:
        """Insert a running request's full pages and move its lock to the longer prefix."""
        req = self.reqs[pick % len(self.reqs)]
        ret_floor = req.matched_len
        aligned = self.give_to_tree(req)
        m = self.cache.match_prefix(req.tokens, req.namespace)
        tree_slots = m.slots.tolist()
        assert len(tree_slots) == aligned
        assert tree_slots[:ret_floor] == req.slots[:ret_floor]  # the locked part never moved
        self.check_prefix_kv(req.namespace, req.tokens, tree_slots)
        self.cache.inc_lock_ref(m.node)
        self.cache.dec_lock_ref(req.node)
        req.node, req.matched_len = m.node, aligned
        req.slots = tree_slots + req.slots[aligned:]

    @precondition(lambda self: self.reqs)
    @rule(pick=PICK)
    def finish(self, pick: int) -> None:
        self.end(self.reqs.pop(pick % len(self.reqs)))

    @precondition(lambda self: self.reqs)
    @rule(pick=PICK)
    def abort(self, pick: int) -> None:
        req = self.reqs.pop(pick % len(self.reqs))
        if req.private:
            self.alloc.free_slots(torch.tensor(req.private))
        self.cache.dec_lock_ref(req.node)

    @rule(tokens=TOKENS, namespace=NAMESPACES)
    def match_only(self, tokens: list[int], namespace: str | None) -> None:
        self.match(tokens, namespace)

    @rule(tokens=TOKENS, namespace=NAMESPACES)
    def pin(self, tokens: list[int], namespace: str | None) -> None:
        _, node = self.match(tokens, namespace)
        self.cache.inc_lock_ref(node)
        self.pins.append(node)

    @precondition(lambda self: self.pins)
    @rule(pick=PICK)
    def unpin(self, pick: int) -> None:
        self.cache.dec_lock_ref(self.pins.pop(pick % len(self.pins)))

    @rule(n=st.integers(0, 40))
    def evict(self, n: int) -> None:
        before = self.cache.evictable_size()
        protected = self.cache.protected_size()
        free_before = self.alloc.num_free_slots()
        evicted = self.cache.evict(n)
        # every unlocked node has an unlocked subtree, so all of `before` is reachable
        assert min(n, before) <= evicted <= before
        assert self.cache.evictable_size() == before - evicted
        assert self.cache.protected_size() == protected
        assert self.alloc.num_free_slots() == free_before + evicted

    @rule()
    def evict_one(self) -> None:
        """The least recently used unlocked leaf goes first, and nothing else."""
        leaves = [n for n in self.walk() if not n.children and n.lock_ref == 0]
        evicted = self.cache.evict(1)
        if not leaves:
            assert evicted == 0
            return
        lru = min(leaves, key=lambda n: n.last_access)
        assert evicted == len(lru.key) and lru.parent is None
        assert all(n.parent is not None for n in leaves if n is not lru)

    @rule(n=st.integers(0, 4))
    def raw_alloc(self, n: int) -> None:
        free = self.alloc.num_free_pages()
        pages = self.alloc.alloc(n)
        if n > free:
            assert pages is None and self.alloc.num_free_pages() == free
        else:
            assert pages is not None and pages.numel() == n
            self.raw.append(pages)

    @precondition(lambda self: self.raw)
    @rule(pick=PICK)
    def raw_free(self, pick: int) -> None:
        self.alloc.free(self.raw.pop(pick % len(self.raw)))

    # ---- invariants -------------------------------------------------------------------------

    def walk(self) -> list[TreeNode]:
        nodes, stack = [], list(self.cache.root.children.values())
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        return nodes

    def client_private_slots(self) -> int:
        pages = sum(-(-len(r.private) // self.ps) for r in self.reqs)
        pages += sum(p.numel() for p in self.raw)
        return pages * self.ps

    @invariant()
    def conservation(self) -> None:
        if not hasattr(self, "cache"):
            return
        total = (
            self.alloc.num_free_slots()
            + self.cache.evictable_size()
            + self.cache.protected_size()
            + self.client_private_slots()
        )
        assert total == self.alloc.num_slots

    @invariant()
    def tree_matches_walk_and_client(self) -> None:
        if not hasattr(self, "cache"):
            return
        expected_locks: dict[int, int] = {}
        for node in [r.node for r in self.reqs] + self.pins:
            while node is not self.cache.root:
                expected_locks[id(node)] = expected_locks.get(id(node), 0) + 1
                assert node.parent is not None, "client holds a lock on an evicted node"
                node = node.parent
        evictable = protected = 0
        tree_pages: set[int] = set()
        root_path: tuple[int, ...] = ()
        stack = [(child, root_path) for child in self.cache.root.children.values()]
        while stack:
            node, prefix = stack.pop()
            assert len(node.key) > 0 and len(node.key) % self.ps == 0
            assert node.lock_ref == expected_locks.get(id(node), 0)
            if node.lock_ref:
                protected += len(node.key)
            else:
                evictable += len(node.key)
            path = prefix + node.key
            slots = node.value.tolist()
            for j, s in enumerate(slots):
                assert self.kv[s] == (node.namespace, path[: len(prefix) + j + 1]), (path, j, s)
            for i in range(0, len(slots), self.ps):  # whole pages, distinct across the tree
                page = slots[i] // self.ps
                assert page not in tree_pages and page != 0
                tree_pages.add(page)
            stack.extend((child, path) for child in node.children.values())
        assert (evictable, protected) == (self.cache.evictable_size(), self.cache.protected_size())
        # no page is both the tree's and a request's
        for r in self.reqs:
            assert all(s % self.ps == i % self.ps for i, s in enumerate(r.slots))
            assert tree_pages.isdisjoint(s // self.ps for s in r.private)

    def teardown(self) -> None:
        if not hasattr(self, "cache"):
            return
        for r in self.reqs:
            if r.private:
                self.alloc.free_slots(torch.tensor(r.private))
            self.cache.dec_lock_ref(r.node)
        for node in self.pins:
            self.cache.dec_lock_ref(node)
        for pages in self.raw:
            self.alloc.free(pages)
        assert self.cache.protected_size() == 0
        self.cache.evict(self.alloc.num_slots + 1)
        assert self.cache.total_size() == 0 and not self.cache.root.children
        assert self.alloc.num_free_pages() == self.alloc.num_pages  # nothing leaked
        everything = self.alloc.alloc(self.alloc.num_pages)
        assert everything is not None
        assert sorted(everything.tolist()) == list(range(1, self.alloc.num_pages + 1))


MemMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
TestMemMachine = MemMachine.TestCase


@settings(max_examples=200, deadline=None)
@given(
    page_size=st.sampled_from([1, 2, 4, 16]),
    steps=st.lists(st.integers(0, 20), max_size=8),
)
def test_alloc_slots_growth_is_a_flat_paged_layout(page_size: int, steps: list[int]) -> None:
    alloc = PageAllocator(num_pages=12, page_size=page_size)
    seq: list[int] = []
    for n in steps:
        free = alloc.num_free_pages()
        new = alloc.alloc_slots(seq[-1] if seq else None, len(seq), n)
        if new is None:
            assert alloc.pages_needed(len(seq), n) > free
            assert alloc.num_free_pages() == free  # a failed call takes nothing
            continue
        assert free - alloc.num_free_pages() == alloc.pages_needed(len(seq), n)
        seq += new.tolist()
    assert all(s % page_size == i % page_size for i, s in enumerate(seq))
    pages = [s // page_size for s in seq]
    assert pages == [pages[i - i % page_size] for i in range(len(seq))]  # one page per page-run
    assert len(set(pages)) == -(-len(seq) // page_size) and 0 not in pages
    assert alloc.num_free_pages() + len(set(pages)) == 12
    if seq:
        alloc.free_slots(torch.tensor(seq))
    assert alloc.num_free_pages() == 12
