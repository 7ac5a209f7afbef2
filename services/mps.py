"""NVIDIA MPS for workers that share one GPU (`tandem up --mps`).

Without MPS, processes on one GPU time-slice it: a prefill engine's compute-bound GEMMs and a
decode engine's bandwidth-bound steps take turns. Under MPS their kernels run side by side, which
is what PD on a single GPU needs to keep up with one unified worker (docs/benchmarks.md, "PD on
one H200"). The daemon's pipes and logs live in a directory of ours, so it touches no other
process on the machine; it is told to quit when the suite stops.
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
