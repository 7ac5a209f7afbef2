"""Whether a change to kernels/ changed the machine code of the decode fast path, without a GPU.

Compiles the decode step's kernels for an H100/H200 (sm_90a) once from this tree and once from
BASE's `kernels/`, and compares the PTX without its debug line information. Identical PTX means
identical speed: no GPU A/B is needed for those kernels. A difference says where to look (and
that `bench/kernel_ab.sh` must run before the change lands). The kernels:

- the GEMV (`kernels/gemv.py`) at the configs batch-1 decode runs (FP8 weights quantizing x
  inside, split and unsplit; bf16 weights; FP8 on tensor cores), specialized as a real launch
  specializes them (unit strides folded in, pointers and sizes 16-divisible); per config also
  whether the weight loads are software-pipelined (`cp.async`) and whether the MMAs are Hopper
  warpgroup MMAs;
- the rest of a decode layer's kernels (`DECODE_KERNELS`: split-K sum, RMSNorm, rotary, KV store,
  decode attention's two stages, FP8 activation quantization) at a Llama-3-8B layer's shapes.

Every kernel compiles as the default launch does: programmatic dependent launch off
(`kernels/pdl.py`). `pdl_ptx()` compiles `DECODE_KERNELS` and the bf16 GEMV with it on, for
`tests/kernels/test_pdl.py`.

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
# label -> (module.kernel, pointer types other than *bf16, constexprs). Scalars are i32 but for
# _FLOATS. A Llama-3-8B decode layer's shapes (32 query heads, 8 KV heads, head dim 128).
DECODE_KERNELS: dict[str, tuple[str, dict[str, str], dict[str, Any]]] = {
    "split-K sum": ("gemv._split_k_sum_kernel", {"partial_ptr": "*fp32"},
                    dict(HAS_BIAS=False, SPLIT_K=4, BLOCK_N=1024)),
    "rmsnorm": ("rmsnorm._rmsnorm_kernel", {}, dict(HAS_RESIDUAL=True, BLOCK=4096)),
    "rotary": ("rotary._rotary_kernel", {"positions_ptr": "*i64", "cache_ptr": "*fp32"},
               dict(BLOCK_HQ=32, BLOCK_HK=8, BLOCK_HALF=64)),
    "store_kv": ("kv_store._store_kv_kernel", {"slots_ptr": "*i64"},
                 dict(HAS_V=True, FP8=False, BLOCK_H=8, BLOCK_DK=128, BLOCK_DV=128)),
    "decode stage 1": (
        "decode_attention._decode_stage1_kernel",
        {"req_to_token_ptr": "*i32", "req_rows_ptr": "*i64", "seq_lens_ptr": "*i64", "mid_out_ptr": "*fp32",
         "mid_lse_ptr": "*fp32"},
        dict(HAS_WINDOW=False, LOOP_WHILE=False, DOT_PRECISION="tf32", Q_TO_F16=False, BLOCK_H=16,
             BLOCK_N=64, BLOCK_DK=128, BLOCK_DV=128),
    ),
    "decode stage 2": ("decode_attention._decode_stage2_kernel",
                       {"mid_out_ptr": "*fp32", "mid_lse_ptr": "*fp32"}, dict(BLOCK_S=16, BLOCK_D=128)),
    "fp8 quant": ("fp8_quant._per_token_group_quant_kernel", {"q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"},
                  dict(BLOCK_GROUPS=32, BLOCK_G=128)),
}  # fmt: skip
_FLOATS = {"eps", "scaling", "fp8_max"}
UNIT_STRIDES = {"x_stride_k", "w_stride_k", "o_stride_n", "xs_stride_k", "ws_stride_k"}
DIVISIBLE = {"x_ptr", "xs_ptr", "w_ptr", "ws_ptr", "bias_ptr", "out_ptr", "N", "K", "k_per_split"}
DIVISIBLE |= {"x_stride_m", "w_stride_n", "o_stride_m", "o_stride_split", "ws_stride_n", "xs_stride_m"}


def _ptx(
    fn: Any, types: dict[str, str], const: dict[str, Any], attrs: dict[Any, Any], options: dict[str, Any]
) -> tuple[str, int]:
    """fn compiled for sm_90a: its PTX without comments or debug lines, and its shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(fn.fn).parameters)
    default = {p: "*bf16" if p.endswith("_ptr") else "fp32" if p in _FLOATS else "i32" for p in params}
    signature = {p: "constexpr" if p in const else types.get(p, default[p]) for p in params}
    constexprs = {(params.index(k),): v for k, v in const.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    code = kernel.asm["ptx"].split(".section")[0]  # the debug sections follow the code
    lines = [line for line in code.splitlines() if ".loc" not in line and ".file" not in line]
    return "\n".join(line for line in lines if not line.strip().startswith("//")), kernel.metadata.shared


def _gemv_spec(
    params: list[str], fp8: bool, split: bool, block_n: int, extra: dict[str, Any]
) -> tuple[dict[str, str], dict[str, Any], dict[Any, Any]]:
    """Types, constexprs and attributes of one GEMV config, as a launch specializes them."""
    const: dict[str, Any] = dict(
        GROUP_N=128 if fp8 else 1, GROUP_K=128 if fp8 else 512, HAS_BIAS=False, EVEN_K=True,
        SCALED=fp8, SCALAR_W_SCALE=fp8, FUSE_QUANT=fp8, GATED=False, LOOP_WHILE=False,
        BLOCK_M=16 if extra.get("MMA") else 1, BLOCK_N=block_n,
    )  # fmt: skip
    const |= {k: v for k, v in extra.items() if k in params}
    const |= dict.fromkeys(UNIT_STRIDES & set(params), 1)
    types = {
        "x_ptr": "*bf16", "xs_ptr": "*bf16", "w_ptr": "*fp8e4nv" if fp8 else "*bf16",
        "ws_ptr": "*fp32" if fp8 else "*bf16", "bias_ptr": "*bf16",
        "out_ptr": "*fp32" if split else "*bf16", "fp8_max": "fp32", "eps": "fp32",
    }  # fmt: skip
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in DIVISIBLE if p in params}
    return types, const, attrs


