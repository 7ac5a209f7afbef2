"""Unified mode (no PD pair configured): the router sends whole requests to unified workers;
the admin HTTP endpoint adds, drains and removes them at runtime."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from services.common.errors import param_of
from services.common.multiplex import Multiplexer
from services.launcher import free_port
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.router.v1 import router_pb2, router_pb2_grpc
from services.protos.tandem.worker.v1 import worker_pb2, worker_pb2_grpc
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


def test_a_workers_generate_many_answers_as_its_generate_calls(
    unified: tuple[Cluster, str, list[Service]], tiny_llama: Path
) -> None:
    """The router's way to a worker (one GenerateMany call, services/common/multiplex.py) against
    Generate calls on a real worker: the same greedy tokens (HF's), and a cancelled stream ends
    its request in the engine while the call serves on."""
    worker = unified[2][1]
    prompts = [list(range(20 + i, 41 + 2 * i)) for i in range(6)]

    def request(rid: str, prompt: list[int], max_new_tokens: int = 7) -> worker_pb2.GenerateRequest:
        params = common_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
        return worker_pb2.GenerateRequest(rid=rid, token_ids=prompt, sampling_params=params)

    async def tokens(call: object) -> list[int]:
        out: list[int] = []
        async for response in call:  # type: ignore[attr-defined]
            out.extend(response.output.token_ids)
        return out

    async def main() -> None:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            mux = Multiplexer(stub, worker_pb2)
            many = await asyncio.gather(
                *(tokens(mux.Generate(request(f"m{i}", p))) for i, p in enumerate(prompts))
            )
            single = await asyncio.gather(
                *(tokens(stub.Generate(request(f"s{i}", p))) for i, p in enumerate(prompts))
            )
            assert many == single == [hf_greedy(tiny_llama, p, 7) for p in prompts]
            assert mux.multiplexed and mux.open_streams() == 0
            long = mux.Generate(request("long", prompts[0], max_new_tokens=200))
            async for _ in long:  # type: ignore[attr-defined]
                long.cancel()  # after its first output
                break
            deadline = time.monotonic() + 30
            while (await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)).running_requests:
                assert time.monotonic() < deadline, "the cancelled request still runs"
                await asyncio.sleep(0.05)
            assert await tokens(mux.Generate(request("after", prompts[1]))) == many[1]  # same call
            mux.close()

    asyncio.run(main())


def test_bad_streams_of_the_routers_generate_many_fail_alone_under_load(
    unified: tuple[Cluster, str, list[Service]], tiny_llama: Path
) -> None:
    """The router's public GenerateMany with 48 streams at once: good ones (HF's greedy tokens),
    bad ones (each a clear status naming its field, as Generate answers) and cancelled ones. The
    bad and the cancelled end alone; the call and the rest serve on, and nothing stays running."""
    cluster, _, workers = unified
    prompt = list(range(20, 44))
    expected = hf_greedy(tiny_llama, prompt, 5)
    greedy = {"max_new_tokens": 5, "temperature": 0.0, "ignore_eos": True}
    bad = [
        (cluster.request(prompt, n=17, **greedy), grpc.StatusCode.INVALID_ARGUMENT, "n"),
        (
            cluster.request(prompt, return_logprob=True, top_logprobs_num=21, **greedy),
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_logprobs_num",
        ),
        (cluster.request([], **greedy), grpc.StatusCode.INVALID_ARGUMENT, "text"),
        (cluster.request(prompt, temperature=-1.0, max_new_tokens=5), grpc.StatusCode.INVALID_ARGUMENT, None),
    ]
    wrong_model = cluster.request(prompt, **greedy)
    wrong_model.model = "another-model"
    bad.append((wrong_model, grpc.StatusCode.NOT_FOUND, None))

    async def good() -> list[int]:
        return [t async for r in mux.Generate(cluster.request(prompt, **greedy)) for t in r.output.token_ids]

    async def refused(request: router_pb2.GenerateRequest) -> tuple[grpc.StatusCode, str | None]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in mux.Generate(request, timeout=60):
                pass
        return info.value.code(), param_of(info.value)

    async def cancelled() -> None:
        call = mux.Generate(cluster.request(prompt, max_new_tokens=200, temperature=0.0, ignore_eos=True))
        async for _ in call:
            call.cancel()  # after the first output
            break

    async def main() -> None:
        nonlocal mux
        async with grpc.aio.insecure_channel(cluster.router) as channel:
            mux = Multiplexer(router_pb2_grpc.RouterServiceStub(channel), router_pb2)
            kinds: list[Any] = [good, cancelled, *[lambda b=b: refused(b[0]) for b in bad]]
            runs = [kinds[i % len(kinds)]() for i in range(48)]
            results = await asyncio.gather(*runs)
            for i, got in enumerate(results):
                kind = i % len(kinds)
                if kind == 0:
                    assert got == expected
                elif kind >= 2:
                    _, code, param = bad[kind - 2]
                    assert got[0] == code and (param is None or got[1] == param), (got, code, param)
            assert await good() == expected  # the same call serves on
            assert mux.multiplexed and mux.open_streams() == 0

    mux: Any = None
    asyncio.run(main())
    for worker in workers:
        worker.wait_released(timeout=30)


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
