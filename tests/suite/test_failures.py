"""Failures over real processes: a client that disconnects, a decode worker killed mid-stream,
a prefill worker killed while idle, a worker shut down with streams open. The caller gets a
prompt, clear error (or a retry before the first token), no worker keeps KV for a dead
request, and the suite keeps serving."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.common.multiplex import Multiplexer
from services.launcher import free_port
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.router.v1 import router_pb2
from services.protos.tandem.worker.v1 import worker_pb2, worker_pb2_grpc
from shared.transfer import nixl_available
from tests.suite.cluster import Cluster, Service, collect

pytestmark = pytest.mark.xdist_group("suite_failures")

PROMPT = list(range(10, 40))


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tiny_llama, tmp_path_factory.mktemp("failures")) as c:
        c.start_router("--heartbeat-interval", "0.5")
        c.start_workers([("prefill",), ("prefill",), ("decode",), ("decode",)])
        yield c


def by_address(cluster: Cluster, address: str) -> Service:
    return next(s for s in cluster.services if s.address == address)


def long_stream(cluster: Cluster) -> Iterator[router_pb2.GenerateResponse]:
    return cluster.stub.Generate(
        cluster.request(PROMPT, max_new_tokens=900, temperature=0.0, ignore_eos=True), timeout=120
    )


def test_client_disconnect_frees_both_workers(cluster: Cluster) -> None:
    stream = long_stream(cluster)
    first = next(stream)
    for _ in range(3):
        next(stream)
    stream.cancel()  # type: ignore[attr-defined]
    prefill = by_address(cluster, first.route.prefill_worker)
    decode = by_address(cluster, first.route.decode_worker)
    decode.wait_released()
    prefill.wait_released()
    assert decode.load().counters["generated_tokens"] < 900  # it stopped, not ran to the end
    assert collect(cluster.generate(PROMPT, max_new_tokens=3))[0]["finish"] is not None


def test_decode_worker_killed_mid_stream(cluster: Cluster) -> None:
    stream = long_stream(cluster)
    first = next(stream)
    for _ in range(3):
        next(stream)
    victim = by_address(cluster, first.route.decode_worker)
    prefill = by_address(cluster, first.route.prefill_worker)
    victim.kill()
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert time.monotonic() - start < 5
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert victim.address in err.value.details()
    prefill.wait_released()
    assert cluster.worker_state(victim.address) == router_pb2.WORKER_STATE_UNHEALTHY
    for _ in range(3):  # every next request lands on the surviving decode worker
        sample = collect(cluster.generate(PROMPT, max_new_tokens=3))[0]
        assert sample["finish"] is not None and sample["route"].decode_worker != victim.address


def test_prefill_worker_killed_is_retried_before_the_first_token(cluster: Cluster) -> None:
    healthy = [s for s in cluster.services if s.name.startswith("prefill") and s.process.poll() is None]
    assert len(healthy) == 2
    healthy[0].kill()
    # The router has not noticed yet (heartbeats lag); requests that pick the dead worker are
    # retried on the other one, and the dead one is taken out of rotation.
    for i in range(4):
        sample = collect(cluster.generate([*PROMPT, i], max_new_tokens=3))[0]
        assert sample["finish"] is not None and sample["route"].prefill_worker == healthy[1].address
    cluster.wait(
        lambda: cluster.worker_state(healthy[0].address) == router_pb2.WORKER_STATE_UNHEALTHY, "probe"
    )


def test_a_dead_engine_takes_its_worker_down_and_others_serve(tiny_llama: Path, tmp_path: Path) -> None:
    with Cluster(tiny_llama, tmp_path) as cluster:
        cluster.start_router("--heartbeat-interval", "0.5", "--heartbeat-timeout", "1")
        victim, survivor = cluster.start_workers([("unified",), ("unified",)])
        os.kill(victim.engine_pid(), signal.SIGKILL)
        deadline = time.monotonic() + 5  # it leaves the router's list itself
        while cluster.worker_state(victim.address) is not None:
            assert time.monotonic() < deadline, cluster.worker_state(victim.address)
            time.sleep(0.1)
        assert victim.process.wait(10) == 1  # shut down, for its supervisor to start a fresh one
        assert "the engine is gone" in cluster.logs()
        for _ in range(4):  # every request now goes to the survivor
            out = collect(cluster.generate(PROMPT, max_new_tokens=3))[0]
            assert out["finish"] is not None and out["route"].decode_worker == survivor.address


def test_a_worker_started_before_its_router_registers_once_it_answers(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """As `tandem up` starts them (all at once) or a cluster's pods come up: the worker waits for
    the router's admin port without a failed attempt in its log, and serves once registered."""
    with Cluster(tiny_llama, tmp_path) as cluster:
        admin_port = free_port()
        cluster.admin_address = f"127.0.0.1:{admin_port}"
        (worker,) = cluster.start_workers([("unified",)], wait=False)
        cluster.wait(lambda: "serving on" in worker.log.read_text(), "the worker's server")
        time.sleep(0.5)  # its registration is under way, towards a port nobody listens on
        cluster.start_router(admin_port=admin_port)
        cluster.wait(
            lambda: cluster.worker_state(worker.address) == router_pb2.WORKER_STATE_HEALTHY,
            "its registration",
        )
        log = worker.log.read_text()
        assert "registered with the router" in log
        assert f"router {cluster.admin_address}:" not in log  # no failed attempt was logged
        assert collect(cluster.generate(PROMPT, max_new_tokens=3))[0]["finish"] is not None


