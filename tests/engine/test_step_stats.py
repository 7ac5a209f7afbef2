"""The engine's step counters (shared/step_stats.py) count what its steps ran: a chunked prompt
beside a decoding request is a mixed step, every prompt token computed is counted once, every
decode row once, and host time accrues; GPU timing is off on the CPU."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from shared.inflight import InflightStep
from shared.sampling import SamplingParams
from tests.engine.test_parity import build_core


def test_counts_decode_prefill_and_mixed_steps(tiny_llama: Path) -> None:
    options = {"chunked_prefill_size": 16, "enable_overlap_schedule": False, "step_gpu_timing": True}
    core = build_core(tiny_llama, **options)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    core.add_request(["a"], list(range(5, 15)), params)  # 10 tokens: one step
    steps = 0
    while core.stats().get("generated_tokens", 0) < 2:
        core.step()
        steps += 1
    core.add_request(["b"], list(range(20, 60)), params)  # 40 tokens: three chunks beside a's decoding
    while core.has_work:
        core.step()
        steps += 1
    s = core.stats()
    assert s["engine_steps"] == steps
    assert s["engine_mixed_steps"] >= 2  # b's chunks ran with a's decode rows
    assert s["engine_prefill_tokens"] == 50 == s["prompt_tokens_computed"]
    # Each request's first token comes from its last prompt step, the other 5 from decode rows.
    assert s["engine_decode_rows"] == 2 * 5
    prefill_only = s["engine_steps"] - s["engine_decode_steps"] - s["engine_mixed_steps"]
    assert prefill_only >= 1  # a's prompt, alone
    assert s["engine_step_host_us"] > 0
    # Steps read their tokens (no overlap here: every step waits for its own); on the CPU there
    # is no device to wait on, so the wait is a part of the host time near zero.
    assert 0 <= s["engine_step_wait_us"] < s["engine_step_host_us"]
    assert s.get("engine_step_gpu_us", 0) == 0  # asked for, but there is no GPU to time


def test_the_wait_for_a_launched_steps_tokens_counts_inside_the_step(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU nothing waits; a `to_host` that blocks 5 ms (as on a busy GPU) must show up as
    wait, inside the steps' host time."""
    to_host = InflightStep.to_host

    def slow(self: InflightStep) -> object:
        time.sleep(0.005)
        return to_host(self)

    monkeypatch.setattr(InflightStep, "to_host", slow)
    core = build_core(tiny_llama, enable_overlap_schedule=True)
    core.add_request(["a"], list(range(5, 15)), SamplingParams(max_new_tokens=6, ignore_eos=True))
    while core.has_work:
        core.step()
    s = core.stats()
    assert s["engine_step_wait_us"] >= 6 * 5000  # one read a token
    assert s["engine_step_wait_us"] < s["engine_step_host_us"]
