"""bench/device_model.py: a model of a GPU's engine steps that times the real engine on the CPU
(bench/schedule_sim.py steps it on a modelled clock; bench/serving.py --device-model runs the
whole suite with every engine process stretched to it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.device_model import DeviceClock, StepModel, env, step_with_model
from shared.config import EngineConfig
from shared.engine_core import EngineCore
from shared.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def test_spec_round_trip_defaults_and_errors() -> None:
    model = StepModel.parse("scale=2, token_us=10")
    assert model == StepModel(token_us=10.0, scale=2.0)
    assert StepModel.parse(model.spec()) == model
    assert StepModel.parse("") == StepModel()
    for bad, says in (("speed=2", "key=value"), ("scale", "key=value"), ("scale=fast", "not a number")):
        with pytest.raises(ValueError, match=says):
            StepModel.parse(bad)
    with pytest.raises(ValueError, match="scale > 0"):
        StepModel.parse("scale=0")


def test_step_times() -> None:
    model = StepModel(decode_ms=7, row_ms=0.5, token_us=100, overlap_ms=6, scale=2)
    assert model.step_ms(0, 4) == pytest.approx(2 * (7 + 2))  # decode only
    assert model.step_ms(100, 0) == pytest.approx(2 * 10)  # prompt tokens only
    assert model.step_ms(100, 4) == pytest.approx(2 * (10 + 6))  # decode rows beside them
    assert model.step_ms(0, 0) == 0


def test_steps_queue_on_the_device() -> None:
    clock = DeviceClock(StepModel(decode_ms=10, row_ms=0))
    clock.launch(1.0, 0, 1)
    assert clock.busy_until == pytest.approx(1.010)
    clock.launch(1.002, 0, 1)  # launched while the first runs: starts when it ends
    assert clock.busy_until == pytest.approx(1.020)
    clock.launch(2.0, 0, 0)  # nothing launched: the device stays as it was
    assert clock.busy_until == pytest.approx(1.020)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_real_engine_on_the_modelled_clock(tiny_llama: Path, overlap: bool) -> None:
    """Outputs are ready when the forward they came from ends: with overlap, a step returns the
    previous launch's tokens (ready at its end) while its own runs on."""
    config = EngineConfig.from_options(str(tiny_llama), device="cpu", enable_overlap_schedule=overlap)
    core = EngineCore(config)
    model = StepModel(decode_ms=10, row_ms=0, token_us=1000, overlap_ms=0)
    clock = DeviceClock(model)
    core.add_request(["a"], list(range(5, 15)), SamplingParams(max_new_tokens=3, ignore_eos=True))
    now, seen = 0.0, []
    while core.has_work:
        outputs, now = step_with_model(core, EngineCore.step, clock, now)
        seen += [(now, len(out.new_ids)) for out in outputs if out.new_ids]
    # the 10-token prompt (10 ms) then two decode steps (10 ms each): tokens at 10, 20, 30 ms
    assert [t for t, _ in seen] == pytest.approx([0.010, 0.020, 0.030])
    assert clock.busy_until == pytest.approx(0.030)


def test_the_suite_environment_patches_the_engine_process_only(tiny_llama: Path) -> None:
    """`env()` on a child's environment: importing the engine core stretches its steps to the
    model and replaces the forward with random ids from the vocabulary's upper half."""
    code = textwrap.dedent(f"""
        import json, time
        import shared.engine_core as m
        from shared.config import EngineConfig
        from shared.sampling import SamplingParams
        core = m.EngineCore(EngineConfig.from_options({str(tiny_llama)!r}, device="cpu"))
        core.add_request(["a"], list(range(5, 13)), SamplingParams(max_new_tokens=4, ignore_eos=True))
        t, ids = time.perf_counter(), []
        while core.has_work:
            ids += [i for out in core.step() for i in out.new_ids]
        patched = getattr(m.EngineCore.step, "device_model", None)
        s, vocab = time.perf_counter() - t, core.runner.vocab_size
        print(json.dumps(dict(s=s, ids=ids, vocab=vocab, patched=patched)))
    """)

    def run(extra: dict[str, str]) -> dict:
        environ = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
        cmd = [sys.executable, "-c", code]
        proc = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return dict(json.loads(proc.stdout.splitlines()[-1]))

    model = StepModel(decode_ms=100, row_ms=0, token_us=0, overlap_ms=0)
    modelled = run(env(model))
    assert modelled["patched"] == model.spec()
    assert len(modelled["ids"]) == 4 and modelled["s"] >= 0.3  # three decode steps of 100 ms
    assert all(modelled["vocab"] // 2 <= i < modelled["vocab"] for i in modelled["ids"])
    assert run({})["patched"] is None
