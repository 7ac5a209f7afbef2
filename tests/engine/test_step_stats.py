"""The engine's step counters (shared/step_stats.py) count what its steps ran: a chunked prompt
beside a decoding request is a mixed step, every prompt token computed is counted once, every
decode row once, and host time accrues; GPU timing is off on the CPU."""

from __future__ import annotations

from pathlib import Path

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
    assert s.get("engine_step_gpu_us", 0) == 0  # asked for, but there is no GPU to time
