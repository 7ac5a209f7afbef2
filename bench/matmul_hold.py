"""The dense matmul rate held for seconds, against the short burst the other benches measure.

`bench/gpu_bench.py`'s `matmul_flops` (and with it bench/serving_limits.py's roofline) times 20
back-to-back 8192^3 bf16 matmuls, about 30 ms of work on an H200. Serving runs GEMMs for
minutes; if the GPU's clocks drop under that load (its power cap), the rate a served prompt
step can reach is the held one, not the burst. This runs the same matmul back to back for
`--seconds`, reports the rate of each `--window`, and on a GPU the SM clock and power draw
nvidia-smi reads at the end (docs/benchmarks.md r23: the prompt steps' GEMMs ran at 640-684
TFLOP/s against a 764-790 burst; this says which share of that gap is the hardware's).

    python bench/matmul_hold.py [--seconds 10] [--window 1] [--json out.json]
    python bench/matmul_hold.py --seconds 0.5 --window 0.1        # CPU: float32 1024^3
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_bench import matmul_flops, matmul_operands, sync
from shared.model_runner import resolve_device


def held_rates(device: torch.device, seconds: float, window: float) -> list[float]:
    """FLOP/s of each `window` seconds of back-to-back matmuls (`matmul_operands`, those of
    `matmul_flops`) over `seconds` in all."""
    a, b, _ = matmul_operands(device)
    n = a.shape[0]
    out = torch.empty_like(a)
    rates: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sync(device)
        began, calls = time.perf_counter(), 0
        while time.perf_counter() - began < window:
            torch.matmul(a, b, out=out)
            calls += 1
            if device.type == "cuda" and calls % 8 == 0:
                sync(device)  # keep the host's clock on the device's work, not its queue
        sync(device)
        rates.append(2 * n**3 * calls / (time.perf_counter() - began))
    return rates


def gpu_state() -> dict[str, str] | None:
    """The SM clock, its maximum and the power draw and cap, as nvidia-smi reads them now."""
    if shutil.which("nvidia-smi") is None:
        return None
    fields = "clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,clocks_throttle_reasons.active"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (subprocess.SubprocessError, OSError):
        return None
    values = [v.strip() for v in done.stdout.splitlines()[0].split(",")]
    return dict(zip(fields.split(","), values, strict=False))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="how long to hold the matmuls")
    p.add_argument("--window", type=float, default=1.0, help="seconds a rate is measured over")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.window <= 0 or args.window > args.seconds:
        p.error("--seconds and --window must be positive, the window no longer than the hold")
    device = resolve_device(args.device)
    burst, shape = matmul_flops(device)
    rates = held_rates(device, args.seconds, args.window)
    state = gpu_state() if device.type == "cuda" else None
    result = {"shape": shape, "burst_flops": burst, "held_flops": rates, "gpu_state_at_end": state}
    last = rates[-1]
    print(
        f"matmul {shape}: burst {burst / 1e12:.1f} TFLOP/s; held {args.seconds:g} s: first window"
        f" {rates[0] / 1e12:.1f}, last {last / 1e12:.1f}, min {min(rates) / 1e12:.1f} TFLOP/s"
        f" (last / burst {last / burst:.3f})"
    )
    if state:
        print("at the end: " + ", ".join(f"{k} {v}" for k, v in state.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
