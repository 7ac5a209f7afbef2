"""Scheduler behaviour through a real EngineCore: chunking, policies, aborts, limits, failures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from shared import Engine
from shared.config import EngineConfig
from shared.engine_core import EngineCore, RequestOutput
from shared.sampling import SamplingParams
from shared.scheduler.scheduler import ScheduleBatch
from tests.engine.hf_reference import hf_greedy

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)


def core_for(path: Path, **options: object) -> EngineCore:
    # These tests schedule and run batches by hand between steps: no step may be in flight
    # (overlap scheduling is tested in test_overlap.py). A fixed pool: engines share a GPU.
    options.setdefault("enable_overlap_schedule", False)
    options.setdefault("max_total_tokens", 4096)
    return EngineCore(EngineConfig.from_options(str(path), debug_invariants=True, **options))


def drain(core: EngineCore, limit: int = 500) -> list[RequestOutput]:
    outputs: list[RequestOutput] = []
    for _ in range(limit):
        if not core.has_work:
            return outputs
        outputs += core.step()
    raise AssertionError("engine did not go idle")


def run_batch(core: EngineCore, batch: ScheduleBatch) -> None:
    """One step on a batch the test scheduled itself: forward, sample, read the tokens."""
    launched = core._launch(batch, core.runner.forward(batch))
    if launched is not None:
        core._resolve(launched)


def test_chunked_prefill_splits_a_long_prompt_under_the_budget(tiny_llama: Path) -> None:
    core = core_for(tiny_llama, chunked_prefill_size=16, page_size=4)
    prompt = list(range(10, 60))  # 50 tokens -> chunks of 16, 16, 16, 2
    core.add_request(["a"], prompt, GREEDY)
    sizes = []
    while core.has_work:
        batch = core.scheduler.schedule()
        assert batch is not None
        sizes.append(batch.num_tokens)
        assert batch.num_tokens <= 16
        run_batch(core, batch)
        core._pending_outputs.clear()
    assert sizes[:4] == [16, 16, 16, 2] and sizes[4:] == [1] * 7
    core.check_idle()


def test_decode_and_prefill_share_a_step(tiny_llama: Path) -> None:
    core = core_for(tiny_llama, chunked_prefill_size=64)
    core.add_request(["a"], list(range(10, 20)), GREEDY)
    core.step()  # a's prefill
    core.add_request(["b"], list(range(30, 45)), GREEDY)
    batch = core.scheduler.schedule()
    assert batch is not None
    assert [(it.req.rid, it.extend_len) for it in batch.items] == [("a", 1), ("b", 15)]
    run_batch(core, batch)
    drain(core)
    core.check_idle()


def test_lpm_admits_the_request_with_the_longest_cached_prefix_first(tiny_llama: Path) -> None:
    core = core_for(tiny_llama, schedule_policy="lpm", page_size=4, max_running_requests=1)
    shared = list(range(10, 50))
    core.add_request(["warm"], [*shared, 5], GREEDY)
    drain(core)
    core.add_request(["cold"], list(range(60, 90)), GREEDY)  # arrives first, nothing cached
    core.add_request(["hot"], [*shared, 6, 7], GREEDY)
    first = core.scheduler.schedule()
    assert first is not None and [it.req.rid for it in first.items] == ["hot"]
    run_batch(core, first)
    drain(core)
    core.check_idle()


@pytest.mark.parametrize("when", ["waiting", "mid-prefill", "decoding"])
def test_abort_frees_everything_the_request_held(tiny_llama: Path, when: str) -> None:
    core = core_for(tiny_llama, chunked_prefill_size=8, page_size=4)
    core.add_request(["keep"], list(range(10, 30)), GREEDY)
    core.add_request(["gone"], list(range(40, 70)), SamplingParams(max_new_tokens=50, ignore_eos=True))
    steps = {"waiting": 0, "mid-prefill": 4, "decoding": 9}[when]
    outputs = []
    for _ in range(steps):
        outputs += core.step()
    gone = next(r for r in core.scheduler.waiting + core.scheduler.running if r.rid == "gone")
    assert (gone in core.scheduler.waiting) == (when == "waiting")
    assert (len(gone.output_ids) > 0) == (when == "decoding")
    core.abort("gone")
    outputs += drain(core)
    last = [o for o in outputs if o.rid == "gone"][-1]
    assert last.finished and last.finish_reason == {"type": "abort", "message": "aborted"}
    keep = [t for o in outputs if o.rid == "keep" for t in o.new_ids]
    assert keep == hf_greedy(tiny_llama, list(range(10, 30)), 8)
    core.check_idle()


def test_context_limit_finishes_with_length(tiny_llama: Path) -> None:
    core = core_for(tiny_llama, max_context_len=24)
    core.add_request(["a"], list(range(10, 30)), SamplingParams(max_new_tokens=100, ignore_eos=True))
    out = drain(core)
    assert sum(len(o.new_ids) for o in out) == 4  # 20 prompt tokens + 4 = the 24-token context
    assert out[-1].finish_reason == {"type": "length"}
    with pytest.raises(ValueError, match="context"):
        core.add_request(["b"], list(range(10, 34)), GREEDY)


def test_max_new_tokens_zero_finishes_at_once(tiny_llama: Path) -> None:
    core = core_for(tiny_llama)
    core.add_request(["z"], [10, 11, 12], SamplingParams(max_new_tokens=0))
    out = drain(core)
    assert [(o.rid, o.new_ids, o.finished) for o in out] == [("z", [], True)]
    core.check_idle()


def test_request_ids_must_be_unique_while_running(tiny_llama: Path) -> None:
    core = core_for(tiny_llama)
    core.add_request(["dup"], [10, 11], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        core.add_request(["dup"], [10, 11], GREEDY)
    drain(core)
    core.add_request(["dup"], [10, 11], GREEDY)  # free again once finished
    drain(core)


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(
    tiny_model_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_model_factory("llama")
    with Engine(model_path=str(path), debug_invariants=True) as engine:
        real_forward = engine.core.runner.forward
        calls = {"n": 0}

        def flaky(batch: object, prev: object = None) -> object:
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("simulated device fault")
            return real_forward(batch, prev)  # type: ignore[arg-type]

        monkeypatch.setattr(engine.core.runner, "forward", flaky)
        with pytest.raises(RuntimeError, match="simulated device fault"):
            engine.generate("this request hits the fault", {"max_new_tokens": 5})
        out = engine.generate("the next one works", {"max_new_tokens": 5, "ignore_eos": True})
        assert len(out["output_ids"]) == 5  # type: ignore[index]
        engine._call(engine.core.check_idle).result(timeout=10)
