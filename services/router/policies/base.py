"""The load-balancing policy interface: what a policy sees of a worker, and what it must answer.

The router owns the worker registry (health, draining, in-flight counters). For each request it
passes a policy the workers that may take it and the request's routing key (text, or token ids when
a client sent no text); the policy picks one and may remember the choice (cache_aware does).

Concurrency: policies are called from the router's asyncio event loop only (one thread), so they
keep plain state without locks. `select` must not await or block: it runs once per request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar


@dataclass
class WorkerView:
    """What a policy sees of one worker. The router builds and updates these; policies only read them."""

    address: str  # unique key, "host:port"
    in_flight: int  # requests the router has open on this worker
    active_tokens: int = 0  # prompt + max new tokens of those open requests (the decode-side load)


class Policy(ABC):
    """Chooses a worker for each request. Subclasses set `name` (the registry key)."""

    name: ClassVar[str]

    @abstractmethod
    def select(self, workers: Sequence[WorkerView], text: str, token_ids: Sequence[int]) -> WorkerView:
        """Pick one of `workers` (non-empty, all healthy and not draining) for a request.

        `text` is the routing text ("" when the client sent only token ids). The returned object is
        one of `workers`; a worker not passed in is never returned, whatever the policy remembers.
        """

    def on_worker_removed(self, address: str) -> None:  # noqa: B027 - optional hook, default no-op
        """Forget everything kept about `address` (the worker left the registry for good)."""

    def on_request_done(  # noqa: B027 - optional hook, default no-op
        self, address: str, text: str, token_ids: Sequence[int]
    ) -> None:
        """A request routed to `address` finished (successfully or not)."""


def least_loaded(workers: Sequence[WorkerView]) -> WorkerView:
    """Fewest open requests, then fewest active tokens, then lowest address (deterministic)."""
    return min(workers, key=lambda w: (w.in_flight, w.active_tokens, w.address))
