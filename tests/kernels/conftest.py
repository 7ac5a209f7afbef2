"""Kernel tests: Triton's CPU interpreter here, compiled kernels where a GPU is present.

Triton chooses between its interpreter and its compiler when a kernel is defined, so
TRITON_INTERPRET is set here, at import, before any test imports a kernel module: on by default
without a GPU, off by default with one (the interpreter would take minutes at GPU shapes). Set it
yourself to override; `TRITON_INTERPRET=1` on a GPU host runs both device parametrisations.
Triton's own helpers (`tl.sum`, `tl.max`, ...) are kernels too, defined when triton is first
imported: if something imported triton before this file ran, only the environment can help.

`device` parametrises a test over "cpu" (small shapes, float32, under the interpreter) and
"cuda" (real shapes, bfloat16), skipping whichever cannot run here.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator

import pytest
import torch

_TRITON_PRELOADED = "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

if importlib.util.find_spec("triton") is None:
    # Nothing here runs without Triton; skip collecting the modules (they import it).
    collect_ignore_glob = ["test_*.py"]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header() -> str:
    triton = "not installed: kernel tests skipped" if importlib.util.find_spec("triton") is None else "found"
    return f"kernels: triton {triton}, TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}"


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    from kernels.config import interpreting

    if request.param == "cpu" and not interpreting():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1 (compiled Triton kernels run on the GPU)")
    if request.param == "cpu" and _TRITON_PRELOADED:
        pytest.skip("triton was imported before TRITON_INTERPRET was set: run with TRITON_INTERPRET=1")
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _triton_path() -> Iterator[None]:
    """These tests test the kernels: the reference switch is off unless a test turns it on,
    whatever TANDEM_KERNELS_REFERENCE says."""
    from kernels.config import reference_mode

    with reference_mode(False):
        yield
