"""Whether a change to kernels/ changed the machine code of the decode fast path, without a GPU.

Compiles the decode step's kernels for an H100/H200 (sm_90a) once from this tree and once from
BASE's `kernels/`, and compares the PTX without its debug line information. Identical PTX means
identical speed: no GPU A/B is needed for those kernels. A difference says where to look (and
that `bench/kernel_ab.sh` must run before the change lands). The kernels:

- the GEMV (`kernels/gemv.py`) at the configs batch-1 decode runs (FP8 on tensor cores with x
  quantized first, the default, at both of its launch shapes; FP8 on CUDA cores quantizing x
  inside, split and unsplit; bf16 weights; FP8 on tensor cores quantizing x inside), specialized
  as a real launch specializes them (unit strides folded in, pointers and sizes 16-divisible);
  per config also whether the weight loads are software-pipelined (`cp.async`), whether the MMAs
  are Hopper warpgroup MMAs, and of the machine code the registers a thread, the programs an
  SM holds with them and the instructions of its loop (`machine_code`, `programs_per_sm`),
  which say what a "DIFFERS" changed;
- the rest of a decode layer's kernels (`DECODE_KERNELS`: split-K sum, RMSNorm, rotary, KV store,
  decode attention's two stages, FP8 activation quantization, SiLU-and-mul, and the RMSNorm and
  SiLU-and-mul that quantize for FP8 linears themselves) at a Llama-3-8B layer's shapes.

Every kernel compiles as the default launch does: programmatic dependent launch off
(`kernels/pdl.py`). `pdl_ptx()` compiles the `DECODE_KERNELS` that take it (`PDL_KERNELS`) and
the bf16 GEMV with it on, for `tests/kernels/test_pdl.py`.

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
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# (name, fp8, split, BLOCK_N, constexprs beyond the common ones, and `num_warps` where not 4):
# decode's hot launches. MMA and ONE_ROW exist from 2026-12-04 on; a tree without them compiles
# the rest. FP8 decode of 1-16 tokens runs the tensor-core mode on x quantized first
# (`kernels.gemv.MMA_FUSES_QUANT` off): the "x quantized" rows, at `mma_gemv_config`'s two
# shapes of launch (64 rows split along K; gate_up's 128 rows and 8 warps).
CONFIGS: list[tuple[str, bool, bool, int, dict[str, Any]]] = [
    ("fp8 M=1, split K", True, True, 32, {"MMA": False, "ONE_ROW": False}),
    ("fp8 M=1", True, False, 64, {"MMA": False, "ONE_ROW": False}),
    ("bf16 M=1", False, False, 8, {"MMA": False, "ONE_ROW": False}),
    ("bf16 M=1, SiLU-mul fused", False, False, 8, {"MMA": False, "ONE_ROW": False, "GATED": True}),
    ("fp8 M=1 on tensor cores", True, True, 64, {"MMA": True, "ONE_ROW": True}),
    ("fp8 MMA, x quantized", True, True, 64, {"MMA": True, "ONE_ROW": False, "FUSE_QUANT": False}),
    ("fp8 MMA, x quantized, 128", True, False, 128,
     {"MMA": True, "ONE_ROW": False, "FUSE_QUANT": False, "num_warps": 8}),
]  # fmt: skip
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
    "silu_and_mul": ("activation._silu_and_mul_kernel", {}, dict(BLOCK=1024)),  # before FP8's down
    # The producers that quantize for FP8 linears themselves (kernels.fp8_quant.FUSE_INTO_PRODUCERS).
    "rmsnorm fp8": ("rmsnorm._rmsnorm_fp8_kernel", {"q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"},
                    dict(OUT_DTYPE="bf16", HAS_RESIDUAL=True, GROUP=128, BLOCK=4096)),
    "silu_and_mul fp8": ("activation._silu_and_mul_fp8_kernel", {"q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"},
                         dict(GROUP=128, BLOCK=1024)),
}  # fmt: skip
# Kernels launched without programmatic dependent launch (no USE_PDL): left out of `pdl_ptx`.
NO_PDL = {"silu_and_mul", "silu_and_mul fp8"}
PDL_KERNELS = [name for name in DECODE_KERNELS if name not in NO_PDL]
_FLOATS = {"eps", "scaling", "fp8_max", "fp8_eps"}
UNIT_STRIDES = {"x_stride_k", "w_stride_k", "o_stride_n", "xs_stride_k", "ws_stride_k"}
DIVISIBLE = {"x_ptr", "xs_ptr", "w_ptr", "ws_ptr", "bias_ptr", "out_ptr", "N", "K", "k_per_split"}
DIVISIBLE |= {"x_stride_m", "w_stride_n", "o_stride_m", "o_stride_split", "ws_stride_n", "xs_stride_m"}


def _ptx(
    fn: Any, types: dict[str, str], const: dict[str, Any], attrs: dict[Any, Any], options: dict[str, Any]
) -> tuple[str, int, int | None]:
    """fn compiled for sm_90a: its PTX without comments or debug lines, its shared memory and
    the machine instructions of its longest loop (`sass_loop`)."""
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
    # Debug information: line records, and the labels that mark where an inlined @triton.jit
    # helper's scope begins and ends (`$L__tmpN:`, never a branch target: those are `$L__BB`),
    # which move when code moves into a helper without changing an instruction.
    lines = [
        line
        for line in code.splitlines()
        if ".loc" not in line and ".file" not in line and not re.fullmatch(r"\$L__tmp\d+:", line.strip())
    ]
    body = "\n".join(line for line in lines if not line.strip().startswith("//"))
    machine = machine_code(kernel.asm["cubin"])
    meta = kernel.metadata
    machine["programs_per_sm"] = programs_per_sm(machine["registers"], meta.num_warps, meta.shared)
    return body, kernel.metadata.shared, machine


def programs_per_sm(registers: int | None, num_warps: int, shared: int) -> int | None:
    """How many of a kernel's programs one H100/H200 SM holds at once, from its registers a
    thread (allocated 256 a warp at a time, 65536 an SM), its shared memory (228 KB an SM, 1 KB
    of it reserved a program) and the SM's 64 warps and 32 programs. A streaming GEMV keeps
    that many programs' loads in flight: 630cc3b's FP8 GEMV took 142 registers where 119 fit
    four programs, three fit, and it streamed 33% slower."""
    if registers is None:
        return None
    regs_a_warp = -(-registers * 32 // 256) * 256
    by_regs = 65536 // (regs_a_warp * num_warps)
    by_shared = 228 * 1024 // (shared + 1024)
    return min(by_regs, by_shared, 64 // num_warps, 32)


def machine_code(cubin: bytes) -> dict[str, int | None]:
    """Of the cubin, by triton's bundled CUDA binary tools (None where one is missing):
    `registers` a thread (cuobjdump; `programs_per_sm` follows from them) and `loop_sass`, the
    machine instructions of its longest loop an iteration (nvdisasm; `sass_loop`)."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = _run_tool(tools / "cuobjdump", "-res-usage", f.name)
        sass = _run_tool(tools / "nvdisasm", "-c", f.name)
    regs = re.search(r"REG:(\d+)", usage or "")
    return {"registers": int(regs.group(1)) if regs else None, "loop_sass": sass_loop(sass) if sass else None}


