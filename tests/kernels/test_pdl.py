"""Programmatic dependent launch (`kernels/pdl.py`), checked without a GPU.

Each kernel of the decode step that takes part is compiled for sm_90a (Triton's front end and
bundled ptxas, in a fresh process: this directory's tests import the kernels interpreted) with
USE_PDL on and off. On, its PTX must wait for the kernel before it (`griddepcontrol.wait`)
before its first global load or store and then let the next one launch; off, it must hold no
`griddepcontrol` at all (the default launch compiles to what it did before PDL). That the
results are the same with PDL on, on a GPU, is `tests/engine/test_gpu.py`'s.
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

from kernels import pdl

pytestmark = pytest.mark.kernels
ROOT = Path(__file__).resolve().parents[2]

# kernel (module.name) -> (pointer types other than *bf16, constexprs); scalars are i32 unless
# named in _FLOATS.
KERNELS: dict[str, tuple[dict[str, str], dict[str, object]]] = {
    "gemv._gemv_kernel": (
        {},
        dict(GROUP_N=1, GROUP_K=512, HAS_BIAS=False, EVEN_K=True, SCALED=False, SCALAR_W_SCALE=False,
             FUSE_QUANT=False, GATED=False, MMA=False, ONE_ROW=False, LOOP_WHILE=False, BLOCK_M=1,
             BLOCK_N=8),
    ),
    "gemv._split_k_sum_kernel": ({"partial_ptr": "*fp32"}, dict(HAS_BIAS=False, SPLIT_K=4, BLOCK_N=1024)),
    "rmsnorm._rmsnorm_kernel": ({}, dict(HAS_RESIDUAL=True, BLOCK=4096)),
    "rotary._rotary_kernel": (
        {"positions_ptr": "*i64", "cache_ptr": "*fp32"}, dict(BLOCK_HQ=32, BLOCK_HK=8, BLOCK_HALF=64)
    ),
    "kv_store._store_kv_kernel": (
        {"slots_ptr": "*i64"}, dict(HAS_V=True, FP8=False, BLOCK_H=8, BLOCK_DK=128, BLOCK_DV=128)
    ),
    "decode_attention._decode_stage1_kernel": (
        {"req_to_token_ptr": "*i32", "req_rows_ptr": "*i64", "seq_lens_ptr": "*i64", "mid_out_ptr": "*fp32",
         "mid_lse_ptr": "*fp32"},
        dict(HAS_WINDOW=False, LOOP_WHILE=False, DOT_PRECISION="tf32", Q_TO_F16=False, BLOCK_H=16,
             BLOCK_N=64, BLOCK_DK=128, BLOCK_DV=128),
    ),
    "decode_attention._decode_stage2_kernel": (
        {"mid_out_ptr": "*fp32", "mid_lse_ptr": "*fp32"}, dict(BLOCK_S=16, BLOCK_D=128)
    ),
    "fp8_quant._per_token_group_quant_kernel": (
        {"q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}, dict(BLOCK_GROUPS=32, BLOCK_G=128)
    ),
}  # fmt: skip

_COMPILE = """
import importlib, inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

FLOATS = {"eps", "scaling", "fp8_max"}
result = {}
for name, (types, constexprs) in json.loads(sys.argv[1]).items():
    module, fn_name = name.split(".")
    fn = getattr(importlib.import_module("kernels." + module), fn_name)
    params = inspect.signature(fn.fn).parameters
    for use_pdl in (True, False):
        const = constexprs | {"USE_PDL": use_pdl}
        signature = {
            p: "constexpr" if p in const else types.get(p, "*bf16" if p.endswith("_ptr") else
                                                            "fp32" if p in FLOATS else "i32")
            for p in params
        }
        options = {"launch_pdl": use_pdl}
        kernel = triton.compile(ASTSource(fn, signature, const), target=GPUTarget("cuda", 90, 32),
                                options=options)
        result[f"{name} {use_pdl}"] = kernel.asm["ptx"].split(".section")[0]
print(json.dumps(result))
"""

_GLOBAL_ACCESS = ("ld.global", "st.global", "cp.async", "atom.global", "red.global")


@pytest.fixture(scope="module")
def ptx() -> dict[str, str]:
    pytest.importorskip("triton.backends.nvidia")
    env = os.environ | {"TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE, json.dumps(KERNELS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, str] = json.loads(proc.stdout.splitlines()[-1])
    return result


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_with_pdl_a_kernel_waits_before_its_first_global_access(ptx: dict[str, str], kernel: str) -> None:
    code = ptx[f"{kernel} True"]
    # A predicated instruction reads "@%p1 ld.global..."
    lines = [re.sub(r"^@!?%\w+\s+", "", line.strip()) for line in code.splitlines()]
    waits = [i for i, line in enumerate(lines) if line.startswith("griddepcontrol.wait")]
    releases = [i for i, line in enumerate(lines) if line.startswith("griddepcontrol.launch_dependents")]
    accesses = [i for i, line in enumerate(lines) if line.startswith(_GLOBAL_ACCESS)]
    assert waits and releases and accesses, (kernel, len(waits), len(releases), len(accesses))
    assert waits[0] < min(accesses), f"{kernel}: a global access before griddepcontrol.wait"
    assert releases[0] > waits[0]


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_without_pdl_a_kernel_has_no_grid_dependency_control(ptx: dict[str, str], kernel: str) -> None:
    assert "griddepcontrol" not in ptx[f"{kernel} False"]


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
