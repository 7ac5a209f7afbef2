"""Load-balancing policies: the registry, `create_policy`, and a routing simulation.

    create_policy("cache_aware", cache_threshold=0.5) -> CacheAwarePolicy
    create_policy("least_load")                       -> LeastLoadPolicy (the decode choice)

`simulate_prefix_workload` replays a shared-prefix workload through a policy against simulated
per-worker LRU caches and reports the approximate prefix hit rate (DESIGN.md §7: cache_aware should
reach >= 3x round_robin's); tests assert it and benchmarks can reuse it.
"""

from __future__ import annotations

import inspect
import random
import string
from collections import deque
from dataclasses import dataclass

from services.router.policies.base import Policy, WorkerView, least_loaded
from services.router.policies.cache_aware import CacheAwareConfig, CacheAwarePolicy, Decision
from services.router.policies.simple import LeastLoadPolicy, RandomPolicy, RoundRobinPolicy
from shared.routing.radix_tree import RadixTree

__all__ = [
    "POLICIES",
    "CacheAwareConfig",
    "CacheAwarePolicy",
    "Decision",
    "LeastLoadPolicy",
    "Policy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "SimulationResult",
    "WorkerView",
    "create_policy",
    "least_loaded",
    "policy_options",
    "simulate_prefix_workload",
]

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (CacheAwarePolicy, RoundRobinPolicy, RandomPolicy, LeastLoadPolicy)
}


def policy_options(name: str) -> list[str]:
    """Option names `create_policy(name, ...)` accepts."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    params = inspect.signature(POLICIES[name].__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def create_policy(name: str, **options: object) -> Policy:
    """Build the policy registered as `name`; ValueError for an unknown name, option or value."""
    allowed = policy_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"policy {name!r} has no option {', '.join(unknown)}; it takes: {', '.join(allowed) or 'none'}"
        )
    return POLICIES[name](**options)


@dataclass(frozen=True)
class SimulationResult:
    """Outcome of `simulate_prefix_workload`."""

    policy: str
    hit_rate: float  # matched prefix chars / total chars, each request against its worker's cache
    requests_per_worker: dict[str, int]


def simulate_prefix_workload(
    policy: Policy,
    *,
    n_workers: int = 4,
    n_requests: int = 200,
    n_groups: int = 8,
    prefix_len: int = 1024,
    suffix_len: int = 128,
    worker_cache_len: int = 3072,
    concurrency: int = 8,
    seed: int = 0,
) -> SimulationResult:
    """Route `n_requests` through `policy` and measure the prefix hit rate the workers would see.

    Workload: `n_groups` prefix families (a random `prefix_len`-char system prompt each); every
    request is one family's prefix (family drawn uniformly) plus a fresh `suffix_len`-char tail.
    Each worker's KV cache is modelled exactly as an LRU radix cache of `worker_cache_len` chars
    (default: room for 3 of the 8 prefixes, so a worker cannot hold every family). A request's
    hit is the prefix its worker already cached when it arrived. `concurrency` requests are open
    at once (in_flight, FIFO completion), which is what the load-balance checks see.
    Deterministic for a given seed (and a deterministic policy).
    """
    rng = random.Random(seed)
    letters = string.ascii_letters + string.digits + " "

    def chars(n: int) -> str:
        return "".join(rng.choices(letters, k=n))

    prefixes = [chars(prefix_len) for _ in range(n_groups)]
    workers = {f"10.0.0.{i}:5000": WorkerView(f"10.0.0.{i}:5000", 0) for i in range(n_workers)}
    caches = RadixTree()  # one tenant per worker: what its KV cache really holds
    open_requests: deque[tuple[str, str]] = deque()
    counts = dict.fromkeys(workers, 0)
    hit_chars = total_chars = 0
    for _ in range(n_requests):
        text = rng.choice(prefixes) + chars(suffix_len)
        address = policy.select(list(workers.values()), text, ()).address
        hit_chars += caches.prefix_match(text, {address}).match_len
        total_chars += len(text)
        caches.insert(text, address)
        caches.evict_tenant(address, worker_cache_len)
        counts[address] += 1
        workers[address].in_flight += 1
        open_requests.append((address, text))
        if len(open_requests) > concurrency:
            done, done_text = open_requests.popleft()
            workers[done].in_flight -= 1
            policy.on_request_done(done, done_text, ())
    return SimulationResult(policy.name, hit_chars / max(total_chars, 1), counts)
