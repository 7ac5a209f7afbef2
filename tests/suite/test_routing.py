"""Cache-aware routing over real prefill workers: requests sharing a prefix land on the same
worker and are served from its radix cache; round robin spreads them; workers added and removed
at runtime get and stop getting traffic."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.protos.tandem.router.v1 import router_pb2
from tests.suite.cluster import Cluster, Service, collect

pytestmark = pytest.mark.xdist_group("suite_routing")


@pytest.fixture(scope="module")
def workers(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, list[Service]]]:
    """Two prefill workers and one decode worker, registered with a cache-aware router."""
    with Cluster(tiny_llama, tmp_path_factory.mktemp("routing")) as cluster:
        cluster.start_router("--prefill-policy", "cache_aware")
        *prefills, _ = cluster.start_workers(
            [("prefill", "--kv-transport", "grpc")] * 2 + [("decode", "--kv-transport", "grpc")]
        )
        yield cluster, prefills


def group_prompts(groups: int, per_group: int, seed: int) -> list[tuple[int, str]]:
    """Texts of `groups` long shared prefixes, each with short distinct suffixes, interleaved."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta"]
    prefixes = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(groups)]
    return [(g, f"{prefixes[g]} question {i}") for i in range(per_group) for g in range(groups)]


def run(cluster: Cluster, router: str, text: str) -> dict[str, object]:
    import grpc

    from services.protos.tandem.router.v1 import router_pb2_grpc

    with grpc.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        responses = list(
            stub.Generate(cluster.request(text=text, max_new_tokens=2, temperature=0.0), timeout=60)
        )
    return collect(responses)[0]


def test_cache_aware_keeps_prefixes_together_and_hits_the_cache(
    workers: tuple[Cluster, list[Service]],
) -> None:
    cluster, _ = workers
    where: dict[int, set[str]] = {}
    cached: dict[int, list[int]] = {}
    for group, text in group_prompts(groups=4, per_group=4, seed=0):
        sample = run(cluster, cluster.router, text)
        where.setdefault(group, set()).add(sample["route"].prefill_worker)  # type: ignore[attr-defined]
        cached.setdefault(group, []).append(sample["usage"].cached_tokens)  # type: ignore[attr-defined]
    assert all(len(addresses) == 1 for addresses in where.values()), where
    assert len(set().union(*where.values())) == 2  # distinct prefixes spread over both workers
    for tokens in cached.values():
        assert tokens[0] == 0 and min(tokens[1:]) >= 32  # later requests reuse the prefix's pages


def test_round_robin_spreads_a_shared_prefix(workers: tuple[Cluster, list[Service]]) -> None:
    cluster, prefills = workers
    # A second router over the same workers, with round robin for prefill.
    other = Cluster(Path(cluster.model), cluster.log_dir / "rr")
    other.log_dir.mkdir()
    try:
        flags = [
            f"--worker={w.address}"
            for w in [*prefills, *[s for s in cluster.services if s.name == "decode-0"]]
        ]
        other.start_router("--prefill-policy", "round_robin", *flags)
        other.wait(lambda: len([w for w in other._list_workers() or [] if w.state == 1]) == 3, "workers")
        chosen = [
            run(other, other.router, text)["route"].prefill_worker  # type: ignore[attr-defined]
            for _, text in group_prompts(groups=1, per_group=4, seed=1)
        ]
        assert Counter(chosen) == Counter({prefills[0].address: 2, prefills[1].address: 2})
    finally:
        other.close()


def test_workers_join_and_leave_at_runtime(workers: tuple[Cluster, list[Service]]) -> None:
    cluster, prefills = workers
    admin = cluster.admin
    # Drain one prefill worker: everything goes to the other.
    admin.DrainWorker(router_pb2.DrainWorkerRequest(address=prefills[0].address), timeout=5)
    texts = [text for _, text in group_prompts(groups=3, per_group=1, seed=2)]
    assert {run(cluster, cluster.router, t)["route"].prefill_worker for t in texts} == {prefills[1].address}  # type: ignore[attr-defined]
    # Remove it and add it back: to the router it is a fresh worker (smallest tree), so it gets
    # new prefixes again.
    admin.RemoveWorker(router_pb2.RemoveWorkerRequest(address=prefills[0].address), timeout=5)
    assert prefills[0].address not in {w.address for w in cluster._list_workers() or []}
    admin.RegisterWorker(router_pb2.RegisterWorkerRequest(address=prefills[0].address), timeout=10)
    texts = [text for _, text in group_prompts(groups=2, per_group=1, seed=3)]
    assert {run(cluster, cluster.router, t)["route"].prefill_worker for t in texts} == {prefills[0].address}  # type: ignore[attr-defined]
    # A worker that starts later registers itself and takes traffic.
    late = cluster.start_worker("prefill", "--kv-transport", "grpc")
    texts = [text for _, text in group_prompts(groups=6, per_group=1, seed=4)]
    assert late.address in {run(cluster, cluster.router, t)["route"].prefill_worker for t in texts}  # type: ignore[attr-defined]
