"""Load-balancing policies: registry, cache_aware decisions, the simple policies, and the routing
simulation behind DESIGN.md §7's ">= 3x round robin hit rate" target."""

from __future__ import annotations

import random
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.router.policies import (
    POLICIES,
    CacheAwarePolicy,
    LeastLoadPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    WorkerView,
    create_policy,
    policy_options,
    simulate_prefix_workload,
)

ADDRS = ["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000", "10.0.0.4:7000"]


def pool(*loads: int) -> list[WorkerView]:
    return [WorkerView(a, n) for a, n in zip(ADDRS, loads or (0,) * len(ADDRS))]


def noise(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(string.ascii_letters, k=n))


# ---- registry ----


def test_create_policy_builds_each_registered_policy() -> None:
    assert sorted(POLICIES) == ["cache_aware", "least_load", "random", "round_robin"]
    assert isinstance(create_policy("cache_aware"), CacheAwarePolicy)
    assert isinstance(create_policy("round_robin"), RoundRobinPolicy)
    assert isinstance(create_policy("random", seed=3), RandomPolicy)
    assert isinstance(create_policy("least_load"), LeastLoadPolicy)
    assert policy_options("cache_aware") == [
        "cache_threshold",
        "balance_abs_threshold",
        "balance_rel_threshold",
        "max_tree_size",
    ]
    cfg = create_policy("cache_aware", cache_threshold=0.3, max_tree_size=100).config  # type: ignore[attr-defined]
    assert (cfg.cache_threshold, cfg.balance_abs_threshold, cfg.balance_rel_threshold) == (0.3, 32, 1.0001)
    assert cfg.max_tree_size == 100


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("power_of_two", {}),
        ("cache_aware", {"threshold": 0.5}),
        ("round_robin", {"seed": 1}),
        ("cache_aware", {"cache_threshold": 1.5}),
        ("cache_aware", {"cache_threshold": "0.5"}),
        ("cache_aware", {"balance_abs_threshold": -1}),
        ("cache_aware", {"balance_abs_threshold": 2.5}),
        ("cache_aware", {"max_tree_size": 0}),
        ("random", {"seed": "x"}),
    ],
)
def test_create_policy_rejects_bad_names_and_options(name: str, options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        create_policy(name, **options)


# ---- cache_aware ----


def test_shared_prefix_sticks_to_one_worker() -> None:
    policy = CacheAwarePolicy()
    rng = random.Random(0)
    system = noise(rng, 500)
    first = policy.select(pool(), system + "question 0", ())
    assert policy.last_decision is not None and policy.last_decision.reason == "smallest_tree"
    for i in range(1, 20):
        chosen = policy.select(pool(), system + f"question {i}", ())
        assert chosen.address == first.address
        assert policy.last_decision.reason == "cache_hit"
        assert policy.last_decision.match_len >= 500


def test_distinct_prefixes_spread_over_workers() -> None:
    policy = CacheAwarePolicy()
    rng = random.Random(1)
    chosen = [policy.select(pool(), noise(rng, 300), ()).address for _ in range(8)]
    # Each new family goes to the worker holding the least, so 8 equal-size families pair up.
    assert sorted(chosen) == sorted(ADDRS * 2)
    assert len(set(policy.text_tree.sizes().values())) == 1


def test_imbalance_overrides_cache_affinity() -> None:
    policy = CacheAwarePolicy()
    text = "a long shared system prompt " * 20
    home = policy.select(pool(), text + "1", ()).address
    assert home == ADDRS[0]  # all empty and idle: lowest address
    # 20 more in flight than the least loaded: within balance_abs_threshold, affinity wins.
    assert policy.select(pool(20, 0, 0, 0), text + "2", ()).address == home
    # 40 more and 40 > 1.0001 * 0: imbalanced, the least loaded (lowest address among ties) wins.
    assert policy.select(pool(40, 3, 0, 0), text + "3", ()).address == ADDRS[2]
    assert policy.last_decision is not None and policy.last_decision.reason == "imbalanced"
    # The tree now also credits that worker, so a hit may go to either holder: the less loaded one.
    assert policy.select(pool(5, 9, 1, 0), text + "3", ()).address == ADDRS[2]
    # The relative condition: a spread of 40 over a floor of 100 is balanced with rel=1.5.
    relaxed = CacheAwarePolicy(balance_rel_threshold=1.5)
    relaxed.select(pool(), text, ())
    assert relaxed.select(pool(140, 100, 100, 100), text, ()).address == ADDRS[0]


def test_absent_and_removed_workers_are_never_chosen() -> None:
    policy = CacheAwarePolicy()
    text = "shared prefix for everything " * 10
    assert policy.select(pool(), text + "x", ()).address == ADDRS[0]
    # ADDRS[0] draining: not passed in, so its matching tree entries must not attract requests.
    others = pool()[1:]
    chosen = policy.select(others, text + "y", ())
    assert chosen.address != ADDRS[0] and chosen in others
    # It now holds the prefix too and is the live match.
    assert policy.select(others, text + "z", ()).address == chosen.address
    policy.on_worker_removed(chosen.address)
    assert chosen.address not in policy.text_tree.tenants()
    policy.text_tree.check_invariants()
    assert policy.select(pool()[2:3], text, ()).address == ADDRS[2]


def test_token_ids_route_when_text_is_missing() -> None:
    policy = CacheAwarePolicy()
    prompt = list(range(1000, 1400))
    first = policy.select(pool(), "", [*prompt, 1]).address
    assert all(policy.select(pool(), "", [*prompt, i]).address == first for i in range(2, 10))
    assert policy.text_tree.node_count == 0 and policy.token_tree.size(first) == 400 + 9
    # An unrelated token family goes elsewhere (smallest token tree).
    assert policy.select(pool(), "", list(range(5000, 5100))).address != first


def test_empty_request_falls_back_to_smallest_tree() -> None:
    policy = CacheAwarePolicy(cache_threshold=0.0)
    policy.select(pool(), "", [1, 2, 3])  # no text: keyed by tokens
    assert policy.select(pool(), "", ()).address == ADDRS[1]
    assert policy.last_decision is not None and policy.last_decision.reason == "smallest_tree"


def test_trees_stay_under_max_tree_size() -> None:
    policy = CacheAwarePolicy(max_tree_size=2000)
    rng = random.Random(2)
    families = [noise(rng, 100) for _ in range(3)]
    for _ in range(300):
        policy.select(pool(), rng.choice(families) + noise(rng, 50), ())
        assert all(size <= 2000 for size in policy.text_tree.sizes().values())
    policy.text_tree.check_invariants()
    # Recent family prefixes survive eviction (LRU keeps what is in use).
    assert policy.text_tree.prefix_match(families[0]).match_len == 100
    assert policy.evict() == 0  # inline eviction already kept every tree under the limit


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sets(st.sampled_from(ADDRS), min_size=1), st.text("ab", max_size=12), st.booleans()),
        min_size=1,
        max_size=30,
    )
)
def test_cache_aware_only_returns_passed_workers(steps: list[tuple[set[str], str, bool]]) -> None:
    policy = CacheAwarePolicy(balance_abs_threshold=2)
    for live, text, remove_one in steps:
        workers = [WorkerView(a, len(text) % 5) for a in sorted(live)]
        chosen = policy.select(workers, text, [ord(c) for c in text])
        assert any(chosen is w for w in workers)
        if remove_one:
            policy.on_worker_removed(chosen.address)
    policy.text_tree.check_invariants()
    policy.token_tree.check_invariants()


