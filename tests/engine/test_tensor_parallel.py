"""Tensor parallelism on CPU: real torch.distributed (gloo) between real rank processes, driven
through the engine process (EngineClient); HF transformers (float32) is the oracle."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import queue
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from bench.startup import children
from shared.config import EngineConfig
from shared.distributed import parallel_state
from shared.engine_client import EngineClient
from shared.engine_core import RequestOutput
from shared.inputs import Prompt
from shared.models.config import ModelConfig
from tests.engine.hf_reference import hf_greedy
from tests.suite.cluster import running

GREEDY = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}
# Shares its first 12 tokens (3 pages of 4) with the first: the second reuses cached prefix pages.
PROMPTS = [list(range(20, 45)), [*range(20, 32), 7, 8, 9], list(range(60, 66))]


def tp_client(path: Path, **options: object) -> EngineClient:
    # Chunks of 8 tokens: the 25-token prompt prefills over several steps, beside the others.
    config = EngineConfig.from_options(
        str(path), tp_size=2, device="cpu", page_size=4, chunked_prefill_size=8, debug_invariants=True
    )
    return EngineClient(dataclasses.replace(config, **options))


def run_outputs(client: EngineClient, prompts: list[list[int]], first: int = 0) -> dict[str, RequestOutput]:
    """Admit the prompts one loop apart (continuous batching: later ones join a running batch),
    request ids from `first` on; each request's final output, carrying all of its tokens."""
    outputs: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()
    ids: dict[str, list[int]] = {}
    done: dict[str, RequestOutput] = {}
    pending = [(str(first + i), p) for i, p in enumerate(prompts)]
    while len(done) < len(prompts):
        if pending:
            rid, prompt = pending.pop(0)
            ids[rid] = []
            client.add([rid], Prompt(prompt, GREEDY), outputs.put)
        try:
            item = outputs.get(timeout=60 if not pending else 0.05)
        except queue.Empty:
            continue
        if isinstance(item, BaseException):
            raise item
        ids[item.rid] += item.new_ids
        if item.finished:
            done[item.rid] = dataclasses.replace(item, new_ids=ids[item.rid])
    return done


def run_all(client: EngineClient, prompts: list[list[int]]) -> dict[str, list[int]]:
    """Each prompt's tokens, the prompts admitted one loop apart (`run_outputs`)."""
    return {rid: out.new_ids for rid, out in run_outputs(client, prompts).items()}


@pytest.mark.parametrize(
    ("arch", "overrides", "options"),
    [
        ("llama", {"num_key_value_heads": 2}, {}),  # one KV head per rank
        # The KV head replicated on both ranks; overlap: the step's inputs include pending tokens.
        ("llama", {"num_key_value_heads": 1}, {"enable_overlap_schedule": True}),
        # Per-head q/k norms; a vocabulary that does not split evenly (a padded shard).
        ("qwen3", {"num_key_value_heads": 2, "vocab_size": 301}, {}),
        # Four ranks: one query head each, each of the 2 KV heads on two ranks.
        ("llama", {}, {"tp_size": 4}),
        ("mistral", {}, {"tp_size": 4}),
        ("qwen3", {"vocab_size": 301}, {"tp_size": 4}),  # 76 rows a shard, the last one padded
    ],
    ids=[
        "llama-kv2",
        "llama-kv1-replicated-overlap",
        "qwen3-odd-vocab",
        "llama-tp4",
        "mistral-tp4",
        "qwen3-tp4",
    ],
)
def test_tp_greedy_matches_hf(
    tiny_model_factory: Callable[..., Path],
    arch: str,
    overrides: dict[str, object],
    options: dict[str, object],
) -> None:
    path = tiny_model_factory(arch, **overrides)
    client = tp_client(path, **options)
    try:
        got = run_all(client, PROMPTS)
        # The second run of the shared prompt hits the radix cache on rank 0; every rank still has its KV.
        again = run_all(client, PROMPTS[1:2])
    finally:
        client.shutdown()
    assert not client.process.is_alive() and client.process.exitcode == 0  # a clean stop
    for i, ids in enumerate(PROMPTS):
        assert got[str(i)] == hf_greedy(path, ids, GREEDY["max_new_tokens"]), (arch, i)
    assert again["0"] == got["1"]


