"""DP attention on CPU: two real gloo ranks through the engine process (EngineClient), each with
its own requests and radix cache, the MLP/MoE layers sharded across both; HF transformers
(float32) is the oracle. Also the refusals and a dead rank."""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.startup import children
from shared.config import EngineConfig
from shared.distributed import dp_attention
from shared.distributed.dp_engine import Dispatcher, Tick
from shared.engine_client import EngineClient
from shared.engine_core import RequestOutput
from shared.engine_process import AbortRequest, AddRequest, Rejected, ReserveKv
from shared.inputs import Prompt
from shared.models.config import ModelConfig
from tests.engine.hf_reference import hf_greedy
from tests.engine.test_tensor_parallel import GREEDY, run_outputs
from tests.engine.test_tensor_parallel_deepseek import FP8_ALIGNED

# Cache-aware dispatch over 2 ranks: A, C, E, F on rank 0, B, D on rank 1. A (25 tokens) prefills
# in chunks of 8 while rank 1 runs the short ones, then rank 1 idles while rank 0 decodes; C
# shares A's first 12 tokens (a prefix hit on rank 0); E repeats C later (a hit of the finished
# C); F, the 6th request, shares A's first 16 tokens: round robin would send it to rank 1.
A = list(range(20, 45))
B = list(range(60, 66))
C = [*range(20, 32), 7, 8, 9]
D = [5, 6, 7]
F = [*range(20, 36), 11]
MIXED = [A, B, C, D]


def dp_client(path: Path, **options: object) -> EngineClient:
    config = EngineConfig.from_options(
        str(path),
        tp_size=2,
        enable_dp_attention=True,
        device="cpu",
        page_size=4,
        chunked_prefill_size=8,
        debug_invariants=True,
    )
    return EngineClient(dataclasses.replace(config, **options))


# Overlap: each rank's step launches its next forward (with its count exchange) before it reads
# the previous one's tokens.
@pytest.mark.parametrize(
    "options",
    [{}, {"ep_size": 2, "enable_overlap_schedule": True}],
    ids=["moe-tp", "moe-ep-overlap"],
)
def test_dp_attention_mixed_batch_matches_hf(
    tiny_model_factory: Callable[..., Path], options: dict[str, object]
) -> None:
    path = tiny_model_factory("deepseek_v3")
    client = dp_client(path, **options)
    try:
        got = run_outputs(client, MIXED)
        again = run_outputs(client, [C], first=len(MIXED))  # the 5th request: rank 0 again
        sixth = run_outputs(client, [F], first=len(MIXED) + 1)
        stats = client.stats().result(timeout=60)
    finally:
        client.shutdown()
    assert not client.process.is_alive()
    for i, prompt in enumerate(MIXED):
        assert got[str(i)].new_ids == hf_greedy(path, prompt, GREEDY["max_new_tokens"]), i
    assert got["2"].cached_tokens > 0  # C reused A's pages on rank 0
    assert again["4"].new_ids == got["2"].new_ids and again["4"].cached_tokens >= 12
    assert sixth["5"].new_ids == hf_greedy(path, F, GREEDY["max_new_tokens"])
    assert sixth["5"].cached_tokens >= 16  # on rank 0, with A's pages
    # Stats are both ranks' summed; a rank without tokens ran the others' MLPs at some steps.
    assert stats["generated_tokens"] == 6 * 6 and stats["running_requests"] == 0
    assert stats["dp_idle_forwards"] > 0
    assert stats["kv_free_tokens"] + stats["kv_evictable_tokens"] == stats["kv_total_tokens"]


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the follower through /proc")
def test_a_dead_dp_rank_fails_every_request_and_the_engine_exits(
    tiny_model_factory: Callable[..., Path],
) -> None:
    client = dp_client(tiny_model_factory("deepseek_v3"))
    try:
        outputs: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()
        endless = {"max_new_tokens": 100000, "ignore_eos": True}
        client.add(["on-rank-0"], Prompt([5, 6, 7], endless), outputs.put)
        client.add(["on-rank-1"], Prompt([8, 9, 10], endless), outputs.put)
        seen: set[str] = set()
        while seen != {"on-rank-0", "on-rank-1"}:
            item = outputs.get(timeout=60)
            assert isinstance(item, RequestOutput) and not item.finished
            seen.add(item.rid)
        assert client.process.pid is not None
        (follower,) = children(client.process.pid)
        os.kill(follower, signal.SIGKILL)
        start = time.monotonic()
        failed: list[str] = []
        while len(failed) < 2:
            got = outputs.get(timeout=30)
            if isinstance(got, RequestOutput):
                assert not got.finished
                continue
            failed.append(str(got))
        assert all("engine step failed" in f for f in failed)
        client.process.join(30)
        assert not client.process.is_alive() and time.monotonic() - start < 30
    finally:
        client.shutdown()