def _run_tool(tool: Path, *args: str) -> str | None:
    if not tool.exists():
        return None
    proc = subprocess.run([str(tool), *args], capture_output=True, text=True, check=False)
    return proc.stdout if proc.returncode == 0 else None


def sass_loop(sass: str) -> int | None:
    """How many machine instructions the SASS listing's longest loop runs an iteration (the
    span from a label to the last branch back to it; unrolled or predicated-off instructions
    count as they are laid out); None without a loop. The decode GEMVs stream their weight in
    that loop: the count shows a step's shape (a pipelined MMA step is ~100, a CUDA-core FP8
    step ~260), not its speed (630cc3b's regression moved it 4%)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    longest = 0
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            span = lines[labels[m.group(1)] : i + 1]
            longest = max(longest, sum(1 for x in span if re.match(r"\s*/\*[0-9a-f]{4,}\*/\s", x)))
    return longest if longest > 1 else None  # a lone branch to itself is the trap after EXIT


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
    codes = fp8 and not const["FUSE_QUANT"]  # x arrives as E4M3 codes with float32 scales
    types = {
        "x_ptr": "*fp8e4nv" if codes else "*bf16", "xs_ptr": "*fp32" if codes else "*bf16",
        "w_ptr": "*fp8e4nv" if fp8 else "*bf16", "ws_ptr": "*fp32" if fp8 else "*bf16",
        "bias_ptr": "*bf16", "out_ptr": "*fp32" if split else "*bf16", "fp8_max": "fp32", "eps": "fp32",
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
        options = {"num_warps": extra.get("num_warps", 4), "num_stages": 4}
        out[name] = _summary(*_ptx(fn, types, const | _pdl(params, False), attrs, options))
    for name, (path, types, const) in DECODE_KERNELS.items():
        module, kernel = path.split(".")
        fn = getattr(importlib.import_module(f"kernels.{module}"), kernel, None)
        if fn is None:
            out[name] = None  # a tree older than the kernel
            continue
        params = list(inspect.signature(fn.fn).parameters)
        out[name] = _summary(*_ptx(fn, types, _constexprs(const) | _pdl(params, False), {}, {}))
    return out


def _constexprs(const: dict[str, Any]) -> dict[str, Any]:
    """DECODE_KERNELS' constexprs as triton takes them: a dtype named by its string ("bf16")."""
    import triton.language as tl

    dtypes = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
    named = {k: dtypes[v] for k, v in const.items() if k.endswith("DTYPE") and isinstance(v, str)}
    return const | named