def _pdl(params: list[str], on: bool) -> dict[str, Any]:
    return {"USE_PDL": on} if "USE_PDL" in params else {}  # trees before kernels/pdl.py lack it


def compile_tree(root: str) -> dict[str, Any]:
    """In a fresh process whose `kernels` is `root`'s: PTX digest and counts per config."""
    sys.path.insert(0, root)
    import importlib

    import kernels.gemv as gemv

    fn = gemv._gemv_kernel
    params = list(inspect.signature(fn.fn).parameters)
    out: dict[str, Any] = {}
    for name, fp8, split, block_n, extra in CONFIGS:
        if extra.get("MMA") and "MMA" not in params:
            out[name] = None  # this tree has no tensor-core mode
            continue
        types, const, attrs = _gemv_spec(params, fp8, split, block_n, extra)
        out[name] = _summary(
            *_ptx(fn, types, const | _pdl(params, False), attrs, {"num_warps": 4, "num_stages": 4})
        )
    for name, (path, types, const) in DECODE_KERNELS.items():
        module, kernel = path.split(".")
        fn = getattr(importlib.import_module(f"kernels.{module}"), kernel)
        params = list(inspect.signature(fn.fn).parameters)
        out[name] = _summary(*_ptx(fn, types, const | _pdl(params, False), {}, {}))
    return out


def _summary(body: str, shared: int) -> dict[str, Any]:
    """What compile_tree reports of one kernel's PTX: its digest and what to look at."""
    return {
        "sha1": hashlib.sha1(body.encode()).hexdigest(),
        "lines": len(body.splitlines()),
        "cp_async": body.count("cp.async"),
        "wgmma": body.count("wgmma.mma_async"),
        "shared_bytes": shared,
    }


def pdl_ptx() -> dict[str, str]:
    """This tree's DECODE_KERNELS and bf16 M=1 GEMV compiled with PDL on (kernels/pdl.py), and
    off (keys ending " off"): their PTX."""
    import importlib

    import kernels.gemv as gemv

    params = list(inspect.signature(gemv._gemv_kernel.fn).parameters)
    name, fp8, split, block_n, extra = CONFIGS[2]  # bf16 M=1
    types, const, attrs = _gemv_spec(params, fp8, split, block_n, extra)
    kernels = {"gemv " + name: (gemv._gemv_kernel, types, const, attrs, {"num_warps": 4, "num_stages": 4})}
    for name, (path, types, const) in DECODE_KERNELS.items():
        module, kernel = path.split(".")
        kernels[name] = (getattr(importlib.import_module(f"kernels.{module}"), kernel), types, const, {}, {})
    out = {}
    for name, (fn, types, const, attrs, options) in kernels.items():
        out[name] = _ptx(fn, types, const | {"USE_PDL": True}, attrs, options | {"launch_pdl": True})[0]
        out[name + " off"] = _ptx(fn, types, const | {"USE_PDL": False}, attrs, options)[0]
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
    for name in [c[0] for c in CONFIGS] + list(DECODE_KERNELS):
        now, then = tree.get(name), base.get(name)
        if now is None:
            continue
        verdict = "new" if then is None else "identical" if now["sha1"] == then["sha1"] else "DIFFERS"
        changed += verdict == "DIFFERS"
        print(f"{name:<26} {verdict:<12} {now['cp_async']:>8} {now['wgmma']:>6} {now['shared_bytes']:>7}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