# ---- simple policies ----


def test_round_robin_cycles_in_address_order_as_the_pool_changes() -> None:
    policy = RoundRobinPolicy()
    shuffled = list(reversed(pool()))
    assert [policy.select(shuffled, "", ()).address for _ in range(5)] == [*ADDRS, ADDRS[0]]
    # ADDRS[0] just served; with ADDRS[1] gone, the next in order is ADDRS[2].
    fewer = [w for w in pool() if w.address != ADDRS[1]]
    assert [policy.select(fewer, "", ()).address for _ in range(3)] == [ADDRS[2], ADDRS[3], ADDRS[0]]
    # A newcomer slots into the cycle by address.
    grown = [*pool(), WorkerView("10.0.0.9:7000", 0)]
    assert [policy.select(grown, "", ()).address for _ in range(5)] == [*ADDRS[1:], "10.0.0.9:7000", ADDRS[0]]


def test_random_is_seeded_and_covers_all_workers() -> None:
    def picks(seed: int, workers: list[WorkerView]) -> list[str]:
        policy = create_policy("random", seed=seed)
        return [policy.select(workers, "", ()).address for _ in range(200)]

    first = picks(7, pool())
    assert first == picks(7, list(reversed(pool())))  # same seed, any listing order: same picks
    assert set(first) == set(ADDRS)
    assert all(30 <= first.count(a) <= 70 for a in ADDRS)
    assert first != picks(8, pool())


def test_least_load_picks_min_in_flight_then_active_tokens_then_address() -> None:
    policy = LeastLoadPolicy()
    assert policy.select(pool(3, 1, 2, 1), "", ()).address == ADDRS[1]
    workers = [WorkerView(ADDRS[0], 1, 900), WorkerView(ADDRS[1], 1, 500), WorkerView(ADDRS[2], 1, 500)]
    assert policy.select(workers, "", ()).address == ADDRS[1]


# ---- the routing simulation (DESIGN.md §7) ----


def test_cache_aware_hit_rate_is_at_least_3x_round_robin() -> None:
    for seed in range(3):
        rr = simulate_prefix_workload(create_policy("round_robin"), seed=seed)
        ca = simulate_prefix_workload(create_policy("cache_aware"), seed=seed)
        assert sum(rr.requests_per_worker.values()) == sum(ca.requests_per_worker.values()) == 200
        # Affinity must not starve anyone: every worker gets a real share.
        assert min(ca.requests_per_worker.values()) >= 25
        assert ca.hit_rate >= 3 * rr.hit_rate, (seed, ca.hit_rate, rr.hit_rate)