def _summary(body: str, shared: int, machine: dict[str, int | None]) -> dict[str, Any]:
    """What compile_tree reports of one kernel's PTX: its digest and what to look at."""
    return {
        "sha1": hashlib.sha1(body.encode()).hexdigest(),
        "lines": len(body.splitlines()),
        "cp_async": body.count("cp.async"),
        "wgmma": body.count("wgmma.mma_async"),
        "shared_bytes": shared,
        **machine,
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
    for name in PDL_KERNELS:
        path, types, const = DECODE_KERNELS[name]
        module, kernel = path.split(".")
        fn = getattr(importlib.import_module(f"kernels.{module}"), kernel)
        kernels[name] = (fn, types, _constexprs(const), {}, {})
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


def _column(now: int | None, then: int | None) -> str:
    """A machine-code figure now, and BASE's where it differs ("262 (was 240)")."""
    if not now:
        return "-"  # the tool missing, or no loop
    return f"{now}" if then in (None, now) else f"{now} (was {then})"


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
    print(
        f"{'config':<26} {'vs ' + args.base:<12} {'cp.async':>8} {'wgmma':>6} {'smem B':>7} "
        f"{'registers':>14} {'programs/SM':>12} {'loop SASS':>14}"
    )
    for name in [c[0] for c in CONFIGS] + list(DECODE_KERNELS):
        now, then = tree.get(name), base.get(name)
        if now is None:
            continue
        verdict = "new" if then is None else "identical" if now["sha1"] == then["sha1"] else "DIFFERS"
        changed += verdict == "DIFFERS"
        regs, programs, loop = (
            _column(now.get(key), then.get(key) if then else None)
            for key in ("registers", "programs_per_sm", "loop_sass")
        )
        print(
            f"{name:<26} {verdict:<12} {now['cp_async']:>8} {now['wgmma']:>6} {now['shared_bytes']:>7} "
            f"{regs:>14} {programs:>12} {loop:>14}"
        )
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
