"""Prefill/decode disaggregation between two engines in one process: the prefill engine writes
each prompt's KV into pages the decode engine reserved (NIXL over loopback, or bytes as the
gRPC transport carries them), and the decode engine continues from the first token. The decode
engine reserves just in time: when the prefill engine asks, as the prompt starts computing.

The oracle is HF greedy (float32) and, for seeded sampling, a unified engine."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.disagg.receiver import PREFILL_GAVE_UP
from shared.engine_core import EngineCore, RequestOutput
from shared.errors import CapacityError
from shared.inflight import InflightStep
from shared.sampling import SamplingParams
from shared.transfer import KvCommit, KvTarget, PageLayout, nixl_available
from shared.transfer.nixl import NixlAgent
from tests.engine.hf_reference import hf_greedy
from tests.engine.test_parity import build_core, hf_greedy_cached, make_prompts, run_staggered

TRANSPORTS = [
    pytest.param("nixl", marks=pytest.mark.skipif(not nixl_available(), reason="NIXL is not installed")),
    "grpc",
]
# Both engines reading each step after launching the next (the GPU default) or at once (the CPU's).
OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])


def make_pair(path: Path, transport: str, **options: object) -> tuple[EngineCore, EngineCore]:
    prefill = build_core(path, disaggregation_mode="prefill", kv_transport=transport, **options)
    decode = build_core(path, disaggregation_mode="decode", kv_transport=transport, **options)
    if transport == "nixl":
        assert decode.agent is not None
        prefill.add_peer(decode.agent.metadata())
    for core in (prefill, decode):  # tp_size 1: the pool's own layout and agent, nothing sharded
        assert type(core.layout) is PageLayout
        assert core.agent is None or type(core.agent) is NixlAgent
    return prefill, decode


def submit(prefill: EngineCore, decode: EngineCore, rid: str, ids: list[int], params: SamplingParams) -> None:
    """As the workers do: the decode engine expects the prompt, the prefill engine asks for its
    pages when it schedules it (`forward_targets` carries the answer)."""
    decode.expect_kv(rid, ids, params)
    peer = decode.agent.name if decode.agent is not None else ""
    prefill.add_request([rid], ids, params, kv_target=KvTarget(decode.transport, [], peer))  # type: ignore[arg-type]


def reserve(decode: EngineCore, rid: str, ids: list[int], params: SamplingParams) -> list[int] | None:
    """Pages up front: the decode engine expects the prompt and reserves at once."""
    decode.expect_kv(rid, ids, params)
    return decode.reserve_kv(rid)


def forward_targets(
    prefill: EngineCore, decode: EngineCore, outs: list[RequestOutput]
) -> list[RequestOutput]:
    """Answer the prefill engine's reservation requests among `outs` (queued ones once the
    decode engine grants them); returns the other outputs."""
    for out in outs:
        if out.kv_pages_wanted:
            pages = decode.reserve_kv(out.rid)
            if pages is not None:
                prefill.set_kv_target(out.rid, pages)
    for rids, pages, error, reservation in decode.take_admissions():
        assert reservation and not error and pages is not None
        prefill.set_kv_target(rids[0], pages)
    return [out for out in outs if not out.kv_pages_wanted]


def run_pd(
    prefill: EngineCore,
    decode: EngineCore,
    prompts: list[list[int]],
    params: SamplingParams,
) -> tuple[dict[str, list[int]], dict[str, RequestOutput]]:
    """Submit prompt i at round 2*i; step both engines until every request finished on decode."""
    tokens: dict[str, list[int]] = {}
    last: dict[str, RequestOutput] = {}
    pending = list(enumerate(prompts))
    rounds = 0
    deadline = time.monotonic() + 120  # NIXL writes complete asynchronously: bound time, not rounds
    while pending or len(last) < len(prompts):
        while pending and pending[0][0] * 2 <= rounds:
            i, ids = pending.pop(0)
            submit(prefill, decode, f"r{i}", ids, params)
        for out in forward_targets(prefill, decode, prefill.step()):
            assert out.finished and out.finish_reason == {"type": "transferred"}, out
            assert out.kv_bytes > 0
            if out.kv_commit is not None:  # the gRPC transport: the caller delivers the pages
                decode.commit_kv(KvCommit.decode(out.kv_commit), out.kv_payload)
        for out in decode.step():
            tokens.setdefault(out.rid, []).extend(out.new_ids)
            if out.finished:
                last[out.rid] = out
        forward_targets(prefill, decode, [])  # reservations granted during the decode step
        rounds += 1
        assert time.monotonic() < deadline, "no progress"
    wait_idle(prefill)
    wait_idle(decode)
    return tokens, last


def deliver_and_decode(decode: EngineCore, out: RequestOutput) -> list[int]:
    """Deliver a prefill output's pages and commit (gRPC transport), then decode to the end."""
    decode.commit_kv(KvCommit.decode(out.kv_commit), out.kv_payload)  # type: ignore[arg-type]
    got: list[int] = []
    while decode.has_work:
        got += [t for o in decode.step() for t in o.new_ids]
    return got


