"""Stateless-ish policies: round_robin, random, least_load (the decode choice)."""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

from services.router.policies.base import Policy, WorkerView, least_loaded


class RoundRobinPolicy(Policy):
    """Cycles over the workers in address order.

    It remembers the last address it chose, not an index, so the cycle stays fair and in order as
    workers join or leave: the next pick is the first address after the last one (wrapping around).
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._last: str | None = None

    def select(self, workers: Sequence[WorkerView], text: str, token_ids: Sequence[int]) -> WorkerView:
        ordered = sorted(workers, key=lambda w: w.address)
        i = 0
        if self._last is not None:
            i = bisect.bisect_right([w.address for w in ordered], self._last) % len(ordered)
        self._last = ordered[i].address
        return ordered[i]


class RandomPolicy(Policy):
    """Uniform choice; `seed` makes the sequence reproducible (workers are ordered by address first,
    so the same seed gives the same picks whatever order the router lists them in)."""

    name = "random"

    def __init__(self, *, seed: int | None = None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"random: seed must be an int, got {seed!r}")
        self._rng = random.Random(seed)

    def select(self, workers: Sequence[WorkerView], text: str, token_ids: Sequence[int]) -> WorkerView:
        ordered = sorted(workers, key=lambda w: w.address)
        return ordered[self._rng.randrange(len(ordered))]


class LeastLoadPolicy(Policy):
    """Fewest open requests, ties broken by fewest active tokens, then by address."""

    name = "least_load"

    def select(self, workers: Sequence[WorkerView], text: str, token_ids: Sequence[int]) -> WorkerView:
        return least_loaded(workers)