def assert_fails_and_exits(
    client: EngineClient, outputs: queue.SimpleQueue[RequestOutput | BaseException], first: RequestOutput
) -> None:
    """After a rank died: the running request (`first` its last output) fails with the step's
    error and the engine process exits, both within 30 s."""
    start = time.monotonic()
    item: RequestOutput | BaseException = first
    while isinstance(item, RequestOutput):
        assert not item.finished
        item = outputs.get(timeout=30)
    assert "engine step failed" in str(item)
    client.process.join(30)
    assert not client.process.is_alive() and time.monotonic() - start < 30
    assert client.process.exitcode == 1  # not a clean stop


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the follower through /proc")
def test_a_dead_follower_fails_the_request_and_the_engine_exits(tiny_llama: Path) -> None:
    client = tp_client(tiny_llama)
    try:
        outputs: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()
        client.add(["doomed"], Prompt([5, 6, 7], {"max_new_tokens": 100000, "ignore_eos": True}), outputs.put)
        first = outputs.get(timeout=60)
        assert isinstance(first, RequestOutput) and not first.finished
        assert client.process.pid is not None
        (follower,) = children(client.process.pid)
        os.kill(follower, signal.SIGKILL)
        assert_fails_and_exits(client, outputs, first)
    finally:
        client.shutdown()


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the follower through /proc")
def test_followers_exit_when_rank_0_dies(tiny_llama: Path) -> None:
    client = tp_client(tiny_llama)
    try:
        outputs: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()
        client.add(["orphan"], Prompt([5, 6, 7], {"max_new_tokens": 100000, "ignore_eos": True}), outputs.put)
        assert isinstance(outputs.get(timeout=60), RequestOutput)
        assert client.process.pid is not None
        (follower,) = children(client.process.pid)
        os.kill(client.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while running(follower) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(follower)  # no orphan left waiting in a broadcast
    finally:
        client.shutdown()


def test_fp8_shards_that_split_a_weight_block_are_refused_at_start_up(
    tiny_model_factory: Callable[..., Path],
) -> None:
    # The tiny DeepSeek-V3's q_b_proj has 4 heads x 24 rows: 48 rows per rank split a 128-row block.
    path = tiny_model_factory("deepseek_v3")
    with pytest.raises(RuntimeError, match="FP8 block scales split only on block boundaries"):
        tp_client(path, quantization="fp8")


def test_tp_options_are_validated(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="tp_size must be a positive integer"):
        EngineConfig.from_options(str(tiny_llama), tp_size=0)
    EngineConfig.from_options(str(tiny_llama), tp_size=2, quantization="fp8")  # shards checked at load
    EngineConfig.from_options(str(tiny_llama), tp_size=2, disaggregation_mode="prefill")  # test_disagg_tp
    with pytest.raises(ValueError, match="base_gpu_id"):
        EngineConfig.from_options(str(tiny_llama), base_gpu_id=-1)
    model = ModelConfig.from_model_path(tiny_llama)  # 4 heads, 2 KV heads
    parallel_state.check_tp_support(model, 4)  # KV heads replicated twice
    with pytest.raises(ValueError, match="num_attention_heads"):
        parallel_state.check_tp_support(model, 3)


def test_multi_node_options_are_validated(tiny_llama: Path) -> None:
    def config(**options: object) -> EngineConfig:
        return EngineConfig.from_options(str(tiny_llama), **options)

    with pytest.raises(ValueError, match="nnodes must divide tp_size"):
        config(tp_size=3, nnodes=2, dist_init_addr="10.0.0.1:29500")
    with pytest.raises(ValueError, match=r"node_rank must be in \[0, nnodes - 1\] = \[0, 1\], got 2"):
        config(tp_size=4, nnodes=2, node_rank=2, dist_init_addr="10.0.0.1:29500")
    with pytest.raises(ValueError, match="nnodes=2 needs dist_init_addr"):
        config(tp_size=4, nnodes=2)
    for bad in ("10.0.0.1", ":29500", "node-0:http", "node-0:70000"):
        with pytest.raises(ValueError, match="dist_init_addr must be host:port"):
            config(tp_size=2, dist_init_addr=bad)
    node1 = config(tp_size=8, nnodes=2, node_rank=1, dist_init_addr="[fd00::1]:29500")
    assert (node1.node_ranks, node1.local_rank(5), node1.rendezvous) == (range(4, 8), 1, ("fd00::1", 29500))
    node0 = dataclasses.replace(node1, node_rank=0)  # reaches its own store on loopback
    assert (node0.node_ranks, node0.rendezvous) == (range(4), ("127.0.0.1", 29500))
    assert config(tp_size=2).rendezvous == ("127.0.0.1", 0)  # one node: a port the OS picks
    from shared.engine import Engine

    with pytest.raises(ValueError, match="only node 0 runs an engine"):
        Engine(str(tiny_llama), tp_size=2, nnodes=2, node_rank=1, dist_init_addr="127.0.0.1:1")


# ---- the sharded weight loaders, as rank 1 of 2 (no group needed: loading runs no collective) ----


@pytest.fixture
def rank1_of_2() -> Iterator[None]:
    saved = parallel_state._state
    parallel_state._state = parallel_state._State(rank=1, size=2)
    try:
        yield
    finally:
        parallel_state._state = saved


def _load(param: torch.nn.Parameter, loaded: torch.Tensor, *shard: object) -> None:
    param.weight_loader(param, loaded, *shard)  # type: ignore[attr-defined]


def test_column_and_row_parallel_loaders_take_this_ranks_slice(rank1_of_2: None) -> None:
    from shared.models.layers.linear import ColumnParallelLinear, MergedLinear, RowParallelLinear

    w = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)  # [out 8, in 6]
    col = ColumnParallelLinear(6, 8, bias=True)
    _load(col.weight, w)
    _load(col.bias, torch.arange(8.0))  # type: ignore[arg-type]
    assert torch.equal(col.weight, w[4:]) and torch.equal(col.bias, torch.arange(4.0, 8.0))  # type: ignore[arg-type]
    row = RowParallelLinear(6, 8, bias=True)
    _load(row.weight, w)
    _load(row.bias, torch.arange(8.0))  # type: ignore[arg-type]
    assert torch.equal(row.weight, w[:, 3:]) and torch.equal(row.bias, torch.arange(8.0))  # type: ignore[arg-type]
    gate_up = MergedLinear(6, [8, 8])
    _load(gate_up.weight, w, 0)
    _load(gate_up.weight, w + 100, 1)
    assert torch.equal(gate_up.weight, torch.cat([w[4:], w[4:] + 100]))  # [gate half | up half]


