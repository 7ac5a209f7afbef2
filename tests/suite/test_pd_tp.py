"""The PD suite with tensor parallelism: router + prefill and decode workers of `--tp-size 2`
(each an engine process with one follower rank) over loopback. Greedy outputs equal HF, every
rank's KV shard moves (NIXL where installed: one agent per rank), the router pairs workers of
the same tp_size only, and a request with no such pair is refused with a clear
FAILED_PRECONDITION."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from services.protos.tandem.router.v1 import router_pb2
from shared.transfer import nixl_available
from tests.engine.hf_reference import hf_greedy
from tests.suite.cluster import Cluster, collect
from tests.suite.test_pd import PAGE_SIZE, kv_bytes_per_token, prompts

pytestmark = pytest.mark.xdist_group("suite_pd_tp")


def test_tp2_pd_equals_hf_and_only_matching_tp_sizes_are_paired(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    transport = "nixl" if nixl_available() else "grpc"
    flags = ("--kv-transport", transport, "--tp-size", "2")
    with Cluster(tiny_llama, tmp_path_factory.mktemp("pd-tp")) as cluster:
        cluster.start_router()
        prefill, decode = cluster.start_workers(
            [("prefill", *flags, "--chunked-prefill-size", "32"), ("decode", *flags)]
        )
        batch = prompts(3, seed=11)
        for ids in batch:
            (sample,) = collect(
                cluster.generate(ids, max_new_tokens=8, temperature=0.0, ignore_eos=True)
            ).values()
            assert sample["ids"] == hf_greedy(tiny_llama, ids, 8)
            assert sample["route"].decode_worker == decode.address
        p, d = prefill.load().counters, decode.load().counters
        assert d.get("prompt_tokens_computed", 0) == 0
        # The two ranks' shards together are the whole pages (the tiny model's 2 KV heads, one a rank).
        pages = sum(-(-len(ids) // PAGE_SIZE) for ids in batch)
        assert (
            p["kv_bytes_sent"] == d["kv_bytes_received"] == pages * PAGE_SIZE * kv_bytes_per_token(tiny_llama)
        )
        prefill.wait_released()
        decode.wait_released()

        # A decode worker of tp_size 1 joins: the router pairs the prefill worker only with the
        # decode worker of its tp_size, and refuses when that one is drained.
        (single,) = cluster.start_workers([("decode", "--kv-transport", transport)])
        for i in range(4):
            (sample,) = collect(cluster.generate([*batch[0], i], max_new_tokens=2)).values()
            assert sample["route"].decode_worker == decode.address
        cluster.admin.DrainWorker(router_pb2.DrainWorkerRequest(address=decode.address), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            cluster.generate(batch[0], max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no prefill worker can hand its KV to a decode worker" in err.value.details()
        assert "tp_size 2" in err.value.details() and "tp_size 1" in err.value.details()
        single.wait_released()