def test_dp_attention_is_refused_where_it_does_not_apply(tiny_model_factory: Callable[..., Path]) -> None:
    llama = tiny_model_factory("llama")
    with pytest.raises(ValueError, match="needs tp_size > 1"):
        EngineConfig.from_options(str(llama), enable_dp_attention=True)
    for mode in ("prefill", "decode"):
        with pytest.raises(ValueError, match="DP attention on prefill/decode workers"):
            EngineConfig.from_options(
                str(llama), tp_size=2, enable_dp_attention=True, disaggregation_mode=mode
            )
    # Not an MLA + MoE model: refused by the engine process before any rank starts.
    with pytest.raises(RuntimeError, match="LlamaForCausalLM is not an MLA \\+ MoE model"):
        dp_client(llama)
    v3 = ModelConfig.from_model_path(tiny_model_factory("deepseek_v3"))
    dp_attention.check_support(v3, 4)  # 4 heads do not matter: attention is whole on each rank
    dp_attention.check_support(v3, 8, ep_size=8)  # 8 experts, one per rank
    odd = dataclasses.replace(v3, hf_config={**v3.hf_config, "moe_intermediate_size": 30})
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        dp_attention.check_support(odd, 4)


def test_fp8_moe_shards_off_block_boundaries_are_refused_at_start_up(
    tiny_model_factory: Callable[..., Path],
) -> None:
    # Attention is whole (its FP8 blocks are TP=1's), but each rank's 16 of the experts' 32
    # intermediate rows split a 128-row block.
    with pytest.raises(RuntimeError, match="FP8 block scales split only on block boundaries"):
        dp_client(tiny_model_factory("deepseek_v3"), quantization="fp8")


def test_dp_attention_fp8_equals_tp1_one_request_at_a_time(tiny_model_factory: Callable[..., Path]) -> None:
    """FP8 with block-aligned MoE shards: a request alone, on rank 0 then on rank 1, gives TP=1's
    tokens. (Mixed batches are not compared: on this tiny model FP8's activation rounding turns
    the float32 differences between batch shapes into other tokens, at TP=1 too.)"""
    path = tiny_model_factory("deepseek_v3", **FP8_ALIGNED)
    tokens = []
    for options in ({"tp_size": 1, "enable_dp_attention": False}, {}):
        client = dp_client(path, quantization="fp8", **options)
        try:
            tokens.append([run_outputs(client, [p], first=i)[str(i)].new_ids for i, p in enumerate([A, B])])
        finally:
            client.shutdown()
    assert tokens[1] == tokens[0]


def test_dispatcher_round_robin_routes_aborts_and_refuses_open_ids() -> None:
    d, tick = Dispatcher(2, "round_robin"), Tick()
    for rids in (["a"], ["b1", "b2"], ["c"]):
        assert d.take(AddRequest(rids, Prompt([1, 2], {})), tick) is None
    assert [(rank, add.rids) for rank, add in tick.adds] == [(0, ["a"]), (1, ["b1", "b2"]), (0, ["c"])]
    refused = d.take(AddRequest(["b2"], Prompt([1], {})), tick)
    assert isinstance(refused, Rejected) and "already in use" in refused.message
    assert isinstance(d.take(AddRequest(["x", "x"], Prompt([1], {})), tick), Rejected)
    assert d.take(AbortRequest("b2"), tick) is None and d.take(AbortRequest("gone"), tick) is None
    assert tick.aborts == [(1, "b2")]
    assert isinstance(d.take(ReserveKv("a"), tick), Rejected)  # no PD with DP attention
    d.closed([Rejected(["c"], "invalid_request", "no")], [])
    assert sorted(d.owner) == ["a", "b1", "b2"]
    assert sorted(d.fail_all()) == ["a", "b1", "b2"] and not d.owner


def test_dispatcher_follows_cached_prefixes_and_balances_load() -> None:
    d, tick = Dispatcher(2), Tick()
    system = list(range(100, 164))
    placed: dict[str, int] = {}

    def add(rid: str, ids: list[int], n: int = 1) -> int:
        rids = [rid] if n == 1 else [f"{rid}.{i}" for i in range(n)]
        assert d.take(AddRequest(rids, Prompt(ids, {})), tick) is None
        placed[rid] = tick.adds[-1][0]
        return placed[rid]

    first = add("a", [*system, 1, 2])
    other = add("b", [7, 8, 9])  # a new prefix family: the rank holding less
    assert other != first
    for i in range(6):  # the family follows its prefix, however loaded that rank gets (under 32)
        assert add(f"a{i}", [*system, 10 + i]) == first
    assert add("c", [7, 8, 9, 4]) == other  # b's family, on b's rank
    assert d.open[first] == 7 and d.open[other] == 2
    # n samples count n against their rank; finishing and refusals give the load back.
    add("n", [*system, 99], n=3)
    d.closed([Rejected(["n.0", "n.1", "n.2"], "invalid_request", "no")], [])
    d.closed([], [RequestOutput("a0", [], "", True, None, 0, 0, 0)])
    assert d.open[first] == 6 and "a0" not in d.owner
    # Lopsided (a spread over 32 open requests): the least loaded rank, whatever it caches.
    for i in range(40):
        add(f"x{i}", [*system, 200 + i])
    assert placed["x39"] == other and d.open[other] > 2
    assert sorted(d.fail_all())[:1] == ["a"] and d.open == [0, 0]
