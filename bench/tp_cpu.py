"""Tensor parallelism's cost on the CPU: engine step time at tp_size 2 vs 1 on the same tiny model,
and the share of rank 0's step spent in collectives (gloo).

Each tp_size runs in a fresh process that is rank 0 itself: it starts the follower ranks (real
subprocesses, as the engine process does), builds an `EngineCore` and steps it directly, timing
every `step()`. Rank 0's collectives are timed by wrapping the three functions all of them go
through (`parallel_state.all_reduce`, `parallel_state.gather_last_dim`, `StepBroadcast._broadcast`);
a collective's time on rank 0 includes waiting for the slower rank, so it is what the step pays
for being split. One torch thread per rank (`--threads`). Ratios only: CPU numbers depend on the
machine and whatever else it runs.

    python bench/tp_cpu.py                          # 4 x 64 greedy tokens, 4-layer Llama, hidden 256
    python bench/tp_cpu.py --tp 1 2 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.offline_throughput import build_model


class CollectiveTimer:
    """Wall time and count of rank 0's collectives, by kind, while installed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def install(self) -> None:
        from shared.distributed import parallel_state
        from shared.distributed.step_sync import StepBroadcast

        parallel_state.all_reduce = self._timed("all_reduce", parallel_state.all_reduce)
        parallel_state.gather_last_dim = self._timed("gather", parallel_state.gather_last_dim)
        StepBroadcast._broadcast = staticmethod(self._timed("broadcast", StepBroadcast._broadcast))

    def reset(self) -> None:
        self.seconds.clear()
        self.counts.clear()

    def _timed(self, kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a)
            finally:
                self.seconds[kind] += time.perf_counter() - start
                self.counts[kind] += 1

        return timed


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One tp_size, in this process as rank 0: per-step times and collective times."""
    import torch

    from shared.config import EngineConfig
    from shared.distributed import parallel_state
    from shared.distributed.launch import start_ranks
    from shared.engine_core import EngineCore
    from shared.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    config = EngineConfig.from_options(
        args.model, device="cpu", tp_size=args.child, page_size=16, max_total_tokens=16384
    )
    followers = start_ranks(config)
    core = EngineCore(config)
    timer = CollectiveTimer()
    if followers is not None:
        timer.install()
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    def run(prompts: list[list[int]]) -> list[tuple[float, bool]]:
        """(seconds, is a decode step) of every step until the prompts finished."""
        for i, ids in enumerate(prompts):
            core.add_request([f"r{i}-{time.monotonic_ns()}"], ids, params)
        steps, started, finished = [], set(), 0
        while finished < len(prompts):
            decode = len(started) == len(prompts)  # every prompt prefilled: the batch decodes
            start = time.perf_counter()
            outputs = core.step()
            steps.append((time.perf_counter() - start, decode))
            started |= {o.rid for o in outputs if o.new_ids}
            finished += sum(o.finished for o in outputs)
        return steps

    prompts = [[5 + (7 * i + j) % 400 for j in range(args.prompt_len)] for i in range(args.batch)]
    try:
        run(prompts[:1])  # warm-up: first-call allocations, gloo's first buffers
        timer.reset()
        steps = run(prompts)
    finally:
        if followers is not None:
            core.runner.stop_followers()
            followers.stop(graceful=True)
            parallel_state.destroy_tensor_parallel()
    decode = [s for s, is_decode in steps if is_decode]
    total = sum(s for s, _ in steps)
    return {
        "tp_size": args.child,
        "steps": len(steps),
        "total_s": total,
        "decode_step_median_ms": 1000 * statistics.median(decode),
        "collective_s": dict(timer.seconds),
        "collective_mean_us": {k: 1e6 * v / timer.counts[k] for k, v in timer.seconds.items()},
        "collectives_per_step": {k: v / len(steps) for k, v in timer.counts.items()},
        "collective_share": sum(timer.seconds.values()) / total,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tp sizes (the first is the baseline)")
    p.add_argument("--arch", default="llama", help=argparse.SUPPRESS)  # build_model's
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args, Path(tmp) / "model")
        for tp in args.tp:
            run = ["--batch", args.batch, "--prompt-len", args.prompt_len, "--new-tokens", args.new_tokens]
            run += ["--threads", args.threads, "--child", tp, "--model", model]
            cmd = [sys.executable, __file__, *map(str, run)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    base = results[0]
    for r in results:
        r["step_time_ratio"] = r["total_s"] / base["total_s"]
        r["decode_step_ratio"] = r["decode_step_median_ms"] / base["decode_step_median_ms"]
        per_step = ", ".join(
            f"{v:.1f} {k} of {r['collective_mean_us'][k]:.0f} us"
            for k, v in sorted(r["collectives_per_step"].items())
        )
        print(
            f"tp_size {r['tp_size']}: {r['steps']} steps in {r['total_s'] * 1000:.0f} ms"
            f" (x{r['step_time_ratio']:.2f}), decode step median {r['decode_step_median_ms']:.2f} ms"
            f" (x{r['decode_step_ratio']:.2f}), collectives {100 * r['collective_share']:.0f}% of"
            f" rank 0's step time" + (f" (per step: {per_step})" if per_step else "")
        )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "child", "model")}
        args.json.write_text(json.dumps({"args": settings, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
