"""Whether a change to kernels/ changed the machine code of the decode fast path, without a GPU.

Compiles the GEMV kernel (`kernels/gemv.py`) for an H100/H200 (sm_90a) at the configs batch-1
decode runs (FP8 weights quantizing x inside, split and unsplit; bf16 weights), specialized as
a real launch specializes them (unit strides folded in, pointers and sizes 16-divisible), once
from this tree and once from BASE's `kernels/`, and compares the PTX without its debug line
information. Identical PTX means identical speed: no GPU A/B is needed for those kernels. A
difference says where to look (and that `bench/kernel_ab.sh` must run before the change lands).
Also reports, per config, whether the weight loads are software-pipelined (`cp.async`) and
whether the MMAs are Hopper warpgroup MMAs.

    PYTHONPATH=. python bench/ptx_diff.py BASE     # a git revision (HEAD~1, a commit), or a
                                                   # directory holding a kernels/ package

Needs git, triton and its bundled ptxas; no GPU, no CUDA driver.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# (name, fp8, split, BLOCK_N, constexprs beyond the common ones): decode's hot launches. MMA and
# ONE_ROW exist from 2026-12-04 on; a tree without them compiles the rest.
CONFIGS: list[tuple[str, bool, bool, int, dict[str, Any]]] = [
    ("fp8 M=1, split K", True, True, 32, {"MMA": False, "ONE_ROW": False}),
    ("fp8 M=1", True, False, 64, {"MMA": False, "ONE_ROW": False}),
    ("bf16 M=1", False, False, 8, {"MMA": False, "ONE_ROW": False}),
    ("bf16 M=1, SiLU-mul fused", False, False, 8, {"MMA": False, "ONE_ROW": False, "GATED": True}),
    ("fp8 M=1 on tensor cores", True, True, 64, {"MMA": True, "ONE_ROW": True}),
]
UNIT_STRIDES = {"x_stride_k", "w_stride_k", "o_stride_n", "xs_stride_k", "ws_stride_k"}
DIVISIBLE = {"x_ptr", "xs_ptr", "w_ptr", "ws_ptr", "bias_ptr", "out_ptr", "N", "K", "k_per_split"}
DIVISIBLE |= {"x_stride_m", "w_stride_n", "o_stride_m", "o_stride_split", "ws_stride_n", "xs_stride_m"}


def compile_tree(root: str) -> dict[str, Any]:
    """In a fresh process whose `kernels` is `root`'s: PTX digest and counts per config."""
    sys.path.insert(0, root)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.gemv as gemv

    fn = gemv._gemv_kernel
    params = list(inspect.signature(fn.fn).parameters)
    out: dict[str, Any] = {}
    for name, fp8, split, block_n, extra in CONFIGS:
        if extra.get("MMA") and "MMA" not in params:
            out[name] = None  # this tree has no tensor-core mode
            continue
        const: dict[str, Any] = dict(
            GROUP_N=128 if fp8 else 1, GROUP_K=128 if fp8 else 512, HAS_BIAS=False, EVEN_K=True,
            SCALED=fp8, SCALAR_W_SCALE=fp8, FUSE_QUANT=fp8, GATED=False, LOOP_WHILE=False,
            BLOCK_M=16 if extra.get("MMA") else 1, BLOCK_N=block_n,
        )  # fmt: skip
        const |= {k: v for k, v in extra.items() if k in params}
        const |= dict.fromkeys(UNIT_STRIDES & set(params), 1)
        if "USE_PDL" in params:  # the default launch: PDL off (kernels/pdl.py)
            const["USE_PDL"] = False
        types = {
            "x_ptr": "*bf16", "xs_ptr": "*bf16", "w_ptr": "*fp8e4nv" if fp8 else "*bf16",
            "ws_ptr": "*fp32" if fp8 else "*bf16", "bias_ptr": "*bf16",
            "out_ptr": "*fp32" if split else "*bf16", "fp8_max": "fp32", "eps": "fp32",
        }  # fmt: skip
        signature = {p: "constexpr" if p in const else types.get(p, "i32") for p in params}
        attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in DIVISIBLE if p in params}
        constexprs = {(params.index(k),): v for k, v in const.items()}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        options = {"num_warps": 4, "num_stages": 4}
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        code = kernel.asm["ptx"].split(".section")[0]  # the debug sections follow the code
        lines = [line for line in code.splitlines() if ".loc" not in line and ".file" not in line]
        body = "\n".join(line for line in lines if not line.strip().startswith("//"))
        out[name] = {
            "sha1": hashlib.sha1(body.encode()).hexdigest(),
            "lines": len(body.splitlines()),
            "cp_async": body.count("cp.async"),
            "wgmma": body.count("wgmma.mma_async"),
            "shared_bytes": kernel.metadata.shared,
        }
    return out


def run_in(root: Path) -> dict[str, Any]:
    code = f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from bench.ptx_diff import compile_tree; "
    code += f"print(json.dumps(compile_tree({str(root)!r})))"
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # compiled kernels, whatever the caller runs
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"compiling the kernels of {root} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="the git revision (or a directory with kernels/) to compare against")
    args = p.parse_args()
    if (Path(args.base) / "kernels").is_dir():
        base = run_in(Path(args.base).resolve())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.base, "kernels"], capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            base = run_in(Path(tmp))
    tree = run_in(ROOT)
    changed = 0
    print(f"{'config':<26} {'vs ' + args.base:<12} {'cp.async':>8} {'wgmma':>6} {'smem B':>7}")
    for name, *_ in CONFIGS:
        now, then = tree.get(name), base.get(name)
        if now is None:
            continue
        verdict = "new" if then is None else "identical" if now["sha1"] == then["sha1"] else "DIFFERS"
        changed += verdict == "DIFFERS"
        print(f"{name:<26} {verdict:<12} {now['cp_async']:>8} {now['wgmma']:>6} {now['shared_bytes']:>7}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