@pytest.mark.parametrize(("kv_heads", "kv_rows"), [(2, slice(2, 4)), (1, slice(0, 2))])
def test_qkv_loader_splits_heads_and_replicates_kv_heads(
    rank1_of_2: None, kv_heads: int, kv_rows: slice
) -> None:
    from shared.models.layers.linear import QKVLinear

    head_dim, hidden = 2, 4
    qkv = QKVLinear(hidden, head_dim, num_heads=4, num_kv_heads=kv_heads)
    q = torch.arange(8 * hidden, dtype=torch.float32).reshape(8, hidden)  # 4 heads x 2
    k = -torch.arange(kv_heads * head_dim * hidden, dtype=torch.float32).reshape(-1, hidden)
    v = k - 1000
    for shard, t in (("q", q), ("k", k), ("v", v)):
        _load(qkv.weight, t, shard)
    assert (qkv.num_heads, qkv.num_kv_heads) == (2, 1)
    assert torch.equal(qkv.weight, torch.cat([q[4:], k[kv_rows], v[kv_rows]]))


def test_vocab_parallel_embedding_pads_the_last_shard(rank1_of_2: None) -> None:
    from shared.models.layers.embedding import VocabEmbedding

    table = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)  # 7 tokens: rank 1 holds 4..6 + a pad
    emb = VocabEmbedding(7, 3)
    _load(emb.weight, table)
    assert emb.vocab_start == 4
    assert torch.equal(emb.weight, torch.cat([table[4:], torch.zeros(1, 3)]))


# ---- the offline Engine at tp_size > 1 (its core in the engine process) ----


def test_offline_engine_at_tp2_matches_tp1_and_hf(tiny_llama: Path) -> None:
    from shared.engine import Engine
    from shared.errors import Unavailable

    texts = ["The quick brown fox", "a b c", "The quick brown fox jumps"]  # the third reuses a prefix
    greedy = dict(GREEDY, max_new_tokens=8)
    seen = []
    for tp_size in (1, 2):
        with Engine(
            str(tiny_llama), tp_size=tp_size, device="cpu", page_size=4, chunked_prefill_size=8
        ) as engine:
            outs = engine.generate(texts, greedy)
            chunks = list(engine.generate(texts[0], greedy, stream=True))  # type: ignore[arg-type]
            later = asyncio.run(engine.async_generate(texts[1], greedy))
            samples = engine.generate(texts[0], {"n": 2, "temperature": 1.0, "seed": 3, "max_new_tokens": 4})
            embedding = engine.encode(texts[1], pooling="mean")
            with pytest.raises(ValueError, match="top_p"):
                engine.generate("x", {"top_p": 1.5})
            running = engine.generate(texts[1], dict(greedy, max_new_tokens=10000), stream=True)
            next(running)  # type: ignore[call-overload]
        with pytest.raises(Unavailable, match="shut down"):  # a request still running at shutdown
            list(running)  # type: ignore[call-overload]
        with pytest.raises(Unavailable, match="shut down"):
            engine.generate("x", greedy)
        ids = [engine.tokenizer(t)["input_ids"] for t in texts]
        assert [o["output_ids"] for o in outs] == [hf_greedy(tiny_llama, i, 8) for i in ids]  # type: ignore[index]
        assert [t for c in chunks for t in c["output_ids"]] == outs[0]["output_ids"]  # type: ignore[index]
        assert later["output_ids"] == outs[1]["output_ids"]  # type: ignore[index]
        assert outs[2]["meta_info"]["cached_tokens"] > 0  # type: ignore[index]
        assert [len(s["output_ids"]) for s in samples] == [4, 4]  # type: ignore[index]
        seen.append([o["output_ids"] for o in outs])  # type: ignore[index]
        seen.append(embedding["embedding"])  # type: ignore[index]
    assert seen[2] == seen[0]
    assert seen[3] == pytest.approx(seen[1], abs=1e-5)
