"""cache_aware: send a request where its prefix probably sits in KV cache, unless load is lopsided.

SGLang's router policy, re-derived (DESIGN.md §4). Per request:

1. imbalanced?  max(in_flight) - min(in_flight) > balance_abs_threshold
                and max(in_flight) > balance_rel_threshold * min(in_flight)
   -> the least-loaded worker (cache affinity must not pile work onto a hot worker);
2. else the longest prefix match of the request key among the passed-in workers in the shared
   approximate radix tree; match_len / len(key) >= cache_threshold -> the worker holding it
   (several: fewest in flight, then lowest address);
3. else the worker whose tree is smallest (most cache to spare; a new prefix family lands there).

Whatever the branch, the whole key is then inserted for the chosen worker, so the next request
with that prefix follows it. Keys are the request text (characters), or the token ids when the
request has no text; the two kinds live in separate trees since they are not comparable.

Eviction: inline, on insert. When the chosen worker's tree exceeds `max_tree_size` it drops that
worker's least-recently-used leaves down to 90% of the limit, so no background task is needed and
the O(tree) eviction pass runs at most once per 10% of the limit inserted. `evict()` runs the same
pass over all workers, for a router that prefers periodic maintenance; calling it is optional.

Concurrency: called from the router's event loop only (one thread); no locks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from services.router.policies.base import Policy, WorkerView, least_loaded
from services.router.radix_tree import Key, RadixTree

# Evict below the limit, not to it: otherwise once full every insert would pay a whole pass.
_EVICT_TO_FRACTION = 0.9

Reason = Literal["imbalanced", "cache_hit", "smallest_tree"]


@dataclass(frozen=True)
class CacheAwareConfig:
    """Options of `cache_aware` (names as accepted by `create_policy`).

    Defaults are the sglang-router Python API's (`Router(...)`: 0.5 / 32 / 1.0001 / 2**24). The
    current `sglang_router.launch_router` command line defaults to 0.3 / 64 / 1.5 / 2**26; SGLang's
    own size limit is also in characters per worker. 2**24 keeps a Python tree's memory moderate.
    """

    cache_threshold: float = 0.5  # matched fraction of the key needed to follow the cache
    balance_abs_threshold: int = 32  # in-flight spread (max - min) that may count as imbalance
    balance_rel_threshold: float = 1.0001  # ... and only when max > this * min
    max_tree_size: int = 2**24  # per worker, in characters (text keys) or tokens (token keys)

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


class Decision(NamedTuple):
    """Why the last `select` chose what it chose (for metrics and logs)."""

    address: str
    reason: Reason
    match_len: int  # elements of the key the chosen worker held, per the tree, before this request
    key_len: int


class CacheAwarePolicy(Policy):
    """SGLang-style cache-aware prefill choice over one shared approximate radix tree per key kind.

    Owns its trees; worker addresses are the tree tenants. A worker absent from `select`'s
    `workers` (unhealthy, draining) keeps its tree entries but is never chosen;
    `on_worker_removed` deletes them.
    """

    name = "cache_aware"

    def __init__(
        self,
        *,
        cache_threshold: float = CacheAwareConfig.cache_threshold,
        balance_abs_threshold: int = CacheAwareConfig.balance_abs_threshold,
        balance_rel_threshold: float = CacheAwareConfig.balance_rel_threshold,
        max_tree_size: int = CacheAwareConfig.max_tree_size,
    ) -> None:
        self.config = CacheAwareConfig(
            cache_threshold=cache_threshold,
            balance_abs_threshold=balance_abs_threshold,
            balance_rel_threshold=balance_rel_threshold,
            max_tree_size=max_tree_size,
        )
        self._text_tree = RadixTree()
        self._token_tree = RadixTree()
        self.last_decision: Decision | None = None

    @property
    def text_tree(self) -> RadixTree:
        """The tree over text keys (read-only use: metrics, tests)."""
        return self._text_tree

    @property
    def token_tree(self) -> RadixTree:
        """The tree over token-id keys, used for requests without text (read-only use)."""
        return self._token_tree

    def select(self, workers: Sequence[WorkerView], text: str, token_ids: Sequence[int]) -> WorkerView:
        if not workers:
            raise ValueError("cache_aware: select needs at least one worker")
        tree, key = (self._text_tree, text) if text else (self._token_tree, tuple(token_ids))
        chosen, reason, match_len = self._choose(workers, tree, key)
        tree.insert(key, chosen.address)
        limit = self.config.max_tree_size
        if tree.size(chosen.address) > limit:
            tree.evict_tenant(chosen.address, int(limit * _EVICT_TO_FRACTION))
        self.last_decision = Decision(chosen.address, reason, match_len, len(key))
        return chosen

    def _choose(
        self, workers: Sequence[WorkerView], tree: RadixTree, key: Key
    ) -> tuple[WorkerView, Reason, int]:
        cfg = self.config
        loads = [w.in_flight for w in workers]
        hi, lo = max(loads), min(loads)
        if hi - lo > cfg.balance_abs_threshold and hi > cfg.balance_rel_threshold * lo:
            chosen = least_loaded(workers)
            return chosen, "imbalanced", tree.prefix_match(key, {chosen.address}).match_len

        live = {w.address: w for w in workers}
        match = tree.prefix_match(key, live)
        if key and match.tenants and match.match_len / len(key) >= cfg.cache_threshold:
            chosen = min((live[a] for a in match.tenants), key=lambda w: (w.in_flight, w.address))
            return chosen, "cache_hit", match.match_len

        # Workers never seen have size 0, so a fresh worker soaks up new prefix families first.
        chosen = min(workers, key=lambda w: (tree.size(w.address), w.in_flight, w.address))
        if chosen.address in match.tenants:
            held = match.match_len
        else:
            held = tree.prefix_match(key, {chosen.address}).match_len
        return chosen, "smallest_tree", held

    def on_worker_removed(self, address: str) -> None:
        self._text_tree.remove_tenant(address)
        self._token_tree.remove_tenant(address)

    def evict(self) -> int:
        """Bring every worker's trees under `max_tree_size` now; returns elements evicted.

        Optional: `select` already evicts inline. For a router that wants periodic maintenance.
        """
        limit = self.config.max_tree_size
        target = int(limit * _EVICT_TO_FRACTION)
        return self._text_tree.evict(limit, target) + self._token_tree.evict(limit, target)
