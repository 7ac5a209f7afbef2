"""Where each engine process's loop spends its wall clock, from py-spy's raw stacks.

A sampling profile of a live suite under load, without touching the engine: attach py-spy to a
worker (its engine process is a child) while `bench/serving.py --launch` drives it, then read
the samples of every engine loop (stacks through `_serve` in shared/engine_process.py):

    py-spy record --pid WORKER_PID --subprocesses --idle --nonblocking --rate 200 -d 15 \\
        -f raw -o prefill.txt            # WORKER_PID: `pids` in the launch's ready.json
    python bench/pyspy_summary.py prefill.txt [--top 10] [--json out.json]

Per process, the share of its loop's samples in each of: waiting for the GPU (reading a step's
tokens), launching the forward, posting NIXL writes, waiting for messages (the loop's zmq poll,
idle or paced), other; `--top` also lists the most sampled call chains below `_serve`. `--idle`
matters: without it py-spy drops the samples where the thread waits, which are the point. (On a
CPU device the forward computes where a GPU's is only launched: all of it counts as launching.)
`bench/serving.py --launch --py-spy` does all of it for every load level (`Recorder`).
`bench/gpu_wheels.sh` carries py-spy to the GPU machine (on PATH after `source
bench/gpu_setup.sh`). Found, on the H200 at 128 clients: the prefill engine posting NIXL writes
21% of the time with its GPU idle (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

LOOP = "_serve"  # shared/engine_process.py: the engine process's loop
# (what, a function whose frame on the stack says so), first match from the top of this list.
CATEGORIES = (
    ("waiting for the GPU", "InflightStep.to_host"),
    ("posting NIXL writes", "nixl_agent.transfer"),
    ("launching the forward", "ModelRunner.forward"),
    ("waiting for messages", "Poller.poll"),
)
_PROCESS = re.compile(r'^process (\d+):"?(.*?)"?$')


def function(frame: str) -> str:
    """`EngineCore.step (shared/engine_core.py:546)` -> `EngineCore.step`."""
    return frame.split(" (", 1)[0]


def parse(text: str) -> dict[str, Counter[tuple[str, ...]]]:
    """Raw py-spy lines (`frame;frame;... count`) -> per process (`pid cmdline`, or "" without
    --subprocesses), the count of each engine-loop call chain (functions from `_serve` down).
    Samples outside an engine loop (other threads, the worker's server) are left out."""
    chains: dict[str, Counter[tuple[str, ...]]] = defaultdict(Counter)
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        process = ""
        while frames and (m := _PROCESS.match(frames[0])):  # the innermost process line wins
            process = f"{m.group(1)} {m.group(2)[:80]}"
            frames = frames[1:]
        names = [function(f) for f in frames]
        if LOOP not in names:
            continue
        chains[process][tuple(names[names.index(LOOP) :])] += int(count)
    return dict(chains)


def category(chain: tuple[str, ...]) -> str:
    for what, marker in CATEGORIES:
        if marker in chain:
            return what
    return "other"


def summarize(chains: Counter[tuple[str, ...]], top: int = 0) -> dict[str, object]:
    """Shares of one process's loop samples by category (largest first), its sample count and,
    with `top`, its most sampled chains (4 calls below the loop, or the loop itself for samples
    taken in its own frame) as [share, chain]."""
    total = sum(chains.values())
    by = Counter[str]()
    heads = Counter[str]()
    for chain, n in chains.items():
        by[category(chain)] += n
        heads[" > ".join(chain[1:5]) or chain[0]] += n
    out: dict[str, object] = {what: round(n / total, 3) for what, n in by.most_common()}
    out["samples"] = total
    if top:
        out["top"] = [[round(n / total, 3), head] for head, n in heads.most_common(top)]
    return out


def line(summary: dict[str, object]) -> str:
    """One summary as `47% waiting for the GPU, 24% launching the forward, ...`."""
    shares = [(what, share) for what, share in summary.items() if what not in ("samples", "top")]
    return ", ".join(f"{share:.0%} {what}" for what, share in shares)


class Recorder:
    """py-spy sampling processes (each with its children) between `start` and `stop`: a load
    level's engine loops, without touching the engines. Needs py-spy (`binary`) and the right
    to ptrace them (root, or kernel.yama.ptrace_scope 0)."""

    def __init__(
        self, pids: dict[str, int], out_dir: Path, binary: str | None = None, rate: int = 200
    ) -> None:
        beside = Path(sys.executable).parent / "py-spy"  # a virtualenv's, not activated
        found = binary or shutil.which("py-spy") or (str(beside) if beside.exists() else None)
        if found is None:
            raise FileNotFoundError("py-spy is not on PATH (pip install py-spy)")
        self.binary, self.pids, self.out_dir, self.rate = found, pids, out_dir, rate
        self._running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def start(self, tag: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            raw = self.out_dir / f"{tag}_{name}.txt"
            cmd = [self.binary, "record", "--pid", str(pid), "--subprocesses", "--idle", "--nonblocking"]
            cmd += ["--rate", str(self.rate), "--format", "raw", "--output", str(raw)]
            with open(raw.with_suffix(".log"), "wb") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            self._running[name] = (proc, raw)

    def stop(self, top: int = 5) -> dict[str, dict[str, object]]:
        """Stop every recording (py-spy writes its samples on SIGINT); per process name (with
        the engine process's pid where a worker runs several), its engine loops' summary."""
        result: dict[str, dict[str, object]] = {}
        running, self._running = self._running, {}
        for proc, _ in running.values():
            proc.send_signal(signal.SIGINT)
        for name, (proc, raw) in running.items():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            loops = parse(raw.read_text()) if raw.exists() else {}
            for process, chains in loops.items():
                key = name if len(loops) == 1 else f"{name} {process.split()[0]}"
                result[key] = summarize(chains, top)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", type=Path, nargs="+", help="py-spy record -f raw output")
    parser.add_argument("--top", type=int, default=0, help="also the N most sampled call chains")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = {}
    for path in args.raw:
        for process, chains in parse(path.read_text()).items():
            summary = summarize(chains, args.top)
            result[f"{path.name} {process}".strip()] = summary
            print(f"{path.name} {process}: {summary['samples']} samples in the engine loop")
            for what, share in summary.items():
                if what not in ("samples", "top"):
                    print(f"    {share:6.1%}  {what}")
            for share, head in summary.get("top", []):  # type: ignore[attr-defined]
                print(f"    {share:6.1%}  {head}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
