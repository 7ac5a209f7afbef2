"""Programmatic dependent launch (`kernels/pdl.py`), checked without a GPU.

Each kernel of the decode step that takes part is compiled for sm_90a with PDL on
(`bench/ptx_diff.py`'s `pdl_ptx`: Triton's front end and bundled ptxas, in a fresh process, since
this directory's tests import the kernels interpreted). Its PTX must wait for the kernel before
it (`griddepcontrol.wait`) before its first global load or store, and then let the next one
launch. With PDL off (the default) the same kernels compile to the PTX they had before PDL:
`tests/test_ptx_diff.py`. That the results are the same with PDL on, on a GPU, is
`tests/engine/test_gpu.py`'s.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.ptx_diff import PDL_KERNELS
from kernels import pdl

pytestmark = pytest.mark.kernels
ROOT = Path(__file__).resolve().parents[2]

_COMPILE = "import json; from bench.ptx_diff import pdl_ptx; print(json.dumps(pdl_ptx()))"
KERNELS = ["gemv bf16 M=1", *PDL_KERNELS]

_GLOBAL_ACCESS = ("ld.global", "st.global", "cp.async", "atom.global", "red.global")


@pytest.fixture(scope="module")
def ptx() -> dict[str, str]:
    pytest.importorskip("triton.backends.nvidia")
    env = os.environ | {"TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, str] = json.loads(proc.stdout.splitlines()[-1])
    return result


@pytest.mark.parametrize("kernel", KERNELS)
def test_with_pdl_a_kernel_waits_before_its_first_global_access(ptx: dict[str, str], kernel: str) -> None:
    code = ptx[kernel]
    # A predicated instruction reads "@%p1 ld.global..."
    lines = [re.sub(r"^@!?%\w+\s+", "", line.strip()) for line in code.splitlines()]
    waits = [i for i, line in enumerate(lines) if line.startswith("griddepcontrol.wait")]
    releases = [i for i, line in enumerate(lines) if line.startswith("griddepcontrol.launch_dependents")]
    accesses = [i for i, line in enumerate(lines) if line.startswith(_GLOBAL_ACCESS)]
    assert waits and releases and accesses, (kernel, len(waits), len(releases), len(accesses))
    assert waits[0] < min(accesses), f"{kernel}: a global access before griddepcontrol.wait"
    assert releases[0] > waits[0]


@pytest.mark.parametrize("kernel", KERNELS)
def test_without_pdl_a_kernel_has_no_grid_dependency_control(ptx: dict[str, str], kernel: str) -> None:
    assert "griddepcontrol" not in ptx[f"{kernel} off"]


def test_launch_options_stay_off_where_pdl_cannot_run() -> None:
    x = torch.zeros(4)
    assert pdl.launch_options(x) == {"USE_PDL": False}  # not enabled
    pdl.enable(True)
    try:
        assert pdl.enabled()
        assert pdl.launch_options(x) == {"USE_PDL": False}  # a CPU tensor
    finally:
        pdl.enable(False)
    assert not pdl.enabled()
