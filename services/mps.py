"""Prefill and decode workers that share one GPU: NVIDIA MPS (`tandem up --mps`) and decode pacing.

Without MPS, processes on one GPU time-slice it: a prefill engine's compute-bound GEMMs and a
decode engine's bandwidth-bound steps take turns. Under MPS their kernels run side by side, which
is what PD on a single GPU needs to keep up with one unified worker (docs/benchmarks.md, "PD on
one H200"). The daemon's pipes and logs live in a directory of ours, so it touches no other
process on the machine; it is told to quit when the suite stops.

`tandem up` starts every worker on this machine with the same engine flags, so a PD pair always
shares its device; when that device is a GPU (`shares_a_gpu`), MPS starts by default (`--mps
auto`) and each role gets the settings PD on one GPU was measured with (`shared_gpu_args`)
unless the flags say otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
# Read by each MPS client when it creates its CUDA context: the share of the GPU's SMs its kernels
# may occupy (1-100).
SM_PERCENT_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
ROLES = ("prefill", "decode", "worker")
# Per role, the engine flags of a PD pair sharing one GPU, each unless --worker-args sets it: the
# decode worker spaces its steps 35 ms apart while the prompts waiting on prefill exceed half the
# requests it decodes, and prefill computes 4096-token steps. Every PD measurement on the H200
# since r13 ran with them (docs/benchmarks.md): 1.19x unified's (whole mixed steps) at 128 clients and
# 1.08x at 64 (r19), 0.96-0.98x at 16, TTFT p50 within 1.5x of unified's, one-client TTFT +2-5
# ms (r14, r16). The earlier default (20 ms, no backlog rule, 2048-token steps) served 0.89x at
# 128 clients with TTFT p50 3.3 s (r10).
SHARED_GPU_FLAGS: dict[str, tuple[tuple[str, str], ...]] = {
    "decode": (("--decode-step-interval-ms", "35"), ("--decode-pacing-backlog", "0.5")),
    "prefill": (("--chunked-prefill-size", "4096"),),
}


class MpsError(RuntimeError):
    """MPS was asked for and could not be started."""


@contextlib.contextmanager
def mps_daemon(directory: Path) -> Iterator[dict[str, str]]:
    """Run an MPS control daemon for the block; yields the environment its clients need."""
    control = shutil.which(CONTROL)
    if control is None:
        raise MpsError(f"--mps needs {CONTROL} (the NVIDIA driver's utilities) on PATH")
    env = {
        "CUDA_MPS_PIPE_DIRECTORY": str(directory / "pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(directory / "log"),
    }
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    full = {**os.environ, **env}
    started = subprocess.run([control, "-d"], env=full, capture_output=True, timeout=30, check=False)
    if started.returncode != 0:
        why = (started.stderr or started.stdout).decode(errors="replace").strip()
        raise MpsError(f"{CONTROL} -d failed (exit {started.returncode}): {why}")
    try:
        yield env
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run([control], input=b"quit\n", env=full, capture_output=True, timeout=30, check=False)


def parse_sm_percent(spec: str) -> dict[str, int]:
    """`--mps-sm-percent` ("decode=40" or "prefill=100,decode=40") -> {role: percent}; a role not
    named keeps the whole GPU. Raises ValueError naming what is wrong."""
    shares: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        role, sep, value = item.partition("=")
        role = role.strip()
        if not sep or role not in ROLES:
            raise ValueError(
                f"--mps-sm-percent: {item!r} is not ROLE=PERCENT with ROLE one of {', '.join(ROLES)}"
            )
        if role in shares:
            raise ValueError(f"--mps-sm-percent: {role} is given twice")
        try:
            percent = int(value)
        except ValueError:
            percent = 0
        if not 1 <= percent <= 100:
            raise ValueError(
                f"--mps-sm-percent: {role}'s share must be a whole percent from 1 to 100, not {value!r}"
            )
        shares[role] = percent
    return shares


def shares_a_gpu(prefill: int, decode: int, worker_args: list[str]) -> bool:
    """Whether the suite's prefill and decode workers share one GPU: there are both, and their
    `--device` is CUDA (`auto`, the default: when an NVIDIA driver is loaded)."""
    if not (prefill and decode):
        return False
    device = _flag_value(worker_args, "--device") or "auto"
    if device == "auto":
        return Path("/proc/driver/nvidia/version").exists()
    return device.startswith("cuda")


def shared_gpu_args(role: str, worker_args: list[str]) -> list[str]:
    """Flags a `role` worker ("prefill", "decode") sharing its GPU with the other role gets on top
    of `worker_args`: `SHARED_GPU_FLAGS`, each unless `worker_args` sets its own."""
    return [
        word
        for flag, value in SHARED_GPU_FLAGS.get(role, ())
        if _flag_value(worker_args, flag) is None
        for word in (flag, value)
    ]


def _flag_value(args: list[str], flag: str) -> str | None:
    """The last value given for `flag` ("--flag V" or "--flag=V"), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value
