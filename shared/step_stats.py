"""Where a busy engine's steps go, as cumulative counters.

`EngineCore.stats()` (and so a worker's /metrics) carries them; any interval's figures are
differences of two readings, which is how `bench/serving.py` reports each load level of a real
serving run: steps a second, decode rows and prefill tokens a step, the share of steps that mix
both, the host's time inside `EngineCore.step` a step (and how much of it the host spent blocked
on the device for a launched step's tokens: the rest is the host's own work), and, with
`--step-gpu-timing`, the GPU's time in the step's forward (CUDA events) against the wall clock,
i.e. how busy the engine kept the GPU.

    counter                   what
    engine_steps              steps that ran a forward
    engine_decode_steps       ... of decode rows only (one new token per request)
    engine_mixed_steps        ... with decode rows and prompt tokens together
    engine_decode_rows        decode rows over all steps (/ steps: the decode batch)
    engine_prefill_tokens     prompt tokens computed in steps (chunks, whole prompts)
    engine_step_host_us       host time inside step(), microseconds
    engine_step_wait_us       ... of it blocked on the device for a launched step's results
    engine_step_gpu_us        GPU time of the forwards, microseconds (0 without GPU timing)

Without GPU timing this costs four clock reads and a pass over the batch's items a step. With it,
two CUDA events are recorded around each forward and read once they have completed (never
waited for), a few microseconds of host time a step.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shared.scheduler.scheduler import ScheduleBatch


class StepStats:
    """The counters above; EngineCore calls `began`, `forward` around the model's forward and
    launch, and `ended` once a step."""

    def __init__(self, device: torch.device, gpu_timing: bool) -> None:
        self.counters: Counter[str] = Counter()
        self._device = device
        self._gpu_timing = gpu_timing and device.type == "cuda"
        self._events: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self._began = 0.0

    def began(self) -> None:
        self._began = time.perf_counter()

    @contextlib.contextmanager
    def forward(self, batch: ScheduleBatch) -> Iterator[None]:
        """Count `batch` and, with GPU timing, time the GPU work launched inside the block."""
        decode = sum(1 for it in batch.items if it.extend_len == 1 and it.start > 0)
        prefill = sum(it.extend_len for it in batch.items) - decode
        c = self.counters
        c["engine_steps"] += 1
        c["engine_decode_rows"] += decode
        c["engine_prefill_tokens"] += prefill
        if not prefill:
            c["engine_decode_steps"] += 1
        elif decode:
            c["engine_mixed_steps"] += 1
        if not self._gpu_timing:
            yield
            return
        stream = torch.cuda.current_stream(self._device)  # where the runner launches
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        yield
        end.record(stream)
        self._events.append((start, end))

    def waited(self, seconds: float) -> None:
        """Count `seconds` (inside a step) as the host blocked on the device."""
        self.counters["engine_step_wait_us"] += int(seconds * 1e6)

    def ended(self) -> None:
        self.counters["engine_step_host_us"] += int((time.perf_counter() - self._began) * 1e6)
        while self._events and self._events[0][1].query():  # completed: reading them does not wait
            start, end = self._events.popleft()
            self.counters["engine_step_gpu_us"] += int(start.elapsed_time(end) * 1000)
