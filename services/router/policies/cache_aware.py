"""cache_aware: send a request where its prefix probably sits in KV cache, unless load is lopsided.

The rule and its approximate tree are shared/routing/cache_aware.py (DP attention places requests
on its ranks with the same code); this is the router's adapter. Workers are named by address and
loaded by (in flight, active tokens). Keys are the request text (characters), or the token ids
when the request has no text; the two kinds live in separate trees since they are not comparable.

Concurrency: called from the router's event loop only (one thread); no locks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from services.router.policies.base import Policy, WorkerView
from shared.routing.cache_aware import CacheAwareChooser, CacheAwareConfig, Reason
from shared.routing.radix_tree import RadixTree

__all__ = ["CacheAwareConfig", "CacheAwarePolicy", "Decision"]


class Decision(NamedTuple):
    """Why the last `select` chose what it chose (for metrics and logs)."""

    address: str
    reason: Reason
    match_len: int  # elements of the key the chosen worker held, per the tree, before this request
    key_len: int


class CacheAwarePolicy(Policy):
    """SGLang-style cache-aware prefill choice over one approximate radix tree per key kind.

    A worker absent from `select`'s `workers` (unhealthy, draining) keeps its tree entries but is
    never chosen; `on_worker_removed` deletes them.
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
        self._text = CacheAwareChooser(self.config)
        self._tokens = CacheAwareChooser(self.config)
        self.last_decision: Decision | None = None

    @property
    def text_tree(self) -> RadixTree:
        """The tree over text keys (read-only use: metrics, tests)."""
        return self._text.tree

    @property
    def token_tree(self) -> RadixTree:
        """The tree over token-id keys, used for requests without text (read-only use)."""
        return self._tokens.tree

    def select(self, workers: Sequence[WorkerView], text: str, token_ids: Sequence[int]) -> WorkerView:
        if not workers:
            raise ValueError("cache_aware: select needs at least one worker")
        by_address = {w.address: w for w in workers}
        chooser, key = (self._text, text) if text else (self._tokens, tuple(token_ids))
        choice = chooser.place(
            list(by_address), key, lambda a: (by_address[a].in_flight, by_address[a].active_tokens)
        )
        self.last_decision = Decision(choice.name, choice.reason, choice.match_len, len(key))
        return by_address[choice.name]

    def on_worker_removed(self, address: str) -> None:
        self._text.remove(address)
        self._tokens.remove(address)

    def evict(self) -> int:
        """Bring every worker's trees under `max_tree_size` now; returns elements evicted.

        Optional: `select` already evicts inline. For a router that wants periodic maintenance.
        """
        return self._text.evict() + self._tokens.evict()
