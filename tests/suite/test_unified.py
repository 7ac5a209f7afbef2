"""Unified mode (no PD pair configured): the router sends whole requests to unified workers;
the admin HTTP endpoint adds, drains and removes them at runtime."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.launcher import free_port
from tests.engine.hf_reference import hf_greedy
from tests.suite.cluster import Cluster, Service, collect

pytestmark = pytest.mark.xdist_group("suite_unified")


@pytest.fixture(scope="module")
def unified(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, str, list[Service]]]:
    with Cluster(tiny_llama, tmp_path_factory.mktemp("unified")) as cluster:
        http_port = free_port()
        cluster.start_router("--admin-http-port", str(http_port), "--unified-policy", "round_robin")
        workers = cluster.start_workers([("unified",), ("unified",)])
        yield cluster, f"http://127.0.0.1:{http_port}", workers


def test_unified_greedy_equals_hf(unified: tuple[Cluster, str, list[Service]], tiny_llama: Path) -> None:
    cluster, _, workers = unified
    ids = list(range(20, 57))
    seen = set()
    for _ in range(2):
        sample = collect(cluster.generate(ids, max_new_tokens=7, temperature=0.0, ignore_eos=True))[0]
        assert sample["ids"] == hf_greedy(tiny_llama, ids, 7)
        assert sample["route"].prefill_worker == ""
        seen.add(sample["route"].decode_worker)
    assert seen == {w.address for w in workers}  # round robin over both
    for worker in workers:
        assert worker.load().counters["prompt_tokens_computed"] > 0


def test_admin_http_drain_remove_add(unified: tuple[Cluster, str, list[Service]]) -> None:
    cluster, admin, workers = unified
    listed = httpx.get(f"{admin}/workers", timeout=5).json()["workers"]
    assert {w["address"] for w in listed} == {w.address for w in workers}
    assert all(w["role"] == "unified" and w["state"] == "healthy" for w in listed)

    first, second = workers
    assert httpx.post(f"{admin}/workers/{first.address}/drain", timeout=5).status_code == 200
    routes = {
        collect(cluster.generate([5, 6, 7], max_new_tokens=2))[0]["route"].decode_worker for _ in range(4)
    }
    assert routes == {second.address}

    assert httpx.delete(f"{admin}/workers/{first.address}", timeout=5).status_code == 200
    assert httpx.delete(f"{admin}/workers/{first.address}", timeout=5).status_code == 404
    assert httpx.post(f"{admin}/workers", json={"address": "127.0.0.1:1"}, timeout=10).status_code == 503
    assert httpx.post(f"{admin}/workers", json={"address": "nonsense"}, timeout=10).status_code == 400

    assert httpx.post(f"{admin}/workers", json={"address": first.address}, timeout=10).status_code == 200
    routes = {
        collect(cluster.generate([5, 6, 7], max_new_tokens=2))[0]["route"].decode_worker for _ in range(4)
    }
    assert routes == {first.address, second.address}
