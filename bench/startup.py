"""How long `tandem up` takes to serve, and how long a restarted service leaves it unable to.

Starts `tandem up` (the default PD topology, or `--unified`) on a model, `--rounds` times: the
seconds from the launch to the ready-file, and to the first completion through the official
`openai` client. Then, in the last round, kills a worker's engine (the worker exits 1 and the
launcher starts it again) and then the router (SIGKILL), each time timing the gap from the kill
until a completion answers again (polled every 0.3 s).

    python bench/startup.py [--model DIR] [--unified] [--rounds 2] [--json out.json]

Without `--model` a tiny random Llama is built in a temporary directory (no hub needed). On a GPU
pass the worker flags with `--worker-args` (e.g. "--device cuda:0").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.launcher import free_port  # noqa: E402


def launch(model: Path, tmp: Path, unified: bool, worker_args: str) -> tuple[subprocess.Popen[bytes], Path]:
    ready = tmp / "ready.json"
    topology = ["--prefill", "0", "--decode", "0", "--unified", "1"] if unified else []
    cmd = [sys.executable, "-m", "services.cli", "up", "--model", str(model), "--port", str(free_port())]
    cmd += [
        "--log-dir",
        str(tmp / "logs"),
        "--ready-file",
        str(ready),
        "--worker-args",
        worker_args,
        *topology,
    ]
    env = {**os.environ, "TANDEM_HOME": str(tmp), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env), ready


def until(done: Any, what: str, timeout: float = 300.0, every: float = 0.05) -> float:
    """Seconds until `done()` is true."""
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - start


def serves(client: openai.OpenAI, model: str) -> bool:
    try:
        client.completions.create(model=model, prompt="the sea", max_tokens=2)
        return True
    except (openai.APIStatusError, openai.APIConnectionError):
        return False


def children(pid: int) -> list[int]:
    """The pids of the process `pid`'s children (Linux)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def engine_pid(worker_pid: int, name: str = "the worker") -> int:
    """The engine process of the worker process `worker_pid` (a multiprocessing spawn child, not
    its resource tracker)."""
    pids = children(worker_pid)
    for child in pids:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                return child
    raise AssertionError(f"{name} has no engine process among {pids}")


def round_trip(model: Path, tmp: Path, args: argparse.Namespace, restarts: bool) -> dict[str, float]:
    start = time.monotonic()
    proc, ready = launch(model, tmp, args.unified, args.worker_args)
    try:
        until(ready.exists, "the ready-file", every=0.02)
        out = {"ready_s": time.monotonic() - start}
        info = json.loads(ready.read_text())
        # A bounded wait per request: one that hangs shows as a gap of 30 s or more.
        client = openai.OpenAI(base_url=info["openai"], api_key="unused", max_retries=0, timeout=30)
        until(lambda: serves(client, info["model"]), "the first completion")
        out["first_completion_s"] = time.monotonic() - start
        if restarts:
            worker = "worker-0" if args.unified else "decode-0"
            os.kill(engine_pid(info["pids"][worker]), signal.SIGKILL)
            out["worker_engine_killed_gap_s"] = until(
                lambda: serves(client, info["model"]), "after the worker", every=0.3
            )
            os.kill(info["pids"]["router"], signal.SIGKILL)
            out["router_killed_gap_s"] = until(
                lambda: serves(client, info["model"]), "after the router", every=0.3
            )
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model directory (default: a tiny random Llama)")
    p.add_argument("--unified", action="store_true", help="one unified worker instead of a PD pair")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker-args", default="--device cpu --max-total-tokens 4096")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = args.model
        if model is None:
            from shared.tiny_model import make_tiny_model

            model = make_tiny_model(tmp / "tiny-llama", "llama")
        rounds = []
        for i in range(args.rounds):
            (tmp / f"round-{i}").mkdir()
            rounds.append(round_trip(model, tmp / f"round-{i}", args, restarts=i == args.rounds - 1))
            print(json.dumps(rounds[-1]), flush=True)
    result = {
        "topology": "unified" if args.unified else "pd",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "rounds": rounds,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
