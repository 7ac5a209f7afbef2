"""The radix prefix cache: token ids -> KV slots, shared across requests.

The tree is page-aligned: every node's key is a whole number of pages of token ids, and a node
splits only on a page boundary, so every node owns whole pages and eviction frees whole pages.
Children are keyed by (namespace, first page of tokens); siblings therefore differ in their first
page, and keys of different namespaces (LoRA id, tenant) never meet.

A request's life against the cache (the scheduler drives it):

    match_prefix(tokens)      -> MatchResult(slots, node)   reuse the cached prefix
    inc_lock_ref(node)                                      pin it while the request runs
    ... allocate private slots for the rest, run forward ...
    insert(tokens, slots)     -> already_len                hand the new full pages to the tree
    free own pages in slots[matched_len:already_len]        duplicates the tree already had
    dec_lock_ref(node)                                      unpin; the prefix becomes evictable

Accounting: every slot the tree holds is either evictable (its node has lock_ref == 0) or
protected (lock_ref > 0), so at all times

    allocator free slots + evictable_size() + protected_size() + slots owned by requests == total

Locking: a lock on a node counts on it and on every ancestor, so an ancestor of a locked node is
itself locked and only unlocked leaves are ever evicted. Single-threaded (the scheduler loop).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from shared.mem.allocator import PageAllocator

_ChildKey = tuple[str | None, tuple[int, ...]]


class TreeNode:
    """One edge of the tree: `key` (tokens, whole pages) and `value` (their KV slots, int64)."""

    __slots__ = ("children", "id", "key", "last_access", "lock_ref", "namespace", "parent", "value")

    def __init__(
        self,
        key: tuple[int, ...],
        value: torch.Tensor,
        namespace: str | None,
        parent: TreeNode | None,
        id: int,
        last_access: int,
    ) -> None:
        self.id = id
        self.key = key
        self.value = value  # [len(key)] int64 slots
        self.namespace = namespace
        self.parent = parent  # None for the root and for evicted (detached) nodes
        self.children: dict[_ChildKey, TreeNode] = {}
        self.lock_ref = 0
        self.last_access = last_access

    def __len__(self) -> int:
        return len(self.key)

    def is_leaf(self) -> bool:
        return not self.children

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, len={len(self.key)}, lock_ref={self.lock_ref})"


@dataclass
class MatchResult:
    slots: torch.Tensor  # [matched_len] int64, matched_len a multiple of page_size
    # deepest node of the match (the root when nothing matched); lock it to keep the prefix
    node: TreeNode


class RadixCache:
    """Radix tree over token ids -> KV slots, page-aligned, with ref-counted locks and LRU eviction.

    Ownership: the tree owns the pages of every slot it stores and frees them (through the
    allocator) only in `evict` and `reset`. `insert` takes ownership of the slots of the pages it
    newly stores; the slots of pages it already held stay the caller's (see `insert`).
    A node with lock_ref > 0, or an ancestor of one, is never evicted.
    `evictable_size`/`protected_size` are O(1) counters kept on every mutation.
    """

    def __init__(self, allocator: PageAllocator) -> None:
        self.allocator = allocator
        self.page_size = allocator.page_size
        self._ids = itertools.count()
        self._init_tree()

    def _init_tree(self) -> None:
        """Forget the tree without freeing anything (construction; `reset` frees first)."""
        self._clock = 0  # logical time: deterministic LRU order, unlike a wall clock
        self.root = TreeNode((), torch.empty(0, dtype=torch.int64), None, None, next(self._ids), 0)
        self._evictable = 0
        self._protected = 0
        self._num_nodes = 0  # excluding the root
        # Lazily validated min-heap of eviction candidates: (last_access, id, node). An entry is
        # live only while its node is attached, a leaf, unlocked and still has that last_access;
        # anything else is skipped on pop. A node is pushed whenever it may have become a candidate.
        self._heap: list[tuple[int, int, TreeNode]] = []

    # ---- queries -------------------------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int], namespace: str | None = None) -> MatchResult:
        """The longest page-aligned stored prefix of `token_ids` in `namespace`.

        Refreshes the access time along the matched path. If the match ends inside a node, that
        node is split at the (page-aligned) end of the match so the returned node covers exactly
        the matched prefix. The result is not locked: lock `node` before anything may evict.
        """
        key = self._aligned(token_ids)
        node, _, values = self._descend(key, namespace, self._tick())
        self._maybe_push(node)
        slots = torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
        return MatchResult(slots=slots, node=node)

    def evictable_size(self) -> int:
        """Tokens stored in nodes with lock_ref == 0."""
        return self._evictable

    def protected_size(self) -> int:
        """Tokens stored in nodes with lock_ref > 0."""
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected

    # ---- mutation ------------------------------------------------------------------------

    def insert(self, token_ids: Sequence[int], slots: torch.Tensor, namespace: str | None = None) -> int:
        """Store the page-aligned part of `token_ids` -> `slots`; return the length already held.

        Only the first `aligned_len = len // page_size * page_size` tokens are stored. The return
        value `ret` (page-aligned) is how many leading tokens the tree held before this call.
        Ownership afterwards:
          slots[:ret]             still the caller's; where they are the caller's own pages (not
                                  the part it matched and locked, which is the tree's) they are
                                  duplicates and the caller frees them.
          slots[ret:aligned_len]  now the tree's.
          slots[aligned_len:]     still the caller's (the partial last page).
        `slots` is a CPU int64 tensor (scheduler metadata, as the allocator hands it out); each
        page of `slots[ret:aligned_len]` must be one whole allocator page, in order.
        """
        assert len(slots) == len(token_ids), (len(slots), len(token_ids))
        key = self._aligned(token_ids)
        now = self._tick()
        node, pos, _ = self._descend(key, namespace, now)
        if pos < len(key):
            value = slots[pos : len(key)].to(torch.int64).clone()  # [len(key) - pos]
            self._check_whole_pages(value)
            leaf = TreeNode(key[pos:], value, namespace, node, next(self._ids), now)
            node.children[self._child_key(namespace, key, pos)] = leaf
            self._num_nodes += 1
            self._evictable += len(leaf)
            node = leaf
        self._maybe_push(node)
        return pos

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Lock `node` and all its ancestors (one count each); locking the root is a no-op."""
        while node is not self.root:
            assert node.parent is not None, "locking an evicted node"
            if node.lock_ref == 0:
                self._evictable -= len(node)
                self._protected += len(node)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        """Undo one `inc_lock_ref(node)`."""
        while node is not self.root:
            assert node.lock_ref > 0 and node.parent is not None, f"unbalanced unlock of {node}"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node)
                self._evictable += len(node)
                self._maybe_push(node)
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        """Evict least-recently-used unlocked leaves until `num_tokens` are freed or none is left.

        Whole nodes go, so more than `num_tokens` may be freed. Returns the tokens evicted.
        """
        evicted = 0
        while evicted < num_tokens and self._heap:
            last_access, _, node = heapq.heappop(self._heap)
            if not self._is_candidate(node) or node.last_access != last_access:
                continue
            parent = node.parent
            assert parent is not None
            self.allocator.free_slots(node.value)
            del parent.children[self._child_key(node.namespace, node.key, 0)]
            node.parent = None
            self._num_nodes -= 1
            self._evictable -= len(node)
            evicted += len(node)
            self._maybe_push(parent)
        return evicted

    def reset(self) -> None:
        """Free every stored page and empty the tree. All locks must have been released."""
        assert self._protected == 0, f"reset with {self._protected} locked tokens"
        for node in self._nodes():
            assert node.lock_ref == 0, node
            self.allocator.free_slots(node.value)
            node.parent = None
        self._init_tree()

    # ---- debugging -----------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Walk the whole tree; assert the counters, alignment and lock structure (debug mode)."""
        ps = self.page_size
        evictable = protected = count = 0
        for node in self._nodes():
            count += 1
            assert node.parent is not None and len(node) > 0 and len(node) % ps == 0, node
            assert node.value.shape == (len(node),), node
            children_locks = sum(c.lock_ref for c in node.children.values())
            assert node.lock_ref >= children_locks, node
            if node.lock_ref:
                protected += len(node)
            else:
                evictable += len(node)
        walked = (evictable, protected, count)
        counted = (self._evictable, self._protected, self._num_nodes)
        assert walked == counted, f"tree walk {walked} != counters {counted}"

    def pretty(self) -> str:
        """An indented dump of the tree, one node per line (keys shortened)."""
        lines = [f"root evictable={self._evictable} protected={self._protected}"]

        def visit(node: TreeNode, depth: int) -> None:
            for child in node.children.values():
                key = list(child.key[:8]) + (["..."] if len(child.key) > 8 else [])
                lines.append(
                    f"{'  ' * depth}- ns={child.namespace!r} key={key} len={len(child)} "
                    f"lock={child.lock_ref} t={child.last_access} slots={child.value[:8].tolist()}"
                )
                visit(child, depth + 1)

        visit(self.root, 1)
        return "\n".join(lines)

    # ---- internals -----------------------------------------------------------------------

    def _descend(
        self, key: tuple[int, ...], namespace: str | None, now: int
    ) -> tuple[TreeNode, int, list[torch.Tensor]]:
        """Walk down the stored prefix of `key`, splitting the last node at the end of the match
        and stamping access times. Returns (deepest node, matched length, slots per node)."""
        node, pos, values = self.root, 0, []
        while pos < len(key):
            child = node.children.get(self._child_key(namespace, key, pos))
            if child is None:
                break
            n = self._common_len(child.key, key, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            values.append(child.value)
            # After a split the next page differs from the lower half's first page (or the key
            # ended), so the next lookup fails and the walk stops there.
            node, pos = child, pos + n
        return node, pos, values

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _aligned(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        n = len(token_ids) // self.page_size * self.page_size
        return tuple(token_ids[:n])

    def _child_key(self, namespace: str | None, key: tuple[int, ...], pos: int) -> _ChildKey:
        return (namespace, key[pos : pos + self.page_size])

    def _common_len(self, node_key: tuple[int, ...], key: tuple[int, ...], pos: int) -> int:
        """Length of the common prefix of node_key and key[pos:], rounded down to whole pages."""
        n = min(len(node_key), len(key) - pos)
        i = 0
        while i < n and node_key[i] == key[pos + i]:
            i += 1
        return i // self.page_size * self.page_size

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Split `child` after its first `n` tokens (page-aligned); return the new upper half.

        The upper half takes child's place under its parent and inherits its lock count (a lock
        below it counts on it) and access time; child keeps its identity, children and heap entry.
        """
        assert 0 < n < len(child) and n % self.page_size == 0, (n, len(child))
        parent = child.parent
        assert parent is not None
        upper = TreeNode(
            child.key[:n],
            child.value[:n].clone(),
            child.namespace,
            parent,
            next(self._ids),
            child.last_access,
        )
        upper.lock_ref = child.lock_ref
        parent.children[self._child_key(child.namespace, child.key, 0)] = upper
        child.key = child.key[n:]
        child.value = child.value[n:].clone()
        child.parent = upper
        upper.children[self._child_key(child.namespace, child.key, 0)] = child
        self._num_nodes += 1
        return upper

    def _is_candidate(self, node: TreeNode) -> bool:
        return node is not self.root and node.parent is not None and not node.children and node.lock_ref == 0

    def _maybe_push(self, node: TreeNode) -> None:
        if not self._is_candidate(node):
            return
        heapq.heappush(self._heap, (node.last_access, node.id, node))
        # Stale entries pile up when nodes are touched often but rarely evicted: rebuild then.
        if len(self._heap) > 4 * self._num_nodes + 64:
            self._heap = [(n.last_access, n.id, n) for n in self._nodes() if self._is_candidate(n)]
            heapq.heapify(self._heap)

    def _check_whole_pages(self, slots: torch.Tensor) -> None:
        ps = self.page_size
        if ps == 1 or slots.numel() == 0:
            return
        pages = slots.reshape(-1, ps)  # [n_pages, ps]
        offsets = torch.arange(ps, dtype=torch.int64)
        assert bool(((pages[:, :1] % ps == 0) & (pages - pages[:, :1] == offsets)).all()), (
            f"slots do not form whole pages: {slots.tolist()}"
        )

    def _nodes(self) -> Iterator[TreeNode]:
        """Every node except the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
