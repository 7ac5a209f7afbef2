"""Cache-aware placement: send a request where its prefix probably sits in KV cache, unless load
is lopsided.

SGLang's router policy, re-derived (DESIGN.md §4). Per request, over the named targets (workers'
addresses, or DP ranks) and their loads (open requests first, then any tie-breakers):

1. imbalanced?  max(open) - min(open) > balance_abs_threshold
                and max(open) > balance_rel_threshold * min(open)
   -> the least-loaded target (cache affinity must not pile work onto a hot target);
2. else the longest prefix match of the request key among the targets in the approximate radix
   tree; match_len / len(key) >= cache_threshold -> the target holding it (several: least
   loaded, then lowest name);
3. else the target whose tree is smallest (most cache to spare; a new prefix family lands there).

Whatever the branch, the whole key is then inserted for the chosen target, so the next request
with that prefix follows it.

Eviction: inline, on insert. When the chosen target's tree exceeds `max_tree_size` it drops that
target's least-recently-used leaves down to 90% of the limit, so no background task is needed and
the O(tree) eviction pass runs at most once per 10% of the limit inserted.

Concurrency: a chooser belongs to one thread (see shared/routing/radix_tree.py); no locks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from shared.routing.radix_tree import Key, RadixTree

# Evict below the limit, not to it: otherwise once full every insert would pay a whole pass.
_EVICT_TO_FRACTION = 0.9

Reason = Literal["imbalanced", "cache_hit", "smallest_tree"]
Load = Callable[[str], tuple[int, ...]]  # a target's load: open requests first, then tie-breakers


@dataclass(frozen=True)
class CacheAwareConfig:
    """Options of cache-aware placement (the router's `cache_aware` policy takes these names).

    Defaults are the sglang-router Python API's (`Router(...)`: 0.5 / 32 / 1.0001 / 2**24). The
    current `sglang_router.launch_router` command line defaults to 0.3 / 64 / 1.5 / 2**26; SGLang's
    own size limit is also in characters per worker. 2**24 keeps a Python tree's memory moderate.
    """

    cache_threshold: float = 0.5  # matched fraction of the key needed to follow the cache
    balance_abs_threshold: int = 32  # open-request spread (max - min) that may count as imbalance
    balance_rel_threshold: float = 1.0001  # ... and only when max > this * min
    max_tree_size: int = 2**24  # per target, in characters (text keys) or tokens (token keys)

    def __post_init__(self) -> None:
        def number(name: str, value: object, integral: bool) -> float:
            kinds: tuple[type, ...] = (int,) if integral else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ValueError(f"cache_aware: {name} must be {'an int' if integral else 'a number'}")
            return float(value)  # type: ignore[arg-type]

        if not 0.0 <= number("cache_threshold", self.cache_threshold, False) <= 1.0:
            raise ValueError(f"cache_aware: cache_threshold must be in [0, 1], got {self.cache_threshold}")
        if number("balance_abs_threshold", self.balance_abs_threshold, True) < 0:
            raise ValueError("cache_aware: balance_abs_threshold must be >= 0")
        if number("balance_rel_threshold", self.balance_rel_threshold, False) < 0:
            raise ValueError("cache_aware: balance_rel_threshold must be >= 0")
        if number("max_tree_size", self.max_tree_size, True) < 1:
            raise ValueError("cache_aware: max_tree_size must be >= 1")


class Choice(NamedTuple):
    """Where `CacheAwareChooser.place` sent a request, and why."""

    name: str
    reason: Reason
    match_len: int  # elements of the key the chosen target held, per the tree, before this request


class CacheAwareChooser:
    """Cache-aware placement over one approximate radix tree (one key kind: text or token ids).

    Owns its tree; target names are the tree's tenants. A target absent from `place`'s `names`
    (unhealthy, draining) keeps its tree entries but is never chosen; `remove` deletes them.
    """

    def __init__(self, config: CacheAwareConfig) -> None:
        self.config = config
        self.tree = RadixTree()

    def place(self, names: Sequence[str], key: Key, load: Load) -> Choice:
        """Choose among `names` (at least one) for `key`, and record that it went there."""
        if not names:
            raise ValueError("cache_aware: place needs at least one target")
        choice = self._choose(names, key, load)
        self.tree.insert(key, choice.name)
        limit = self.config.max_tree_size
        if self.tree.size(choice.name) > limit:
            self.tree.evict_tenant(choice.name, int(limit * _EVICT_TO_FRACTION))
        return choice

    def _choose(self, names: Sequence[str], key: Key, load: Load) -> Choice:
        cfg, tree = self.config, self.tree
        opened = [load(n)[0] for n in names]
        hi, lo = max(opened), min(opened)
        if hi - lo > cfg.balance_abs_threshold and hi > cfg.balance_rel_threshold * lo:
            chosen = min(names, key=lambda n: (load(n), n))
            return Choice(chosen, "imbalanced", tree.prefix_match(key, {chosen}).match_len)

        match = tree.prefix_match(key, set(names))
        if key and match.tenants and match.match_len / len(key) >= cfg.cache_threshold:
            chosen = min(match.tenants, key=lambda n: (load(n), n))
            return Choice(chosen, "cache_hit", match.match_len)

        # Targets never seen have size 0, so a fresh one soaks up new prefix families first.
        chosen = min(names, key=lambda n: (tree.size(n), load(n), n))
        held = match.match_len if chosen in match.tenants else tree.prefix_match(key, {chosen}).match_len
        return Choice(chosen, "smallest_tree", held)

    def remove(self, name: str) -> None:
        """Forget everything placed on `name` (a worker that left)."""
        self.tree.remove_tenant(name)

    def evict(self) -> int:
        """Bring every target's tree under `max_tree_size` now; returns elements evicted."""
        limit = self.config.max_tree_size
        return self.tree.evict(limit, int(limit * _EVICT_TO_FRACTION))
