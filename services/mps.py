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
