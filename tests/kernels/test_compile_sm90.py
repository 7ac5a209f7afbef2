"""Kernels compiled for the GPU the benchmarks run on (H100/H200, sm_90a), on the CPU: Triton's
front end and its bundled ptxas need no GPU. The interpreter (every other CPU test) runs a
kernel's Python body and accepts code the compiler refuses, e.g. a `@triton.jit` helper whose
returns differ in shape across a constexpr branch; this test is where such code fails in CI
rather than on the GPU machine. It compiles in a fresh process, because this directory's tests
import the kernels interpreted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.kernel_bench import EXTEND_TILES

pytestmark = pytest.mark.kernels
ROOT = Path(__file__).resolve().parents[2]

_COMPILE = """
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.extend_attention as ea

types = {p: "*bf16" for p in ("q_ptr", "k_buf_ptr", "v_buf_ptr", "out_ptr")}
types |= {p: "*i64" for p in ("req_to_token_ptr", "req_rows_ptr", "prefix_lens_ptr", "extend_lens_ptr",
                              "extend_starts_ptr")}
types |= {"scaling": "fp32", "qk_scale": "fp32"}
params = inspect.signature(ea._extend_kernel.fn).parameters
result = {}
for (block_m, block_n, num_warps, num_stages), window in json.loads(sys.argv[1]):
    constexprs = dict(HAS_WINDOW=window, LOOP_WHILE=False, DOT_PRECISION="tf32", BLOCK_M=block_m,
                      BLOCK_N=block_n, BLOCK_DK=128, BLOCK_DK2=16, HAS_DK2=False, BLOCK_DV=128)
    signature = {p: "constexpr" if p in constexprs else types.get(p, "i32") for p in params}
    options = {"num_warps": num_warps, "num_stages": num_stages}
    kernel = triton.compile(ASTSource(ea._extend_kernel, signature, constexprs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    ptx = kernel.asm["ptx"]
    result[str((block_m, block_n, num_warps, num_stages, window))] = [".target sm_90" in ptx, "mma" in ptx]
print(json.dumps(result))
"""


def test_extend_attention_compiles_for_sm90_at_every_benchmarked_tile() -> None:
    pytest.importorskip("triton.backends.nvidia")
    configs = [[list(tile), window] for tile in EXTEND_TILES for window in (False, True)]
    env = os.environ | {"TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE, json.dumps(configs)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert len(result) == len(configs)
    # sm_90 code with tensor-core products (not a scalar fallback), at every tile and mask mode
    assert all(target and mma for target, mma in result.values()), result
