"""bench/ptx_diff.py, the no-GPU check of a kernel change: against this tree itself every decode
GEMV config compiles to the same PTX; against 630cc3b (the refactor that made FP8 batch-1 decode
33% slower on the H200, docs/benchmarks.md) it reports the FP8 configs changed and bf16 not, and
the machine-code columns show why: more registers, one program fewer on each SM."""

from __future__ import annotations

import re
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


def machine_columns(out: str) -> dict[str, list[str]]:
    """Each row's registers, programs/SM and loop SASS cells ("119", "4 (was 3)" or "-")."""
    cell = r"(\d+(?: \(was \d+\))?|-)"
    return {
        line[:26].strip(): list(re.fullmatch(rf".*? {cell} +{cell} +{cell}", line).groups())  # type: ignore[union-attr]
        for line in out.splitlines()[1:]
    }


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
    # The default FP8 decode path of 1-16 tokens: x quantized first, both launch shapes.
    assert table["fp8 MMA, x quantized"] == table["fp8 MMA, x quantized, 128"] == "identical"
    assert {table[k] for k in DECODE_KERNELS} == {"identical"}
    machine = machine_columns(proc.stdout)
    registers, programs, loop = machine["fp8 MMA, x quantized"]
    assert int(registers) > 0 and int(programs) >= 1 and int(loop) > 0  # the tools ran, no "was"
    assert machine["store_kv"][2] == "-"  # no loop


def test_the_fp8_gemv_regression_is_caught_without_a_gpu() -> None:
    proc = ptx_diff(REGRESSION)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    table = rows(proc.stdout)
    assert table["fp8 M=1, split K"] == "DIFFERS" and table["fp8 M=1"] == "DIFFERS"
    assert table["bf16 M=1"] == "identical"
    assert table["fp8 M=1 on tensor cores"] == "new"  # 630cc3b had no tensor-core mode
    # What the regression did: more registers, one program fewer on each SM.
    registers, programs, _ = machine_columns(proc.stdout)["fp8 M=1"]
    now, was = map(int, re.fullmatch(r"(\d+) \(was (\d+)\)", registers).groups())  # type: ignore[union-attr]
    assert now < was  # 119 and 142 with triton 3.6's ptxas
    now, was = map(int, re.fullmatch(r"(\d+) \(was (\d+)\)", programs).groups())  # type: ignore[union-attr]
    assert now > was  # 4 and 3
