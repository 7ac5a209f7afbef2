"""An approximate, multi-tenant radix tree: who was probably sent which prefix.

A chooser that cannot see its targets' KV caches keeps a guess: one path-compressed radix tree
over the keys of the requests it placed (text characters, or token ids), where every node records
which targets ("tenants": the router's workers, or DP attention's ranks) were sent that prefix and
when. A prefix match then says how much of a new request each tenant has probably cached;
`size(tenant)` says how much a tenant holds.

    root ── "You are a " ──┬── "helpful bot. Hi" {w1:7}
           {w1:7, w2:5}    └── "pirate. Arr"     {w2:5}

Invariants (`check_invariants` verifies them; tests call it):
- a tenant on a node is on all its ancestors (a tenant holds whole prefixes, never a middle);
- every node but the root has at least one tenant (a node nobody holds is unlinked);
- edges are non-empty and a node's children are keyed by their edge's first element;
- `size(t)` == the summed edge lengths of the nodes holding t; it is updated in O(1) per node touched.
- a tenant's timestamp on a node is >= its timestamps below it (inserts stamp the whole path), so
  evicting a tenant's least-recently-used leaves never strands a fresher descendant.

Keys are `str` or `tuple[int, ...]`; use one key type per tree. Timestamps are a logical clock
(one tick per insert): deterministic and strictly ordered, unlike wall time.

Ownership and concurrency: a tree belongs to one chooser and is mutated from one thread (the
router's asyncio event loop; DP attention's engine loop), so it takes no locks; never share one
across threads.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Container, Iterator
from typing import NamedTuple, cast

Key = str | tuple[int, ...]  # characters, or token ids

_BLOCK = 64  # elements compared per slice when hunting a mismatch: C-speed compares, short Python loop


def common_prefix_len(edge: Key, key: Key, start: int) -> int:
    """Length of the common prefix of `edge` and `key[start:]`."""
    n = min(len(edge), len(key) - start)
    # The usual case on a hit is a whole-edge match: one slice compare settles it.
    if edge[:n] == key[start : start + n]:
        return n
    i = 0
    while i < n:
        j = min(i + _BLOCK, n)
        if edge[i:j] != key[start + i : start + j]:
            while edge[i] == key[start + i]:
                i += 1
            return i
        i = j
    return n


def _concat(parts: list[Key]) -> Key:
    if isinstance(parts[0], str):
        return "".join(cast(list[str], parts))
    return tuple(itertools.chain.from_iterable(cast(list[tuple[int, ...]], parts)))


class PrefixMatch(NamedTuple):
    """Result of `RadixTree.prefix_match`."""

    match_len: int  # elements of the key matched by the deepest tenant
    tenants: frozenset[str]  # every (allowed) tenant holding a prefix of exactly that length


class _Node:
    __slots__ = ("children", "edge", "parent", "tenants")

    def __init__(self, edge: Key, parent: _Node | None) -> None:
        self.edge = edge
        self.parent = parent
        self.children: dict[str | int, _Node] = {}
        self.tenants: dict[str, int] = {}  # tenant -> logical time of its latest insert through here


class RadixTree:
    """A multi-tenant, path-compressed radix tree with per-tenant sizes and LRU leaf eviction.

    Every tenant that ever inserted is registered on the root (even with an empty key) until
    `remove_tenant`; eviction empties a tenant's branches but keeps it registered with size 0.
    Evicted nodes are not re-merged with their parent: a leftover chain costs only an extra hop.
    """

    def __init__(self) -> None:
        self._root = _Node((), None)
        self._sizes: dict[str, int] = {}
        self._clock = 0
        self._node_count = 0  # excluding the root

    # ---- queries ----

    def size(self, tenant: str) -> int:
        """Elements (characters or tokens) held by `tenant`; 0 for an unknown tenant."""
        return self._sizes.get(tenant, 0)

    def sizes(self) -> dict[str, int]:
        """Size of every registered tenant."""
        return dict(self._sizes)

    def tenants(self) -> list[str]:
        """Registered tenants, in registration order."""
        return list(self._sizes)

    @property
    def node_count(self) -> int:
        return self._node_count

    def prefix_match(self, key: Key, tenants: Container[str] | None = None) -> PrefixMatch:
        """The longest prefix of `key` held by any tenant (only those in `tenants`, when given).

        Read-only: it stamps no timestamps (the policy's insert after choosing does). O(len(key)).
        """
        node = self._root
        held = self._holders(node, tenants)
        pos, n = 0, len(key)
        while pos < n:
            child = node.children.get(key[pos])
            if child is None:
                break
            holders = self._holders(child, tenants)
            if not holders:
                break
            shared = common_prefix_len(child.edge, key, pos)
            pos += shared
            held = holders
            if shared < len(child.edge):
                break
            node = child
        return PrefixMatch(pos, held)

    def keys(self, tenant: str) -> list[Key]:
        """The maximal keys `tenant` holds (one per tenant leaf); for tests and debugging."""
        out: list[Key] = []
        stack: list[tuple[_Node, list[Key]]] = [(self._root, [])]
        while stack:
            node, path = stack.pop()
            below = [c for c in node.children.values() if tenant in c.tenants]
            if not below and node is not self._root:
                out.append(_concat(path))
            stack.extend((c, [*path, c.edge]) for c in below)
        return out

    # ---- mutations ----

    def insert(self, key: Key, tenant: str) -> None:
        """Record that `tenant` now holds `key` (and so all its prefixes); stamps the whole path."""
        self._clock += 1
        now = self._clock
        self._root.tenants[tenant] = now
        self._sizes.setdefault(tenant, 0)
        node, pos, n = self._root, 0, len(key)
        while pos < n:
            child = node.children.get(key[pos])
            if child is None:
                leaf = _Node(key[pos:], node)
                leaf.tenants[tenant] = now
                node.children[key[pos]] = leaf
                self._node_count += 1
                self._sizes[tenant] += n - pos
                return
            shared = common_prefix_len(child.edge, key, pos)
            if shared < len(child.edge):
                child = self._split(child, shared)
            if tenant not in child.tenants:
                self._sizes[tenant] += len(child.edge)
            child.tenants[tenant] = now
            node = child
            pos += shared

    def evict_tenant(self, tenant: str, max_size: int) -> int:
        """Drop `tenant`'s least-recently-used leaves until `size(tenant) <= max_size`.

        Returns the number of elements evicted. Costs O(nodes held by the tenant · log) when over
        the limit, O(1) otherwise; callers amortize it by evicting below the limit they enforce.
        """
        size = self._sizes.get(tenant, 0)
        if size <= max_size:
            return 0
        order = itertools.count()  # heap tie-break: nodes are not comparable
        heap = [
            (node.tenants[tenant], next(order), node)
            for node in self._nodes_of(tenant)
            if self._is_leaf_of(node, tenant)
        ]
        heapq.heapify(heap)
        while heap and self._sizes[tenant] > max_size:
            _, _, node = heapq.heappop(heap)
            self._drop(node, tenant)
            parent = node.parent
            # Timestamps only grow toward the root, so a parent that just became a leaf is never
            # older than what is left in the heap below it: LRU order holds.
            if parent is not None and parent is not self._root and self._is_leaf_of(parent, tenant):
                heapq.heappush(heap, (parent.tenants[tenant], next(order), parent))
        return size - self._sizes[tenant]

    def evict(self, max_size: int, target_size: int | None = None) -> int:
        """Evict every tenant over `max_size` down to `target_size` (default `max_size`)."""
        target = max_size if target_size is None else target_size
        return sum(self.evict_tenant(t, target) for t, s in list(self._sizes.items()) if s > max_size)

    def remove_tenant(self, tenant: str) -> None:
        """Forget `tenant` entirely (a removed worker); nodes nobody else holds are unlinked."""
        # Reversed parents-first order is children-first: each node is a leaf when dropped.
        for node in reversed(list(self._nodes_of(tenant))):
            self._drop(node, tenant)
        self._root.tenants.pop(tenant, None)
        self._sizes.pop(tenant, None)

    # ---- internals ----

    @staticmethod
    def _holders(node: _Node, tenants: Container[str] | None) -> frozenset[str]:
        if tenants is None:
            return frozenset(node.tenants)
        return frozenset(t for t in node.tenants if t in tenants)

    @staticmethod
    def _is_leaf_of(node: _Node, tenant: str) -> bool:
        return tenant in node.tenants and not any(tenant in c.tenants for c in node.children.values())

    def _nodes_of(self, tenant: str) -> Iterator[_Node]:
        """Non-root nodes holding `tenant`, parents before children (only its branches are walked)."""
        stack = [c for c in self._root.children.values() if tenant in c.tenants]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(c for c in node.children.values() if tenant in c.tenants)

    def _split(self, child: _Node, at: int) -> _Node:
        """Cut `child`'s edge at `at`; the new upper node inherits its tenants (sizes unchanged)."""
        parent = child.parent
        assert parent is not None and 0 < at < len(child.edge)
        mid = _Node(child.edge[:at], parent)
        mid.tenants = dict(child.tenants)
        parent.children[mid.edge[0]] = mid
        child.edge = child.edge[at:]
        child.parent = mid
        mid.children[child.edge[0]] = child
        self._node_count += 1
        return mid

    def _drop(self, node: _Node, tenant: str) -> None:
        del node.tenants[tenant]
        self._sizes[tenant] -= len(node.edge)
        if not node.tenants:
            # Nobody holds it, so by ancestor closure nobody holds anything below it either, and
            # callers drop children first: it is a bare leaf to unlink.
            assert node.parent is not None and not node.children
            del node.parent.children[node.edge[0]]
            self._node_count -= 1

    def check_invariants(self) -> None:
        """Assert the module docstring's invariants (O(tree); tests and debug only)."""
        sizes = dict.fromkeys(self._sizes, 0)
        assert set(self._root.tenants) == set(self._sizes), "root must register exactly the sized tenants"
        count, stack = 0, [self._root]
        while stack:
            node = stack.pop()
            for first, child in node.children.items():
                count += 1
                assert child.parent is node and len(child.edge) > 0 and child.edge[0] == first
                assert child.tenants, "a node nobody holds must be unlinked"
                for t, stamp in child.tenants.items():
                    assert t in node.tenants, f"tenant {t!r} on a node but not on its parent"
                    assert node is self._root or node.tenants[t] >= stamp, "timestamps must grow rootward"
                    sizes[t] += len(child.edge)
                stack.append(child)
        assert count == self._node_count, (count, self._node_count)
        assert sizes == self._sizes, (sizes, self._sizes)
