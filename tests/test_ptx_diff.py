"""bench/ptx_diff.py, the no-GPU check of a kernel change: against this tree itself every decode
GEMV config compiles to the same PTX; against 630cc3b (the refactor that made FP8 batch-1 decode
33% slower on the H200, docs/benchmarks.md) it reports the FP8 configs changed and bf16 not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.ptx_diff import DECODE_KERNELS

ROOT = Path(__file__).resolve().parents[1]
REGRESSION = "630cc3b"


def ptx_diff(base: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "bench/ptx_diff.py", base], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def rows(out: str) -> dict[str, str]:
    table = {}
    for line in out.splitlines()[1:]:
        name, verdict = line[:26].strip(), line[26:].split()[0]
        table[name] = verdict
    return table


@pytest.fixture(scope="module", autouse=True)
def compiler() -> None:
    pytest.importorskip("triton")
    has = ["git", "-C", str(ROOT), "cat-file", "-e", f"{REGRESSION}^{{commit}}"]
    known = subprocess.run(has, check=False, capture_output=True)
    if known.returncode != 0:
        pytest.skip(f"this clone lacks {REGRESSION} (shallow?)")


def test_the_tree_against_itself_is_identical() -> None:
    proc = ptx_diff(str(ROOT))
    assert proc.returncode == 0, proc.stderr
    table = rows(proc.stdout)
    cuda_cores = ("fp8 M=1, split K", "fp8 M=1", "bf16 M=1", "bf16 M=1, SiLU-mul fused")
    assert {table[k] for k in cuda_cores} == {"identical"}
    assert table["fp8 M=1 on tensor cores"] == "identical"
    assert {table[k] for k in DECODE_KERNELS} == {"identical"}


def test_the_fp8_gemv_regression_is_caught_without_a_gpu() -> None:
    proc = ptx_diff(REGRESSION)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    table = rows(proc.stdout)
    assert table["fp8 M=1, split K"] == "DIFFERS" and table["fp8 M=1"] == "DIFFERS"
    assert table["bf16 M=1"] == "identical"
    assert table["fp8 M=1 on tensor cores"] == "new"  # 630cc3b had no tensor-core mode
