"""A model of a GPU's engine steps, to time the real engine on a CPU as if it ran on that GPU.

The model (defaults: one H200, the Llama-3-8B shape, split mixed steps; docs/benchmarks.md r20):

    decode-only step        decode_ms + row_ms x decode rows
    step with prompt tokens token_us x prompt tokens, + overlap_ms when decode rows ride along

`scale` stretches every step (2: a GPU half as fast), for a CPU too slow or too shared to keep
the model's pace at scale 1.

Two users:
- `bench/schedule_sim.py` steps an `EngineCore` itself and advances a clock by `step_ms`;
- `bench/serving.py --device-model SPEC` serves the whole suite (gateway, router, worker, engine
  process) on the CPU with every engine step stretched to its modelled time. The engine's own
  host work is real (scheduling, the KV pool and radix cache, sampling, detokenizing, the
  outputs' way back); the model's forward is not run (a CPU computes a 1024-token prompt's
  attention far slower than the modelled GPU): it returns random logits at once and the step
  sleeps out what is left of its modelled time. The suite's processes pick that up from the
  environment (`env()`): the `sitecustomize` in bench/device_model_site/ patches the engine when
  the engine process imports `shared.engine_core`. What the suite then measures beyond the
  scheduling-only figures of schedule_sim is the serving path's share, found without a GPU.

SPEC is `key=value` pairs, e.g. `scale=2,token_us=24.5` (keys: the fields below; unnamed keys
keep their defaults).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

ENV = "TANDEM_BENCH_DEVICE_MODEL"  # the spec, for the suite's processes
SITE_DIR = Path(__file__).resolve().parent / "device_model_site"


@dataclass(frozen=True)
class StepModel:
    decode_ms: float = 7.0  # a decode-only step's fixed time
    row_ms: float = 0.02  # ... and its time a decode row
    token_us: float = 24.5  # a prompt token's time in a step
    overlap_ms: float = 6.0  # decode rows beside prompt tokens (split steps)
    scale: float = 1.0  # every step x this

    @classmethod
    def parse(cls, spec: str) -> StepModel:
        """`key=value,...` over the defaults; a clear ValueError for anything else."""
        known = {f.name for f in fields(cls)}
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in known:
                raise ValueError(f"device model: {part!r} is not key=value with a key in {sorted(known)}")
            try:
                values[key.strip()] = float(value)
            except ValueError:
                raise ValueError(f"device model: {key.strip()}={value!r} is not a number") from None
        model = cls(**values)
        if min(asdict(model).values()) < 0 or model.scale <= 0:
            raise ValueError(f"device model: times must be >= 0 and scale > 0 ({spec!r})")
        return model

    def spec(self) -> str:
        return ",".join(f"{k}={v:g}" for k, v in asdict(self).items())

    def step_ms(self, prompt_tokens: int, decode_rows: int) -> float:
        """The modelled time of a step that ran `prompt_tokens` and `decode_rows`."""
        if prompt_tokens:
            ms = prompt_tokens * self.token_us / 1e3 + (self.overlap_ms if decode_rows else 0.0)
        elif decode_rows:
            ms = self.decode_ms + self.row_ms * decode_rows
        else:
            ms = 0.0
        return ms * self.scale


def env(model: StepModel) -> dict[str, str]:
    """What the suite's processes need in their environment to run with `model`'s steps."""
    root = str(Path(__file__).resolve().parents[1])
    path = [str(SITE_DIR), root, *filter(None, [os.environ.get("PYTHONPATH")])]
    return {ENV: model.spec(), "PYTHONPATH": os.pathsep.join(path)}


class DeviceClock:
    """When a modelled device finishes the steps launched on it, one after another (seconds on
    the caller's clock)."""

    def __init__(self, model: StepModel) -> None:
        self.model = model
        self.busy_until = 0.0

    def launch(self, now: float, prompt_tokens: int, decode_rows: int) -> None:
        """A step launched at `now`: it starts once the device is free."""
        if prompt_tokens or decode_rows:
            ms = self.model.step_ms(prompt_tokens, decode_rows)
            self.busy_until = max(now, self.busy_until) + ms / 1e3


def step_with_model(core: Any, step: Any, clock: DeviceClock, now: float) -> tuple[Any, float]:
    """Run `step` (the real `EngineCore.step`) as the modelled device would time it, the call
    taken to start at `now`: returns its outputs and when they are ready. With overlap
    scheduling a step launches N+1 and reads N, so its outputs are ready when N is done (the
    device then runs N+1); without, they are ready when the step's own launch is done."""
    counters = core.step_stats.counters
    tokens, rows = counters["engine_prefill_tokens"], counters["engine_decode_rows"]
    in_flight_done = clock.busy_until  # N's end: the step launched last time, still running
    outputs = step(core)
    clock.launch(now, counters["engine_prefill_tokens"] - tokens, counters["engine_decode_rows"] - rows)
    ready = in_flight_done if core.step_in_flight else clock.busy_until
    return outputs, max(now, ready)


def patch_engine_core(module: Any, model: StepModel) -> None:
    """Time `module.EngineCore.step` by the model (`step_with_model` on the wall clock): a step
    returns once its outputs would be ready, sleeping out the rest after the step's own
    accounting (the engine's host figures are its real host work). The model's forward gives
    random logits instead of running (ids in the upper half of the vocabulary: clear of the
    special tokens)."""
    import torch

    def forward(self: Any, batch: Any, prev: Any = None) -> torch.Tensor:
        self.req_pool.flush()  # the request -> token table's pending writes, as a forward takes them
        rows = sum(1 for it in batch.items if it.sample)
        logits = torch.zeros(rows, self.vocab_size)
        logits[torch.arange(rows), torch.randint(self.vocab_size // 2, self.vocab_size, (rows,))] = 1.0
        return logits

    module.ModelRunner.forward = forward
    core_cls = module.EngineCore
    real_step = core_cls.step
    clocks: dict[int, DeviceClock] = {}

    @functools.wraps(real_step)
    def step(self: Any) -> Any:
        clock = clocks.setdefault(id(self), DeviceClock(model))
        outputs, ready = step_with_model(self, real_step, clock, time.perf_counter())
        time.sleep(max(0.0, ready - time.perf_counter()))
        return outputs

    step.device_model = model.spec()  # type: ignore[attr-defined]  # what a check can look for
    core_cls.step = step