@pytest.mark.skipif(not nixl_available(), reason="NIXL is not installed")
def test_a_decode_worker_started_again_in_place_replaces_its_old_engine_in_prefill(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """A decode worker killed and started again at the same address is a new engine with a new
    NIXL agent: the prefill worker drops the dead one's agent when it first sends to the new
    one, so its engine knows one decode agent, not two."""
    with Cluster(tiny_llama, tmp_path) as cluster:
        cluster.start_router()
        prefill, decode = cluster.start_workers(
            [("prefill", "--kv-transport", "nixl"), ("decode", "--kv-transport", "nixl")]
        )
        assert collect(cluster.generate(PROMPT, max_new_tokens=3))[0]["finish"] is not None
        assert prefill.load().counters["kv_peers"] == 1
        decode.kill()
        port = int(decode.address.rpartition(":")[2])
        # Its address may still be listed healthy from before the kill: wait for its own registration.
        again = cluster.start_worker("decode", "--kv-transport", "nixl", port=port, register=True, wait=False)
        assert again.address == decode.address
        cluster.wait(lambda: "registered with the router" in again.log.read_text(), "its registration")
        healthy = router_pb2.WORKER_STATE_HEALTHY
        cluster.wait(lambda: cluster.worker_state(again.address) == healthy, "the decode worker healthy")
        out = collect(cluster.generate(PROMPT, max_new_tokens=3))[0]
        assert out["finish"] is not None and out["route"].decode_worker == again.address
        assert prefill.load().counters["kv_peers"] == 1


def test_a_worker_shutting_down_refuses_new_streams_and_finishes_open_ones(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """SIGTERM: the server refuses new calls, and the worker refuses new streams of a GenerateMany
    call already open (UNAVAILABLE: the router would try another worker), while the streams
    running finish within the grace period."""

    def request(rid: str, max_new_tokens: int) -> worker_pb2.GenerateRequest:
        params = common_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
        return worker_pb2.GenerateRequest(rid=rid, token_ids=PROMPT, sampling_params=params)

    async def tokens(call: object) -> list[int]:
        return [t async for r in call for t in r.output.token_ids]  # type: ignore[attr-defined]

    async def main(worker: Service) -> None:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            await stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=90, wait_for_ready=True)
            mux = Multiplexer(stub, worker_pb2)
            running = mux.Generate(request("running", 200)).__aiter__()
            first = await anext(running)
            worker.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while True:  # until the worker has taken the signal in
                try:
                    await tokens(mux.Generate(request("new", 1)))
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    assert exc.details() == "the worker is shutting down"
                    break
                assert time.monotonic() < deadline, "the worker took new streams after SIGTERM"
                await asyncio.sleep(0.05)
            rest = [t async for r in running for t in r.output.token_ids]
            assert len(first.output.token_ids) + len(rest) == 200

    with Cluster(tiny_llama, tmp_path) as cluster:
        worker = cluster.start_worker("unified", register=False)
        asyncio.run(main(worker))
        assert worker.process.wait(timeout=30) == 0
