"""Prefill/decode disaggregation with tensor parallelism on CPU: a prefill engine and a decode
engine of tp_size 2 each (engine process = rank 0, one follower process each, gloo), driven
through their `EngineClient`s as the workers drive them. Every prefill rank writes its own KV
shard into the decode rank of the same index (NIXL over loopback: one agent per rank), or rank
0 gathers the shards and the decode rank 0 scatters them (the gRPC transport's bytes).

The oracle is HF greedy (float32); the bytes moved are each page's shards."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.config import EngineConfig
from shared.engine_client import EngineClient
from shared.engine_core import RequestOutput
from shared.errors import InvalidRequest
from shared.inputs import Prompt
from shared.transfer import KvTarget, nixl_available
from tests.engine.hf_reference import hf_greedy

pytestmark = pytest.mark.xdist_group("disagg_tp")

needs_nixl = pytest.mark.skipif(not nixl_available(), reason="NIXL is not installed")
TRANSPORTS = [pytest.param("nixl", marks=needs_nixl), "grpc"]
GREEDY = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}
PAGE_SIZE = 4
# The first prefills in chunks of 8 tokens; the second shares its first 12 tokens (3 pages) with
# it and runs after it, so the prefill engine takes them from its radix cache.
PROMPTS = [list(range(20, 45)), list(range(60, 66))]
CACHED = [*range(20, 32), 7, 8, 9]


def start(path: Path, mode: str, transport: str, tp_size: int = 2) -> EngineClient:
    config = EngineConfig.from_options(
        str(path),
        tp_size=tp_size,
        device="cpu",
        page_size=PAGE_SIZE,
        chunked_prefill_size=8,
        disaggregation_mode=mode,
        kv_transport=transport,
        kv_transfer_timeout_s=20.0,
        debug_invariants=True,
        enable_overlap_schedule=True,  # as on a GPU: both engines launch a step before reading the last
    )
    return EngineClient(config)


@pytest.fixture(scope="module", params=TRANSPORTS)
def pair(request: pytest.FixtureRequest, tiny_llama: Path) -> Iterator[tuple[EngineClient, EngineClient]]:
    prefill = start(tiny_llama, "prefill", request.param)
    try:
        decode = start(tiny_llama, "decode", request.param)
    except BaseException:
        prefill.shutdown()
        raise
    try:
        if request.param == "nixl":
            assert decode.agent_metadata is not None
            prefill.add_peer(decode.agent_metadata).result(30)
        yield prefill, decode
    finally:
        prefill.shutdown()
        decode.shutdown()
        assert not prefill.process.is_alive() and not decode.process.is_alive()


def shard_bytes_per_page(path: Path, tp_size: int) -> int:
    """One rank's KV bytes of one page: layers x (K, V) x its KV heads x head_dim x float32."""
    cfg = json.loads((path / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    heads = max(1, cfg["num_key_value_heads"] // tp_size)
    return PAGE_SIZE * cfg["num_hidden_layers"] * 2 * heads * head_dim * 4


def run_pd(prefill: EngineClient, decode: EngineClient, prompts: dict[str, list[int]]) -> dict[str, Any]:
    """As the workers do: the decode engine expects each prompt, the prefill engine asks for its
    pages when it schedules it, and (gRPC) the caller carries the bytes and the commit across.
    Returns per request its tokens and its last decode output."""
    events: queue.SimpleQueue[tuple[str, RequestOutput | BaseException]] = queue.SimpleQueue()
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    last: dict[str, RequestOutput] = {}
    for rid, ids in prompts.items():
        decode.expect_kv(rid, Prompt(ids, GREEDY), lambda out: events.put(("decode", out))).result(30)
        target = KvTarget(decode.kv_transport, [], decode.agent_name)  # type: ignore[arg-type]
        prefill.submit(
            [rid], Prompt(ids, GREEDY), lambda out: events.put(("prefill", out)), kv_target=target
        ).result(30)
    deadline = time.monotonic() + 120
    while len(last) < len(prompts):
        side, out = events.get(timeout=max(0.0, deadline - time.monotonic()))
        if isinstance(out, BaseException):
            raise out
        if side == "prefill":
            if out.kv_pages_wanted:
                pages = decode.reserve_kv(out.rid).result(30)
                prefill.set_kv_target(out.rid, pages)
                continue
            assert out.finished and out.finish_reason == {"type": "transferred"}, out
            if out.kv_commit is not None:  # gRPC: the worker carries the bytes on
                assert out.kv_payload is not None
                decode.commit_kv(out.kv_commit, out.kv_payload)
            continue
        tokens[out.rid] += out.new_ids
        if out.finished:
            last[out.rid] = out
    return {"tokens": tokens, "last": last}


def wait_released(*clients: EngineClient, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    for client in clients:
        while (stats := client.stats().result(30))["kv_used_tokens"] or stats["parked_requests"]:
            assert time.monotonic() < deadline, f"KV still held: {stats}"
            time.sleep(0.05)


def test_pd_tp2_greedy_equals_hf_and_moves_every_shard(
    pair: tuple[EngineClient, EngineClient], tiny_llama: Path
) -> None:
    prefill, decode = pair
    assert prefill.tp_size == decode.tp_size == 2
    assert prefill.kv_layout == decode.kv_layout and decode.kv_layout.endswith("-tp2")
    p0, d0 = prefill.stats().result(30), decode.stats().result(30)
    first = run_pd(prefill, decode, {f"a{i}": ids for i, ids in enumerate(PROMPTS)})
    second = run_pd(prefill, decode, {"cached": CACHED})  # after `a0` finished: a prefix-cache hit
    wait_released(prefill, decode)
    p1, d1 = prefill.stats().result(30), decode.stats().result(30)

    for i, ids in enumerate(PROMPTS):
        assert first["tokens"][f"a{i}"] == hf_greedy(tiny_llama, ids, GREEDY["max_new_tokens"]), i
    assert second["tokens"]["cached"] == hf_greedy(tiny_llama, CACHED, GREEDY["max_new_tokens"])
    assert second["last"]["cached"].cached_tokens == 12  # three 4-token pages from a0's prompt
    # The decode engine never ran a prompt; the prefill engine ran all but the cached pages.
    assert d1.get("prompt_tokens_computed", 0) == d0.get("prompt_tokens_computed", 0) == 0
    computed = p1["prompt_tokens_computed"] - p0.get("prompt_tokens_computed", 0)
    assert computed == sum(map(len, PROMPTS)) + len(CACHED) - 12
    # Every page moved as two shards, each holding one of the two KV heads, but for the three
    # pages of `cached` that the decode engine's own prefix cache held (from a0's finished run).
    pages = sum(-(-len(ids) // PAGE_SIZE) for ids in [*PROMPTS, CACHED]) - 3
    moved = 2 * pages * shard_bytes_per_page(tiny_llama, 2)
    sent = p1["kv_bytes_sent"] - p0.get("kv_bytes_sent", 0)
    received = d1["kv_bytes_received"] - d0.get("kv_bytes_received", 0)
    assert sent == received == moved
    assert p1["kv_transfers"] - p0.get("kv_transfers", 0) == 3
    assert p1.get("kv_transfer_failures", 0) == 0


def test_pd_tp2_abort_after_the_reservation_holds_no_pages(
    pair: tuple[EngineClient, EngineClient], tiny_llama: Path
) -> None:
    """A prefill request aborted while its pages are granted (NIXL: the decode engine waits
    until no write of any rank can land), and a decode request aborted before its KV came: both
    engines end up holding nothing, and serve the next request correctly."""
    prefill, decode = pair
    ids = list(range(100, 140))
    outputs: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()
    # Prefill side gives up: pages reserved up front, then the prompt is aborted while it runs.
    decode.expect_kv("p-abort", Prompt(ids, GREEDY), outputs.put).result(30)
    pages = decode.reserve_kv("p-abort").result(30)
    target = KvTarget(decode.kv_transport, pages, decode.agent_name)  # type: ignore[arg-type]
    prefill.submit(["p-abort"], Prompt(ids, GREEDY), outputs.put, kv_target=target).result(30)
    prefill.abort("p-abort")
    if prefill.kv_transport == "grpc":  # no notice crosses: the router cancels the other leg
        decode.abort("p-abort")
    # Decode side gives up while the prefill engine writes (the write lands in quarantined pages).
    decode.expect_kv("d-abort", Prompt(ids, GREEDY), outputs.put).result(30)
    pages = decode.reserve_kv("d-abort").result(30)
    decode.abort("d-abort")
    target = KvTarget(decode.kv_transport, pages, decode.agent_name)  # type: ignore[arg-type]
    prefill.submit(["d-abort"], Prompt(ids, GREEDY), outputs.put, kv_target=target).result(30)
    finished: dict[str, list[RequestOutput]] = {}
    deadline = time.monotonic() + 60
    while sum(out.finished for outs in finished.values() for out in outs) < 4:
        out = outputs.get(timeout=max(0.0, deadline - time.monotonic()))
        assert not isinstance(out, BaseException), out
        finished.setdefault(out.rid, []).append(out)
        if out.kv_commit is not None:  # gRPC: carried on, as a worker would, into a dead request
            decode.commit_kv(out.kv_commit, out.kv_payload)
    wait_released(prefill, decode)
    again = run_pd(prefill, decode, {"after": ids})
    assert again["tokens"]["after"] == hf_greedy(tiny_llama, ids, GREEDY["max_new_tokens"])
    wait_released(prefill, decode)


@pytest.mark.parametrize("pair", [pytest.param("nixl", marks=needs_nixl)], indirect=True)
def test_pd_tp2_a_forgotten_peer_leaves_every_rank_and_is_learnt_again(
    pair: tuple[EngineClient, EngineClient], tiny_llama: Path
) -> None:
    """Rank 0 forgets the decode engine (its followers with the next instruction), refuses it as
    a target, then learns it again under a new peer id and every rank writes its shard."""
    prefill, decode = pair
    assert decode.agent_metadata is not None and prefill.stats().result(30)["kv_peers"] == 1
    prefill.remove_peer(decode.agent_name)
    assert prefill.stats().result(30)["kv_peers"] == 0  # nothing was on its way there
    target = KvTarget("nixl", [], decode.agent_name)
    with pytest.raises(InvalidRequest, match="unknown KV peer"):
        prefill.submit(["refused"], Prompt(PROMPTS[1], GREEDY), lambda out: None, kv_target=target).result(30)
    prefill.add_peer(decode.agent_metadata).result(30)
    again = run_pd(prefill, decode, {"again": PROMPTS[1]})
    assert again["tokens"]["again"] == hf_greedy(tiny_llama, PROMPTS[1], GREEDY["max_new_tokens"])
    assert prefill.stats().result(30)["kv_peers"] == 1
    wait_released(prefill, decode)


@pytest.mark.parametrize("pair", [pytest.param("nixl", marks=needs_nixl)], indirect=True)
def test_mismatched_tp_sizes_are_refused_clearly(
    pair: tuple[EngineClient, EngineClient], tiny_llama: Path
) -> None:
    """NIXL: the agent metadata carries the tp_size (gRPC: the prefill worker compares the
    reservation's, tests/suite/test_pd_tp.py)."""
    prefill, decode = pair
    decode1 = start(tiny_llama, "decode", "nixl", tp_size=1)
    prefill1 = start(tiny_llama, "prefill", "nixl", tp_size=1)
    try:
        assert decode1.agent_metadata is not None and decode.agent_metadata is not None
        for p, d, (ptp, dtp) in [(prefill, decode1, (2, 1)), (prefill1, decode, (1, 2))]:
            with pytest.raises(InvalidRequest, match="tensor-parallel size mismatch") as err:
                p.add_peer(d.agent_metadata).result(30)  # type: ignore[arg-type]
            assert f"runs tp_size={dtp}, this engine tp_size={ptp}" in str(err.value)
    finally:
        decode1.shutdown()
        prefill1.shutdown()