def step_until_finished(core: EngineCore, timeout: float = 10.0) -> list[RequestOutput]:
    """Step until an output finishes; every output on the way. With overlap scheduling (the
    GPU's default) a step's outputs come back one step later."""
    outs: list[RequestOutput] = []
    deadline = time.monotonic() + timeout
    while not any(out.finished for out in outs):
        outs += core.step()
        assert time.monotonic() < deadline, "no output finished"
    return outs


def wait_idle(core: EngineCore, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while core.has_work or core.waiting_in_background:
        core.step()
        assert time.monotonic() < deadline, "engine did not go idle"
        time.sleep(0.001)
    core.check_idle()


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_pd_greedy_parity_with_hf(
    tiny_model_factory: Callable[..., Path], arch: str, transport: str, page_size: int
) -> None:
    # deepseek_v3: an MLA pool (one latent buffer per layer) moves like any other.
    path = tiny_model_factory(arch)
    # A small chunk budget makes long prompts prefill in chunks whose pages stream out early.
    prefill, decode = make_pair(path, transport, page_size=page_size, chunked_prefill_size=16)
    prompts = make_prompts(prefill.runner.vocab_size)
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    tokens, last = run_pd(prefill, decode, prompts, params)
    for i, ids in enumerate(prompts):
        assert tokens[f"r{i}"] == hf_greedy_cached(path, ids, 10), f"prompt {i}"
        assert last[f"r{i}"].prompt_tokens == len(ids)
    p, d = prefill.stats(), decode.stats()
    assert d["prompt_tokens_computed"] == 0  # the decode engine never ran a prompt
    assert p["prompt_tokens_computed"] == sum(map(len, prompts))
    pages = sum(-(-len(ids) // page_size) for ids in prompts)
    assert p["kv_bytes_sent"] == d["kv_bytes_received"] == prefill.layout.nbytes(pages)
    assert p["kv_transfers"] == d["kv_reservations"] == len(prompts)


@OVERLAP
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pd_reuses_the_prefill_cache(tiny_llama: Path, transport: str, overlap: bool) -> None:
    prefill, decode = make_pair(tiny_llama, transport, enable_overlap_schedule=overlap)
    prefix = make_prompts(prefill.runner.vocab_size, count=2)[1]  # 41 tokens
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[*prefix, 7, 8, 9], [*prefix, 10, 11]]
    _tokens, last = run_pd(prefill, decode, prompts[:1], params)
    tokens2, last2 = run_pd(prefill, decode, prompts[1:], params)
    assert last["r0"].cached_tokens == 0
    assert last2["r0"].cached_tokens == 32  # two whole 16-token pages of the shared prefix
    assert tokens2["r0"] == hf_greedy(tiny_llama, prompts[1], 6)


@OVERLAP
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_decode_reuses_its_own_cache_and_only_the_rest_is_sent(
    tiny_llama: Path, transport: str, overlap: bool
) -> None:
    """A prompt whose prefix the decode engine's cache holds (a finished request's KV): its
    reservation shares those pages and lists only the rest, and only the rest crosses. (A 1 s
    lease: an aborted NIXL reservation waits out twice that for a late write.)"""
    prefill, decode = make_pair(
        tiny_llama, transport, kv_transfer_timeout_s=1.0, enable_overlap_schedule=overlap
    )
    prefix = make_prompts(prefill.runner.vocab_size, count=2)[1]  # 41 tokens: 2 whole pages
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    first, second = [*prefix, 7, 8, 9], [*prefix, 10, 11, *range(20, 30)]  # 3 and 4 pages
    run_pd(prefill, decode, [first], params)
    before = decode.stats()
    tokens, _last = run_pd(prefill, decode, [second], params)
    received = decode.stats()["kv_bytes_received"] - before["kv_bytes_received"]
    assert received == decode.layout.nbytes(4 - 2)  # the two prefix pages stayed where they were
    assert tokens["r0"] == hf_greedy(tiny_llama, second, 6)
    decode.check_idle()
    # A reservation over a cached prefix that is aborted before its KV comes: the prefix stays
    # cached (unlocked), the rest goes back; nothing leaks.
    pages = reserve(decode, "gone", [*prefix, 99], params)
    assert pages is not None and len(pages) == 1
    decode.abort("gone")
    decode.step()
    wait_idle(decode)
    decode.check_idle()
    again = reserve(decode, "again", [*prefix, 98], params)
    assert again is not None and len(again) == 1  # the prefix is still there to share
    decode.abort("again")
    decode.step()
    wait_idle(decode)
    decode.check_idle()


@OVERLAP
def test_pd_seeded_sampling_matches_unified(tiny_llama: Path, overlap: bool) -> None:
    prefill, decode = make_pair(tiny_llama, "grpc", enable_overlap_schedule=overlap)
    prompts = make_prompts(prefill.runner.vocab_size, count=4)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    tokens, _ = run_pd(prefill, decode, prompts, params)
    unified = build_core(tiny_llama)
    for i, ids in enumerate(prompts):
        unified.add_request([f"u{i}"], ids, params)
    ref: dict[str, list[int]] = {}
    while unified.has_work:
        for out in unified.step():
            ref.setdefault(out.rid, []).extend(out.new_ids)
    assert [tokens[f"r{i}"] for i in range(4)] == [ref[f"u{i}"] for i in range(4)]


def test_decode_stops_on_the_first_token(tiny_llama: Path) -> None:
    # The prefill side samples the first token; the decode side applies the stop rules to it.
    prefill, decode = make_pair(tiny_llama, "grpc")
    ids = make_prompts(prefill.runner.vocab_size, count=1)[0]
    first = hf_greedy(tiny_llama, ids, 1)[0]
    params = SamplingParams(max_new_tokens=5, temperature=0.0, stop_token_ids=[first])
    tokens, last = run_pd(prefill, decode, [ids], params)
    assert tokens["r0"] == [first]
    assert last["r0"].finish_reason == {"type": "stop", "matched": first}


def test_reservation_lease_expires_and_pages_come_back(tiny_llama: Path) -> None:
    decode = build_core(
        tiny_llama, disaggregation_mode="decode", kv_transport="grpc", kv_transfer_timeout_s=0.05
    )
    free_before = decode.stats()["kv_free_tokens"]
    pages = reserve(decode, "late", list(range(5, 40)), SamplingParams(max_new_tokens=4))
    assert len(pages) == 3 and decode.stats()["kv_free_tokens"] < free_before
    time.sleep(0.06)
    outs = decode.step()
    assert [o.finish_reason for o in outs] == [
        {"type": "abort", "message": "the prompt's KV did not arrive within the reservation lease"}
    ]
    # No write can land later over gRPC (the bytes land inside commit_kv): freed at once.
    assert not decode.waiting_in_background
    assert decode.stats()["kv_free_tokens"] == free_before
    assert decode.stats()["kv_reservations_expired"] == 1
    # A commit arriving after that is ignored.
    decode.commit_kv(KvCommit("late", 5, 0), None)
    decode.check_idle()


@OVERLAP
def test_aborted_reservation_is_freed_at_once_over_grpc(tiny_llama: Path, overlap: bool) -> None:
    prefill, decode = make_pair(tiny_llama, "grpc", enable_overlap_schedule=overlap)
    ids = list(range(5, 30))
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    pages = reserve(decode, "r", ids, params)
    prefill.add_request(["r"], ids, params, kv_target=KvTarget("grpc", pages))
    decode.abort("r")
    assert [o.finish_reason["type"] for o in decode.step()] == ["abort"]  # type: ignore[index]
    assert not decode.waiting_in_background
    decode.check_idle()
    (out,) = step_until_finished(prefill)  # the late bytes are ignored
    decode.commit_kv(KvCommit.decode(out.kv_commit), out.kv_payload)  # type: ignore[arg-type]
    decode.check_idle()
    wait_idle(prefill)


NIXL_ONLY = pytest.mark.skipif(not nixl_available(), reason="NIXL is not installed")


def wait_released(prefill: EngineCore, decode: EngineCore, timeout: float = 5.0) -> float:
    """Step both engines (as their loops do: a write over UCX's TCP/shared memory transports
    needs the target to progress too) until both hold nothing; seconds it took."""
    start = time.monotonic()
    while any(core.has_work or core.waiting_in_background for core in (prefill, decode)):
        prefill.step()
        decode.step()
        assert time.monotonic() < start + timeout, "the engines did not go idle"
        time.sleep(0.001)
    prefill.check_idle()
    decode.check_idle()
    return time.monotonic() - start


def _nixl_request_r(tiny_llama: Path, overlap: bool) -> tuple[EngineCore, EngineCore]:
    """A NIXL pair (lease 30 s) with request "r" reserved on decode and handed to prefill."""
    prefill, decode = make_pair(
        tiny_llama, "nixl", kv_transfer_timeout_s=30.0, enable_overlap_schedule=overlap
    )
    ids = list(range(5, 30))
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    pages = reserve(decode, "r", ids, params)
    assert decode.agent is not None
    prefill.add_request(["r"], ids, params, kv_target=KvTarget("nixl", pages, decode.agent.name))
    return prefill, decode


@NIXL_ONLY
@OVERLAP
def test_a_prefill_abort_ends_the_decode_quarantine_at_once(tiny_llama: Path, overlap: bool) -> None:
    # A long lease: without the prefill side's word the pages would wait out 2 x 30 s.
    prefill, decode = _nixl_request_r(tiny_llama, overlap)
    decode.abort("r")  # the router cancelled both legs: decode first
    assert [o.finish_reason["type"] for o in decode.step()] == ["abort"]  # type: ignore[index]
    assert decode.waiting_in_background  # a NIXL write could still land: quarantined
    prefill.abort("r")  # nothing was written: the prefill engine says so
    assert wait_released(prefill, decode) < 5


@NIXL_ONLY
@OVERLAP
def test_a_prefill_abort_fails_a_waiting_reservation_at_once(tiny_llama: Path, overlap: bool) -> None:
    prefill, decode = _nixl_request_r(tiny_llama, overlap)
    prefill.abort("r")  # the prefill leg failed first; decode still waits, lease running
    deadline, finished = time.monotonic() + 5, []
    while not finished:
        prefill.step()
        finished = [o for o in decode.step() if o.finished]
        assert time.monotonic() < deadline, "the decode engine kept waiting for KV"
    assert finished[0].finish_reason == {"type": "abort", "message": PREFILL_GAVE_UP}
    wait_released(prefill, decode)


@NIXL_ONLY
@OVERLAP
def test_pages_granted_after_the_prefill_abort_are_released(tiny_llama: Path, overlap: bool) -> None:
    # Just in time: the prefill engine asked for pages, then its request was aborted before the
    # decode engine granted them (with overlap: its first token still in flight); it tells the
    # decode engine when they come.
    prefill, decode = make_pair(
        tiny_llama, "nixl", kv_transfer_timeout_s=30.0, enable_overlap_schedule=overlap
    )
    ids = list(range(5, 30))
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    submit(prefill, decode, "r", ids, params)
    outs = prefill.step()  # scheduled: it asks for pages
    assert [o.kv_pages_wanted for o in outs if o.kv_pages_wanted] == [2]
    prefill.abort("r")
    pages = decode.reserve_kv("r")
    assert pages is not None
    prefill.set_kv_target("r", pages)  # arrives after the abort: nothing will be written
    decode.abort("r")
    assert wait_released(prefill, decode) < 5


def test_bad_reservations_and_targets_are_refused(tiny_llama: Path) -> None:
    prefill, decode = make_pair(tiny_llama, "grpc", max_total_tokens=64)
    params = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="takes reservations"):
        decode.add_request(["x"], [5, 6], params)
    with pytest.raises(ValueError, match="KV target is required"):
        prefill.add_request(["x"], [5, 6], params)
    with pytest.raises(ValueError, match="needs 1"):
        prefill.add_request(["x"], [5, 6], params, kv_target=KvTarget("grpc", [1, 2]))
    with pytest.raises(ValueError, match="page ids"):
        prefill.add_request(["x"], [5, 6], params, kv_target=KvTarget("grpc", [10_000]))
    with pytest.raises(ValueError, match="no NIXL agent"):
        prefill.add_request(["x"], [5, 6], params, kv_target=KvTarget("nixl", [1], "someone"))
    prefill.check_idle()


@OVERLAP
def test_full_decode_engine_queues_reservations_first_come_first_served(
    tiny_llama: Path, overlap: bool
) -> None:
    prefill, decode = make_pair(tiny_llama, "grpc", max_total_tokens=64, enable_overlap_schedule=overlap)
    params = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    a, b, c = (list(range(5 + i, 45 + i)) for i in range(3))  # 40 tokens: 3 of the 4 pages each
    pages_a = reserve(decode, "a", a, params)
    assert pages_a is not None and len(pages_a) == 3
    assert reserve(decode, "b", b, params) is None  # no room: queued, holds nothing
    assert reserve(decode, "c", c, params) is None
    decode.abort("c")  # aborted while queued: the reservation is refused and the request ends
    ((rids, pages, error, reservation),) = decode.take_admissions()
    assert (rids, pages, reservation) == (["c"], None, True)
    assert isinstance(error, CapacityError) and error.message == "aborted"
    (ended,) = decode.step()
    assert ended.rid == "c" and ended.finish_reason == {"type": "abort", "message": "aborted"}
    # a runs to the end; its pages go back and b is granted them
    prefill.add_request(["a"], a, params, kv_target=KvTarget("grpc", pages_a))
    (out,) = step_until_finished(prefill)
    decode.commit_kv(KvCommit.decode(out.kv_commit), out.kv_payload)  # type: ignore[arg-type]
    finished = []
    while not finished:
        finished = [o for o in decode.step() if o.finished]
    assert finished[0].rid == "a" and finished[0].completion_tokens == 3
    decode.step()
    ((rids, pages_b, error, reservation),) = decode.take_admissions()
    assert rids == ["b"] and pages_b is not None and len(pages_b) == 3 and error is None
    assert reservation
    prefill.add_request(["b"], b, params, kv_target=KvTarget("grpc", pages_b))
    (out,) = step_until_finished(prefill)
    got = deliver_and_decode(decode, out)
    assert got == hf_greedy(tiny_llama, b, 3)
    wait_idle(decode)


@OVERLAP
def test_queued_reservation_waits_past_the_lease_which_starts_when_granted(
    tiny_llama: Path, overlap: bool
) -> None:
    # The lease guards liveness, not queueing: b waits for room far longer than the lease, and
    # its lease only starts when its pages are granted.
    prefill, decode = make_pair(
        tiny_llama, "grpc", max_total_tokens=64, kv_transfer_timeout_s=0.2, enable_overlap_schedule=overlap
    )
    params = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    a, b = list(range(5, 45)), list(range(6, 46))
    pages_a = reserve(decode, "a", a, params)
    assert pages_a is not None
    assert reserve(decode, "b", b, params) is None
    time.sleep(0.15)  # a is within its lease
    prefill.add_request(["a"], a, params, kv_target=KvTarget("grpc", pages_a))
    (out,) = step_until_finished(prefill)
    decode.commit_kv(KvCommit.decode(out.kv_commit), out.kv_payload)  # type: ignore[arg-type]
    time.sleep(0.3)  # b has queued longer than a lease: still queued, not refused
    assert decode.take_admissions() == []
    while not any(o.finished for o in decode.step()):
        pass
    decode.step()
    ((_, pages_b, error, _),) = decode.take_admissions()
    assert error is None and pages_b is not None
    prefill.add_request(["b"], b, params, kv_target=KvTarget("grpc", pages_b))
    (out,) = step_until_finished(prefill)
    got = deliver_and_decode(decode, out)
    assert got == hf_greedy(tiny_llama, b, 3)
    assert decode.stats()["kv_reservations_expired"] == 0
    wait_idle(decode)


@OVERLAP
def test_prefill_asks_for_pages_when_it_schedules_the_prompt(tiny_llama: Path, overlap: bool) -> None:
    # The decode engine holds nothing for a prompt that is still queued for prefill.
    prefill, decode = make_pair(tiny_llama, "grpc", chunked_prefill_size=16, enable_overlap_schedule=overlap)
    params = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    ids = list(range(5, 45))  # three 16-token chunks
    free = decode.stats()["kv_free_tokens"]
    submit(prefill, decode, "r", ids, params)
    assert decode.stats()["kv_free_tokens"] == free  # expected, nothing reserved
    outs = prefill.step()  # the first chunk: the reservation is asked for now, not before
    assert [(o.rid, o.kv_pages_wanted) for o in outs] == [("r", 3)]
    forward_targets(prefill, decode, outs)
    assert decode.stats()["kv_free_tokens"] == free - 48
    with pytest.raises(ValueError, match="no request 'r' is waiting"):
        decode.reserve_kv("r")  # once only
    (out,) = forward_targets(prefill, decode, step_until_finished(prefill))
    got = deliver_and_decode(decode, out)
    assert got == hf_greedy(tiny_llama, ids, 3)
    wait_idle(prefill)
    wait_idle(decode)


@OVERLAP
def test_prefill_waits_for_a_late_reservation_then_sends(tiny_llama: Path, overlap: bool) -> None:
    # The prompt finishes before the decode engine has room: the prefill engine parks it with
    # its pages and sends once the pages come; a bad page list aborts it.
    prefill, decode = make_pair(tiny_llama, "grpc", enable_overlap_schedule=overlap)
    params = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
    ids = list(range(5, 30))
    submit(prefill, decode, "r", ids, params)
    submit(prefill, decode, "bad", ids, params)
    wanted = [o for o in prefill.step() if o.kv_pages_wanted]
    assert sorted(o.rid for o in wanted) == ["bad", "r"]
    for _ in range(3):
        assert prefill.step() == []  # both parked after their first token, holding their KV
    assert prefill.stats()["parked_requests"] == 2
    prefill.set_kv_target("bad", [1, 2, 3])  # three pages for a prompt of two
    (failed,) = prefill.step()
    assert failed.rid == "bad" and failed.finish_reason is not None
    assert failed.finish_reason["message"].startswith("bad KV target: the KV target has 3 pages")
    decode.abort("bad")
    pages = decode.reserve_kv("r")
    assert pages is not None
    prefill.set_kv_target("r", pages)
    (out,) = step_until_finished(prefill)
    assert out.finish_reason == {"type": "transferred"}
    got = deliver_and_decode(decode, out)
    assert got == hf_greedy(tiny_llama, ids, 2)
    wait_idle(prefill)
    wait_idle(decode)


def _record_writes_and_forwards(prefill: EngineCore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The order in which the prefill engine launches forwards, waits for a launched step (its
    tokens, or a step that sampled nothing having run) and posts NIXL writes ("write N": N pages)."""
    events: list[str] = []
    forward, write = prefill.runner.forward, prefill.agent.write  # type: ignore[union-attr]
    to_host = InflightStep.to_host

    def recording_forward(*args: object, **kwargs: object) -> object:
        events.append("forward")
        return forward(*args, **kwargs)

    def recording_write(peer: str, src: list[int], *args: object) -> object:
        events.append(f"write {len(src)}")
        return write(peer, src, *args)

    def recording_to_host(step: InflightStep) -> object:
        events.append("wait")
        return to_host(step)

    prefill.runner.forward = recording_forward  # type: ignore[method-assign]
    prefill.agent.write = recording_write  # type: ignore[method-assign,union-attr]
    monkeypatch.setattr(InflightStep, "to_host", recording_to_host)
    return events


@NIXL_ONLY
@OVERLAP
def test_pages_stream_only_once_the_forward_that_computed_them_has_run(
    tiny_llama: Path, overlap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write reads the pages on a stream of its own, so a chunk's pages go out only once the
    engine has waited for the step that computed them: at the end of that step, or with overlap
    scheduling in the next one, after launching the next chunk, whose page must not go yet."""
    options = {"chunked_prefill_size": 16, "enable_overlap_schedule": overlap}
    prefill, decode = make_pair(tiny_llama, "nixl", **options)
    assert prefill.overlap is overlap
    params = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
    ids = list(range(5, 45))  # three 16-token chunks of one 16-token page each (the last 8 tokens)
    submit(prefill, decode, "r", ids, params)
    events = _record_writes_and_forwards(prefill, monkeypatch)
    forward_targets(prefill, decode, prefill.step())  # the first chunk; its pages granted after
    assert events == (["forward"] if overlap else ["forward", "wait"])
    events.clear()
    prefill.step()  # the second chunk
    # overlap: the first chunk's page (its step waited for now); else the two computed so far
    assert events == (["forward", "wait", "write 1"] if overlap else ["forward", "wait", "write 2"])
    events.clear()
    prefill.step()  # the last chunk samples
    assert events[:3] == (["forward", "wait", "write 1"] if overlap else ["forward", "wait"])
    # The last page goes with the commit, once the earlier writes landed.
    assert drain(prefill, decode) == {"r": hf_greedy(tiny_llama, ids, 2)}
    assert [e for e in events if e.startswith("write")] == (["write 1"] * 2 if overlap else ["write 1"])


def drain(prefill: EngineCore, decode: EngineCore) -> dict[str, list[int]]:
    """Step both engines (answering reservations) until both are idle: each request's tokens."""
    tokens: dict[str, list[int]] = {}
    deadline = time.monotonic() + 60
    while any(core.has_work or core.waiting_in_background for core in (prefill, decode)):
        forward_targets(prefill, decode, prefill.step())
        for out in decode.step():
            tokens.setdefault(out.rid, []).extend(out.new_ids)
        assert time.monotonic() < deadline, "no progress"
    wait_idle(prefill)
    wait_idle(decode)
    return tokens


@NIXL_ONLY
@OVERLAP
def test_a_busy_prefill_engine_posts_the_last_write_behind_its_next_forward(
    tiny_llama: Path, overlap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Posting a write costs the host a descriptor per page run and buffer: with more prompts to
    compute, the prefill engine posts a finished prompt's write once it has launched the next
    forward (the GPU busy meanwhile), not while the GPU waits between steps."""
    prefill, decode = make_pair(tiny_llama, "nixl", enable_overlap_schedule=overlap)
    params = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    a, b = list(range(5, 30)), list(range(40, 75))
    submit(prefill, decode, "a", a, params)
    # a computed (with overlap: its token not read yet), its pages not here yet
    assert [o.kv_pages_wanted for o in prefill.step()] == [2]
    submit(prefill, decode, "b", b, params)
    events = _record_writes_and_forwards(prefill, monkeypatch)
    pages = decode.reserve_kv("a")
    assert pages is not None
    prefill.set_kv_target("a", pages)
    assert events == []  # b is queued: a step follows at once
    outs = prefill.step()
    # b's forward launched, then a's write posted (then b read), or with overlap: b's forward
    # launched, a read, its write posted (b left in flight)
    assert events == (["forward", "wait", "write 2"] if overlap else ["forward", "write 2", "wait"])
    forward_targets(prefill, decode, outs)
    assert drain(prefill, decode) == {"a": hf_greedy(tiny_llama, a, 3), "b": hf_greedy(tiny_llama, b, 3)}


@NIXL_ONLY
def test_an_idle_prefill_engine_posts_the_last_write_at_once(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing else to compute the write goes out without waiting for another step: when
    the pages come after the prompt finished, and in the step that finishes it when they came
    before (a prompt of two chunks, its pages granted after the first). Without overlap, so that
    the step that launches the last chunk also reads it (with overlap the next one does, at once:
    the engine has a step in flight)."""
    prefill, decode = make_pair(tiny_llama, "nixl", chunked_prefill_size=16, enable_overlap_schedule=False)
    params = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
    late, early = list(range(5, 20)), list(range(40, 65))
    submit(prefill, decode, "late", late, params)
    prefill.step()
    events = _record_writes_and_forwards(prefill, monkeypatch)
    pages = decode.reserve_kv("late")
    assert pages is not None
    prefill.set_kv_target("late", pages)
    assert events == ["write 1"]
    submit(prefill, decode, "early", early, params)
    forward_targets(prefill, decode, prefill.step())  # the first chunk; its pages granted
    events.clear()
    prefill.step()  # the last chunk
    assert events == ["forward", "wait", "write 2"]  # both pages with the commit
    assert drain(prefill, decode) == {
        "late": hf_greedy(tiny_llama, late, 2),
        "early": hf_greedy(tiny_llama, early, 2),
    }


def test_a_malformed_payload_fails_only_its_request(tiny_llama: Path) -> None:
    decode = build_core(tiny_llama, disaggregation_mode="decode", kv_transport="grpc")
    pages = reserve(decode, "r", list(range(5, 30)), SamplingParams(max_new_tokens=2))
    assert pages is not None
    decode.commit_kv(KvCommit("r", 5, 0), b"garbage")
    (out,) = decode.step()
    assert out.finish_reason is not None and out.finish_reason["message"].startswith("bad KV payload")
    wait_idle(decode)


@pytest.mark.skipif(not nixl_available(), reason="NIXL is not installed")
def test_nixl_target_must_be_a_known_peer(tiny_model_factory: Callable[..., Path], tiny_llama: Path) -> None:
    prefill = build_core(tiny_llama, disaggregation_mode="prefill", kv_transport="nixl")
    with pytest.raises(ValueError, match="unknown KV peer"):
        prefill.add_request(["x"], [5, 6], SamplingParams(), kv_target=KvTarget("nixl", [1], "nobody"))
    other = build_core(
        tiny_model_factory("llama", num_hidden_layers=3), disaggregation_mode="decode", kv_transport="nixl"
    )
    assert other.agent is not None
    with pytest.raises(ValueError, match="KV layout mismatch"):
        prefill.add_peer(other.agent.metadata())


def test_unified_engines_refuse_pd_calls(tiny_llama: Path) -> None:
    core = build_core(tiny_llama)
    with pytest.raises(ValueError, match="only a decode engine"):
        core.expect_kv("x", [5, 6], SamplingParams())
    with pytest.raises(ValueError, match="refused by others"):
        core.add_request(["x"], [5, 6], SamplingParams(), kv_target=KvTarget("grpc", [1]))
    assert run_staggered(core, [[5, 6, 7]], max_new_tokens=2)


def test_a_pd_engine_without_nixl_says_so_at_start(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import shared.engine_core as engine_core
    from shared.config import EngineConfig

    monkeypatch.setattr(engine_core, "nixl_available", lambda: False)
    config = EngineConfig.from_options(str(tiny_llama), disaggregation_mode="decode")
    with caplog.at_level("WARNING"):
        assert engine_core.resolve_transport(config) == "grpc"
    assert "NIXL is not installed: this decode engine moves KV as bytes" in caplog.text
    caplog.clear()
    assert engine_core.resolve_transport(EngineConfig.from_options(str(tiny_llama))) == "grpc"
    assert caplog.text == ""  # a unified engine moves no KV: nothing to say


@NIXL_ONLY
def test_a_removed_peer_goes_once_its_writes_are_over_and_can_be_learnt_again(tiny_llama: Path) -> None:
    """The prefill worker forgets a decode engine it has not sent to for a while (or whose worker
    came back as another engine): its agent stays while a request still writes there, and is
    learnt again from its metadata when it is next a target."""
    prefill, decode = make_pair(tiny_llama, "nixl")
    assert decode.agent is not None and prefill.agent is not None
    peer, params = decode.agent.name, SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    first, second = list(range(5, 30)), list(range(40, 52))
    submit(prefill, decode, "first", first, params)
    prefill.remove_peer(peer)  # "first" still goes there
    assert prefill.agent.has_peer(peer) and prefill.stats()["kv_peers"] == 1
    assert drain(prefill, decode) == {"first": hf_greedy(tiny_llama, first, 3)}
    assert not prefill.agent.has_peer(peer) and prefill.stats()["kv_peers"] == 0
    with pytest.raises(ValueError, match="unknown KV peer"):
        prefill.add_request(["refused"], second, params, kv_target=KvTarget("nixl", [], peer))
    assert prefill.add_peer(decode.agent.metadata()) == peer
    submit(prefill, decode, "second", second, params)
    prefill.remove_peer(peer)
    assert prefill.add_peer(decode.agent.metadata()) == peer  # wanted again before it went
    assert drain(prefill, decode) == {"second": hf_greedy(tiny_llama, second, 3)}
    assert prefill.agent.has_peer(peer) and prefill.stats()["kv_peers"] == 1
