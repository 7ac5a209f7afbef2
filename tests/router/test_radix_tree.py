"""The router's approximate radix tree: unit tests and a stateful comparison against a naive model."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shared.routing.radix_tree import PrefixMatch, RadixTree, common_prefix_len


def prefixes(keys: set[str] | list[str]) -> set[str]:
    """Every non-empty prefix of `keys`: what a tenant holding them holds, one element per entry."""
    return {k[:i] for k in keys for i in range(1, len(k) + 1)}


def text_keys(tree: RadixTree, tenant: str) -> list[str]:
    """`tree.keys(tenant)` of a text tree, sorted."""
    keys = tree.keys(tenant)
    assert all(isinstance(k, str) for k in keys)
    return sorted(str(k) for k in keys)


def test_common_prefix_len() -> None:
    assert common_prefix_len("abc", "xxabd", 2) == 2
    assert common_prefix_len("abc", "abc", 0) == 3
    assert common_prefix_len("abcdef", "abc", 0) == 3
    assert common_prefix_len("abc", "zzz", 0) == 0
    long = "x" * 1000
    assert common_prefix_len(long + "a", long + "b", 0) == 1000
    assert common_prefix_len(long[:130] + "a" + long, long, 0) == 130  # mismatch past a block boundary
    assert common_prefix_len((1, 2, 3), (9, 1, 2, 4), 1) == 2


def test_insert_match_and_split() -> None:
    tree = RadixTree()
    tree.insert("apple", "w1")
    assert tree.node_count == 1
    tree.insert("apricot", "w1")  # splits "apple" into "ap" -> {"ple", "ricot"}
    assert tree.node_count == 3
    tree.check_invariants()
    assert tree.size("w1") == len(prefixes(["apple", "apricot"])) == 10
    assert tree.prefix_match("apple pie") == PrefixMatch(5, frozenset({"w1"}))
    assert tree.prefix_match("apx") == PrefixMatch(2, frozenset({"w1"}))
    assert tree.prefix_match("ap") == PrefixMatch(2, frozenset({"w1"}))
    assert tree.prefix_match("zebra") == PrefixMatch(0, frozenset({"w1"}))  # root: every tenant
    assert text_keys(tree, "w1") == ["apple", "apricot"]
    tree.insert("app", "w1")  # a prefix of a held key adds nothing
    assert tree.size("w1") == 10
    tree.insert("", "w2")  # registers w2 with nothing held
    assert tree.sizes() == {"w1": 10, "w2": 0}
    assert tree.prefix_match("") == PrefixMatch(0, frozenset({"w1", "w2"}))
    tree.check_invariants()


def test_multi_tenant_match_and_filter() -> None:
    tree = RadixTree()
    tree.insert("apple", "w1")
    tree.insert("apricot", "w2")
    tree.insert("apple sauce", "w3")
    tree.check_invariants()
    assert tree.prefix_match("apple pie") == PrefixMatch(6, frozenset({"w3"}))  # "apple " on w3 only
    assert tree.prefix_match("apple") == PrefixMatch(5, frozenset({"w1", "w3"}))
    assert tree.prefix_match("apz") == PrefixMatch(2, frozenset({"w1", "w2", "w3"}))
    # Restricted to live workers, a deeper match held only by a filtered-out tenant does not count.
    assert tree.prefix_match("apple pie", {"w1", "w2"}) == PrefixMatch(5, frozenset({"w1"}))
    assert tree.prefix_match("apple pie", {"w2"}) == PrefixMatch(2, frozenset({"w2"}))
    assert tree.prefix_match("apple pie", set()) == PrefixMatch(0, frozenset())
    assert tree.sizes() == {"w1": 5, "w2": 7, "w3": 11}


def test_token_keys() -> None:
    tree = RadixTree()
    tree.insert((1, 2, 3, 4), "w1")
    tree.insert((1, 2, 9), "w2")
    tree.check_invariants()
    assert tree.prefix_match((1, 2, 3, 7)) == PrefixMatch(3, frozenset({"w1"}))
    assert tree.prefix_match((1, 2)) == PrefixMatch(2, frozenset({"w1", "w2"}))
    assert tree.keys("w1") == [(1, 2, 3, 4)]
    assert tree.sizes() == {"w1": 4, "w2": 3}


def test_unicode_text() -> None:
    tree = RadixTree()
    tree.insert("日本語のテキスト", "w1")
    tree.insert("日本語の文章", "w2")
    assert tree.prefix_match("日本語のテスト") == PrefixMatch(5, frozenset({"w1"}))
    assert tree.sizes() == {"w1": 8, "w2": 6}
    tree.check_invariants()


def test_remove_tenant() -> None:
    tree = RadixTree()
    tree.insert("shared prefix one", "w1")
    tree.insert("shared prefix two", "w2")
    tree.insert("only w1", "w1")
    tree.remove_tenant("w1")
    tree.check_invariants()
    assert tree.tenants() == ["w2"]
    assert tree.sizes() == {"w2": len("shared prefix two")}
    assert tree.prefix_match("shared prefix one") == PrefixMatch(len("shared prefix "), frozenset({"w2"}))
    assert tree.prefix_match("only w1") == PrefixMatch(0, frozenset({"w2"}))
    tree.remove_tenant("w2")
    tree.remove_tenant("never-seen")  # no-op
    assert tree.node_count == 0 and tree.sizes() == {}
    tree.check_invariants()


def test_eviction_follows_lru_order() -> None:
    tree = RadixTree()
    for key in ("aaaa", "bbbb", "cccc"):
        tree.insert(key, "w1")
    tree.insert("aaaa", "w1")  # touch: "bbbb" is now the least recently used
    assert tree.evict_tenant("w1", 8) == 4
    assert text_keys(tree, "w1") == ["aaaa", "cccc"]
    assert tree.evict_tenant("w1", 8) == 0  # already within the limit
    assert tree.evict_tenant("w1", 5) == 4  # then "cccc"
    assert text_keys(tree, "w1") == ["aaaa"]
    assert tree.evict_tenant("w1", 0) == 4
    assert tree.sizes() == {"w1": 0} and tree.node_count == 0
    assert "w1" in tree.tenants()  # still registered: eviction forgets content, not the worker
    tree.check_invariants()


def test_eviction_climbs_from_leaves_and_spares_other_tenants() -> None:
    tree = RadixTree()
    tree.insert("system prompt: question 1", "w1")
    tree.insert("system prompt: question 2", "w1")
    tree.insert("system prompt: other", "w2")
    tree.insert("system prompt: question 2", "w1")  # freshest
    # Evicting to 16 drops "1", then "2" leaves "system prompt: question" (23) -> its "question"
    # edge (8) goes too: leaves first, then the parent each one exposes.
    tree.evict_tenant("w1", 16)
    tree.check_invariants()
    assert text_keys(tree, "w1") == ["system prompt: "]
    assert tree.size("w1") == 15
    assert text_keys(tree, "w2") == ["system prompt: other"]  # w2's copy of the shared prefix survives
    assert tree.prefix_match("system prompt: other") == PrefixMatch(20, frozenset({"w2"}))


def test_evict_all_over_limit_to_target() -> None:
    tree = RadixTree()
    for i in range(50):
        tree.insert(f"request number {i:03d} with some text", "big")
    tree.insert("tiny", "small")
    before = tree.size("big")
    evicted = tree.evict(max_size=200, target_size=100)
    tree.check_invariants()
    assert tree.size("big") <= 100 and evicted == before - tree.size("big")
    assert tree.size("small") == 4
    # The survivors are the most recent requests.
    assert all(int(k[15:18]) >= 40 for k in text_keys(tree, "big") if len(k) > 18)


# ---- stateful comparison against a naive model ----

TENANTS = ["w0", "w1", "w2"]
keys_st = st.text(alphabet="ab c", max_size=10)


class TreeVsModel(RuleBasedStateMachine):
    """Model: per registered tenant, the set of strings it holds (always including "")."""

    def __init__(self) -> None:
        super().__init__()
        self.tree = RadixTree()
        self.model: dict[str, set[str]] = {}

    @rule(key=keys_st, tenant=st.sampled_from(TENANTS))
    def insert(self, key: str, tenant: str) -> None:
        self.tree.insert(key, tenant)
        self.model.setdefault(tenant, {""}).add(key)

    @rule(tenant=st.sampled_from(TENANTS))
    def remove(self, tenant: str) -> None:
        self.tree.remove_tenant(tenant)
        self.model.pop(tenant, None)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), limit=st.integers(0, 25))
    def evict(self, data: st.DataObject, limit: int) -> None:
        tenant = data.draw(st.sampled_from(sorted(self.model)))
        others = {t: text_keys(self.tree, t) for t in self.model if t != tenant}
        self.tree.evict_tenant(tenant, limit)
        assert self.tree.size(tenant) <= limit
        kept = set(text_keys(self.tree, tenant))
        # Eviction only shortens what the tenant held, and never touches another tenant.
        assert prefixes(kept) <= prefixes(self.model[tenant])
        assert {t: text_keys(self.tree, t) for t in others} == others
        self.model[tenant] = kept | {""}

    @rule(key=keys_st, only=st.none() | st.sets(st.sampled_from(TENANTS)))
    def match(self, key: str, only: set[str] | None) -> None:
        live = {t: held for t, held in self.model.items() if only is None or t in only}

        def reach(held: set[str]) -> int:
            return max(common_prefix_len(s, key, 0) for s in held)

        best = max((reach(held) for held in live.values()), default=0)
        expected = PrefixMatch(best, frozenset(t for t, held in live.items() if reach(held) == best))
        assert self.tree.prefix_match(key, only) == expected

    @invariant()
    def consistent(self) -> None:
        self.tree.check_invariants()
        assert set(self.tree.tenants()) == set(self.model)
        for tenant, held in self.model.items():
            assert self.tree.size(tenant) == len(prefixes(held))
            assert prefixes(text_keys(self.tree, tenant)) == prefixes(held)


TreeVsModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_tree_matches_naive_model = TreeVsModel.TestCase


token_keys = st.lists(st.integers(0, 3), max_size=8).map(tuple)


@settings(max_examples=200, deadline=None)
@given(st.lists(token_keys, min_size=1, max_size=12), token_keys)
def test_token_match_is_longest_common_prefix(keys: list[tuple[int, ...]], probe: tuple[int, ...]) -> None:
    """Single tenant, token keys: the match is the longest common prefix with any inserted key."""
    tree = RadixTree()
    for key in keys:
        tree.insert(key, "w")
    tree.check_invariants()
    expected = max(common_prefix_len(k, probe, 0) for k in keys)
    assert tree.prefix_match(probe) == PrefixMatch(expected, frozenset({"w"}))
    assert tree.size("w") == len({k[:i] for k in keys for i in range(1, len(k) + 1)})
