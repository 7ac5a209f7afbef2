"""A full decode worker queues reservations instead of refusing them: a request that arrives
while the decode pool is taken waits for room and then completes."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.protos.tandem.worker.v1 import worker_pb2, worker_pb2_grpc
from tests.engine.hf_reference import hf_greedy
from tests.suite.cluster import Cluster, Service, collect

pytestmark = pytest.mark.xdist_group("suite_capacity")


@pytest.fixture(scope="module")
def small_decode(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, Service]]:
    with Cluster(tiny_llama, tmp_path_factory.mktemp("capacity")) as cluster:
        cluster.start_router()
        # 64 KV tokens: one 40-token prompt with 20 new tokens fills the decode pool. While a
        # prompt is expected the decode engine steps 50 ms apart (pacing with no backlog bound).
        _, decode = cluster.start_workers(
            [
                ("prefill", "--kv-transport", "grpc"),
                (
                    *("decode", "--kv-transport", "grpc", "--max-total-tokens", "64"),
                    *("--decode-step-interval-ms", "50", "--decode-pacing-backlog", "0"),
                ),
            ]
        )
        yield cluster, decode


@contextlib.contextmanager
def expected_prompt(decode: Service) -> Iterator[None]:
    """A prompt the decode worker expects and whose KV never comes (no prefill leg is started):
    it holds no pages, and keeps the decode engine pacing its steps 50 ms apart for as long as
    it is open, so a request decoding meanwhile takes a second for its 20 tokens however fast
    the machine is. Cancelled on exit."""
    with grpc.insecure_channel(decode.address) as channel:
        stub = worker_pb2_grpc.DecodeServiceStub(channel)
        request = worker_pb2.GenerateRequest(rid="expected", token_ids=[7, 8, 9], stall_timeout_ms=60_000)
        call = stub.Generate(request, timeout=120, metadata=decode.metadata)
        try:
            assert next(call).HasField("reservation")
            deadline = time.monotonic() + 10
            while decode.load().counters.get("kv_prompts_expected", 0) < 1:
                assert time.monotonic() < deadline, "the decode engine did not take the prompt"
                time.sleep(0.02)
            yield
        finally:
            call.cancel()


def test_second_request_waits_for_room_then_completes(
    small_decode: tuple[Cluster, Service], tiny_llama: Path
) -> None:
    cluster, decode = small_decode
    first, second = list(range(10, 50)), list(range(60, 100))
    params = {"max_new_tokens": 20, "temperature": 0.0, "ignore_eos": True}
    counters = decode.load().counters
    before, queued_before = counters.get("kv_reservations", 0), counters.get("kv_reservations_queued", 0)
    results: dict[str, object] = {}

    def run_second() -> None:
        results["second"] = collect(cluster.generate(second, **params))[0]

    with expected_prompt(decode):
        stream = cluster.stub.Generate(cluster.request(first, **params), timeout=60)
        head = [next(stream)]  # the first request holds the decode pool now, for about a second
        thread = threading.Thread(target=run_second)
        thread.start()
        rest = list(stream)
    thread.join(60)
    a = collect(head + rest)[0]
    b = results["second"]
    assert a["ids"] == hf_greedy(tiny_llama, first, 20)
    assert b["ids"] == hf_greedy(tiny_llama, second, 20)  # type: ignore[index]
    counters = decode.load().counters
    assert counters["kv_reservations"] - before == 2
    assert counters["kv_reservations_queued"] - queued_before == 1  # the second one waited
    cluster.wait(lambda: decode.load().counters["kv_prompts_expected"] == 0, "the cancelled prompt to go")
    assert decode.load().kv_used_tokens == 0


def test_router_refuses_past_its_in_flight_bound_and_recovers(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with Cluster(tiny_llama, tmp_path_factory.mktemp("admission")) as cluster:
        cluster.start_router("--max-in-flight", "1")
        cluster.start_workers([("prefill", "--kv-transport", "grpc"), ("decode", "--kv-transport", "grpc")])
        params = {"max_new_tokens": 200, "temperature": 0.0, "ignore_eos": True}
        held = cluster.stub.Generate(cluster.request(list(range(10, 30)), **params), timeout=60)
        next(held)  # one sample in flight: the bound
        with pytest.raises(grpc.RpcError) as err:
            collect(cluster.generate(list(range(10, 20)), max_new_tokens=2))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at capacity" in err.value.details()
        held.cancel()
        deadline = time.monotonic() + 10
        while True:  # served again once the held request is gone
            try:
                assert collect(cluster.generate(list(range(10, 20)), max_new_tokens=2))[0]["finish"]
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.05)
