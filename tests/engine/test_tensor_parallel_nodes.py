"""Multi-node tensor parallelism on one machine: node 0 is an engine process (EngineClient), node 1
a real worker process started as on a second machine (`python -m services.worker --node-rank 1`),
meeting at node 0's store on 127.0.0.1 (`dist_init_addr`); gloo between all ranks. HF
transformers is the oracle, as for one node (tests/engine/test_tensor_parallel.py)."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.startup import children
from services.launcher import free_port
from shared.engine_core import RequestOutput
from shared.inputs import Prompt
from tests.engine.hf_reference import hf_greedy
from tests.engine.test_tensor_parallel import (
    GREEDY,
    PROMPTS,
    assert_fails_and_exits,
    run_all,
    tp_client,
)
from tests.suite.cluster import running
from tests.suite.test_observability import documented_metrics


@contextlib.contextmanager
def node1(path: Path, addr: str, tp_size: int, log: Path, *flags: str) -> Iterator[subprocess.Popen[bytes]]:
    """Node 1's worker. Only the layout flags: its ranks take node 0's other options (page size,
    chunking) from the group's store."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "services.worker", "--model", str(path), "--device", "cpu"),
                *("--tp-size", str(tp_size), "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", addr),
                *("--port", "0", *flags),  # a later --port wins
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_two_nodes_give_the_tokens_of_one(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> None:
    # 4 ranks, 2 per node: node 0 starts a follower of its own, node 1's worker two.
    path = tiny_model_factory("llama")
    addr, health_port, metrics_port = f"127.0.0.1:{free_port()}", free_port(), free_port()
    flags = ("--port", str(health_port), "--metrics-port", str(metrics_port))
    with node1(path, addr, 4, tmp_path / "node1.log", *flags) as worker:
        client = tp_client(path, tp_size=4, nnodes=2, node_rank=0, dist_init_addr=addr)
        try:
            got = run_all(client, PROMPTS)
            again = run_all(client, PROMPTS[1:2])  # a prefix-cache hit on rank 0
            # Node 1 takes no requests but answers health checks (one pod template for all nodes).
            with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # ... and Prometheus scrapes (one scrape config for all nodes): its two ranks run.
            families = {
                f.name: f
                for f in text_string_to_metric_families(
                    httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
                )
            }
            (ranks,) = families["tandem_node_ranks_running"].samples
            assert ranks.labels == {"node_rank": "1"} and ranks.value == 2
            assert all(name in families for name in documented_metrics()["node"])  # docs/observability.md
            assert "process_cpu_seconds" in families
        finally:
            client.shutdown()
        assert worker.wait(30) == 0, (tmp_path / "node1.log").read_text()  # rank 0 stopped the group
    for i, ids in enumerate(PROMPTS):
        assert got[str(i)] == hf_greedy(path, ids, GREEDY["max_new_tokens"]), i
    assert again["0"] == got["1"]


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the ranks through /proc")
def test_a_dead_node_fails_the_request_and_node_0s_engine_exits(tiny_llama: Path, tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    with node1(tiny_llama, addr, 2, tmp_path / "node1.log") as worker:
        client = tp_client(tiny_llama, nnodes=2, node_rank=0, dist_init_addr=addr)
        try:
            outputs: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()
            client.add(
                ["doomed"], Prompt([5, 6, 7], {"max_new_tokens": 100000, "ignore_eos": True}), outputs.put
            )
            first = outputs.get(timeout=60)
            assert isinstance(first, RequestOutput) and not first.finished
            (rank1,) = children(worker.pid)
            worker.send_signal(signal.SIGKILL)  # the whole node: its rank dies with its worker
            assert_fails_and_exits(client, outputs, first)
            deadline = time.monotonic() + 10
            while running(rank1) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not running(rank1)  # no orphan rank left behind on node 1
        finally:
            client.shutdown()


def test_a_node_that_never_joins_fails_start_up_after_dist_timeout(tiny_llama: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(RuntimeError) as failed:
        tp_client(tiny_llama, nnodes=2, node_rank=0, dist_init_addr=addr, dist_timeout=2)
    assert time.monotonic() - start < 60  # not the 300 s default
    message = str(failed.value)
    assert "not every tensor-parallel rank joined within --dist-timeout 2 s" in message
    assert f"--dist-init-addr {addr}" in message
