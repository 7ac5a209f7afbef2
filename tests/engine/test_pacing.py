"""A decode engine paced for a shared GPU spaces its steps only while prompts back up on the
prefill side; it never delays a step with nothing to decode (steps poll for arriving KV), nor
the first token of a prompt whose KV arrives during a pause, and pacing changes no token."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from shared.disagg.pacing import DecodePacer
from shared.outputs import RequestOutput
from shared.sampling import SamplingParams
from shared.transfer import KvCommit
from tests.engine.test_disagg import TRANSPORTS, forward_targets, make_pair, submit, wait_idle
from tests.engine.test_parity import build_core, hf_greedy_cached


def test_pacer_spaces_steps_only_while_prefill_is_backlogged() -> None:
    pacer = DecodePacer(0.02)
    assert pacer.delay(pending=5, running=1, now=10.0) == 0.0  # never stepped yet
    pacer.stepped(10.0)
    assert abs(pacer.delay(pending=5, running=1, now=10.005) - 0.015) < 1e-9
    assert pacer.delay(pending=5, running=1, now=10.03) == 0.0  # the interval has passed
    assert pacer.delay(pending=1, running=1, now=10.005) == 0.0  # prefill keeps up: no pacing
    assert DecodePacer(0.0).delay(pending=9, running=1, now=0.0) == 0.0  # off


def test_a_lower_backlog_ratio_paces_earlier() -> None:
    pacer = DecodePacer(0.02, backlog=0.5)
    pacer.stepped(10.0)
    assert pacer.delay(pending=3, running=4, now=10.005) > 0  # 3 > 0.5 x 4
    assert pacer.delay(pending=2, running=4, now=10.005) == 0.0  # 2 is not


def test_paced_decode_engine_waits_while_prompts_are_pending_and_gives_the_same_tokens(
    tiny_llama: Path,
) -> None:
    prefill, decode = make_pair(tiny_llama, "grpc", decode_step_interval_ms=200.0)
    params = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    first, later = list(range(5, 30)), [list(range(6 + i, 31 + i)) for i in range(2)]
    assert decode.step_delay() == 0.0
    submit(prefill, decode, "a", first, params)
    for i, ids in enumerate(later):  # two more prompts the prefill side has not run yet
        decode.expect_kv(f"b{i}", ids, params)
    forward_targets(prefill, decode, prefill.step())  # asks for pages; the prompt is done
    (out,) = prefill.step()  # the pages it got are sent
    decode.commit_kv(KvCommit.decode(out.kv_commit), out.kv_payload)  # type: ignore[arg-type]
    tokens = [t for o in decode.step() for t in o.new_ids]  # a runs; 2 pending > 1 running
    assert 0.1 < decode.step_delay() <= 0.2
    time.sleep(decode.step_delay())
    while decode.has_work:
        assert decode.step_delay() < 0.01 or decode.step_delay() > 0.1
        time.sleep(decode.step_delay())
        tokens += [t for o in decode.step() for t in o.new_ids]
    assert tokens == hf_greedy_cached(tiny_llama, first, 3)
    for i in range(2):
        decode.abort(f"b{i}")
    assert decode.step_delay() == 0.0
    wait_idle(prefill)
    wait_idle(decode)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_first_token_of_kv_arriving_during_a_pause_goes_out_without_a_step(
    tiny_llama: Path, transport: str
) -> None:
    prefill, decode = make_pair(tiny_llama, transport, decode_step_interval_ms=2000.0)
    params = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    a, b = list(range(5, 30)), list(range(40, 60))
    for i in range(3):  # prompts the prefill side has not run: the backlog that paces decode
        decode.expect_kv(f"later{i}", list(range(7 + i, 32 + i)), params)

    got: list[RequestOutput] = []  # what decode.poll_paced gave, not yet looked at

    def prefill_one(rid: str, ids: list[int]) -> None:
        """Run the prompt on the prefill side until its KV is sent (gRPC: delivered here). The
        decode side is polled meanwhile, as its loop does: UCX progresses on both ends."""
        submit(prefill, decode, rid, ids, params)
        deadline = time.monotonic() + 30
        while True:
            outs = forward_targets(prefill, decode, prefill.step())
            got.extend(decode.poll_paced())
            if outs:
                (out,) = outs
                if out.kv_commit is not None:
                    decode.commit_kv(KvCommit.decode(out.kv_commit), out.kv_payload)
                return
            assert time.monotonic() < deadline, "the prefill side never sent the KV"

    def arrivals() -> list[RequestOutput]:
        """poll_paced until something arrived (NIXL's notification comes asynchronously)."""
        deadline = time.monotonic() + 30
        while not got:
            got.extend(decode.poll_paced())
            assert time.monotonic() < deadline, "nothing arrived"
            time.sleep(0.001)
        outs = list(got)
        got.clear()
        return outs

    prefill_one("a", a)
    (first_a,) = arrivals()  # no step yet: nothing runs, so nothing paces it either
    tokens = {"a": list(first_a.new_ids)}
    tokens["a"] += [t for o in decode.step() for t in o.new_ids]  # a decodes; 3 pending > 1 running
    assert decode.step_delay() > 1.5
    prefill_one("b", b)
    arrived = arrivals()  # within the pause: b's first token, nothing decoded for a
    assert [(o.rid, len(o.new_ids)) for o in arrived] == [("b", 1)]
    tokens["b"] = list(arrived[0].new_ids)
    assert decode.step_delay() > 1.0, "an arrival does not cut the pause short"
    for i in range(3):
        decode.abort(f"later{i}")
    while decode.has_work:
        for o in decode.step():
            tokens.setdefault(o.rid, []).extend(o.new_ids)
    assert tokens.pop("a") == hf_greedy_cached(tiny_llama, a, 3)
    assert tokens.pop("b") == hf_greedy_cached(tiny_llama, b, 3)
    assert tokens == {f"later{i}": [] for i in range(3)}  # aborted before their KV came
    wait_idle(prefill)
    wait_idle(decode)


def test_first_token_of_arrived_kv_goes_out_before_the_decode_forward(tiny_llama: Path) -> None:
    """Unpaced too: the engine process's `early_outputs` gets a first token that came with its
    KV before the step that admits the request launches its forward."""
    prefill, decode = make_pair(tiny_llama, "grpc")
    params = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    ids = list(range(5, 30))
    events: list[object] = []
    decode.early_outputs = events.append
    forward = decode.runner.forward

    def recording_forward(*args: object, **kwargs: object) -> object:
        events.append("forward")
        return forward(*args, **kwargs)

    decode.runner.forward = recording_forward  # type: ignore[method-assign]
    submit(prefill, decode, "a", ids, params)
    forward_targets(prefill, decode, prefill.step())
    (out,) = prefill.step()
    decode.commit_kv(KvCommit.decode(out.kv_commit), out.kv_payload)  # type: ignore[arg-type]
    later = decode.step()
    early, marker = events[:2]
    assert marker == "forward"
    assert isinstance(early, list) and [(o.rid, len(o.new_ids)) for o in early] == [("a", 1)]
    tokens = [*early[0].new_ids, *(t for o in later for t in o.new_ids)]
    while decode.has_work:
        tokens += [t for o in decode.step() for t in o.new_ids]
    tokens += [t for batch in events[2:] if isinstance(batch, list) for o in batch for t in o.new_ids]
    assert tokens == hf_greedy_cached(tiny_llama, ids, 3)
    wait_idle(prefill)
    wait_idle(decode)


def test_a_unified_engine_returns_every_output_from_its_step(tiny_llama: Path) -> None:
    """Early outputs are a PD engine's: a unified one (DP attention's rank 0 closes its requests
    from what `step` returns) keeps an abort that came before the step in the step's outputs."""
    core = build_core(tiny_llama)
    early: list[object] = []
    core.early_outputs = early.append
    params = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    core.add_request(["a"], list(range(5, 30)), params)
    core.add_request(["b"], list(range(6, 31)), params)
    core.abort("b")
    outs = core.step()
    assert early == []
    assert [(o.rid, o.finished) for o in outs if o.rid == "b"] == [("b", True)]
    while core.has_work:
        core.step()


def test_pacing_options_are_validated(tiny_llama: Path) -> None:
    from shared.config import EngineConfig

    for option in ("decode_step_interval_ms", "decode_pacing_backlog"):
        with pytest.raises(ValueError, match=f"{option} must be >= 0, got -1"):
            EngineConfig.from_options(str(tiny_llama), **{option: -1})
