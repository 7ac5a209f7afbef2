"""The DeepSeek/FP8 kernels against their baselines and the copy-bandwidth roofline, in one run.

1. Block-FP8 GEMM (`kernels.fp8_gemm`, W8A8, 128x128 weight blocks, 1x128 activation groups)
   against bf16 `torch.matmul` at Llama-3-8B's layer shapes for M = 1 ... 8192: TFLOP/s of
   both, the ratio, and for the FP8 path the time with the activation quantization included;
2. MLA decode attention (`kernels.mla_decode`) over a latent pool: achieved bandwidth (latent
   bytes read / time) against the measured device-to-device copy bandwidth;
3. the fused MoE kernel (`kernels.fused_moe`) at DeepSeek-V2-Lite's expert shapes against the
   per-expert torch loop (the reference), bf16 and FP8 weights;
4. extend (prompt) attention (`kernels.extend_attention`) at Llama-3-8B's heads over a paged
   pool: causal TFLOP/s against torch's SDPA (FlashAttention / cuDNN) on the same prompts held
   contiguously, and the bf16 matmul rate measured in the same run. `--extend-base FILE` times
   another copy of the kernel's module beside it, call for call (the commit before a change:
   `git show HEAD~:kernels/extend_attention.py > bench/results/extend_base.py`), and
   `--extend-sweep` every tile shape of `EXTEND_TILES` (each checked against the reference in
   tests/kernels/test_attention.py and compiled for sm_90a in tests/kernels/test_compile_sm90.py).

Kernel calls are timed as CUDA-graph replays (decode runs as graphs in the engine: the Python
wrappers' launch overhead is not the kernels'), the torch loop of the MoE reference eagerly.
Weights are cycled through enough copies to exceed the L2 cache, so a memory-bound call reads
HBM as it would inside a model. Prints tables; `--json` writes every figure.

    python bench/kernel_bench.py --json out/kernels.json                  # H100
    python bench/kernel_bench.py --only extend --extend-base bench/results/extend_base.py --extend-sweep
    TRITON_INTERPRET=1 python bench/kernel_bench.py --tiny                 # CPU: checks the script
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_bench import copy_bandwidth, matmul_flops, run_header, time_fn
from shared.model_runner import resolve_device

# Llama-3-8B per-layer projections (N, K): fused qkv, o, fused gate_up, down.
LLAMA3_8B_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GEMM_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_L2_BYTES = 256 << 20  # cycle weights through more than this (H100 L2: 50 MB)


def copies_for(nbytes: int, device: torch.device) -> int:
    return 1 if device.type != "cuda" else max(1, math.ceil(_L2_BYTES / max(nbytes, 1)))


def graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """On CUDA, `fn` captured as a CUDA graph (its replay), as the engine runs decode: the time
    is the GPU's, without the Python wrappers' launch overhead. Elsewhere `fn` itself."""
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def per_copy(fn: Callable[[Any], object], copies: list[Any], device: torch.device, iters: int) -> float:
    """Median seconds of `fn(c)` (graphed), cycling through `copies` (weights) so that L2 holds
    none of them."""

    def run() -> None:
        for c in copies:
            fn(c)

    return time_fn(graphed(run, device), device, iters) / len(copies)


def bench_fp8_gemm(
    device: torch.device, ms: tuple[int, ...], shapes: dict[str, tuple[int, int]]
) -> list[dict[str, Any]]:
    from kernels.fp8_gemm import fp8_linear, w8a8_block_fp8_matmul
    from kernels.fp8_quant import block_quant_fp8, per_token_group_quant_fp8

    bf16 = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name, (n, k) in shapes.items():
        copies = copies_for(n * k, device)  # fp8 bytes; the bf16 copies are twice as large
        ws = [torch.randn(n, k, device=device, dtype=bf16) * 0.02 for _ in range(copies)]
        qs = [block_quant_fp8(w) for w in ws]
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=bf16)
            x_q, x_s = per_token_group_quant_fp8(x)
            iters = 20 if m * n * k < 1 << 36 else 8
            t_bf16 = per_copy(lambda w, x=x: torch.matmul(x, w.t()), ws, device, iters)
            t_gemm = per_copy(
                lambda q, a=x_q, s=x_s: w8a8_block_fp8_matmul(a, s, q[0], q[1], bf16), qs, device, iters
            )
            t_lin = per_copy(lambda q, x=x: fp8_linear(x, q[0], q[1]), qs, device, iters)
            flops = 2 * m * n * k
            row = {
                "shape": name, "M": m, "N": n, "K": k,
                "bf16_tflops": flops / t_bf16 / 1e12, "fp8_gemm_tflops": flops / t_gemm / 1e12,
                "fp8_linear_tflops": flops / t_lin / 1e12,
                "gemm_vs_bf16": t_bf16 / t_gemm, "linear_vs_bf16": t_bf16 / t_lin,
                "bf16_us": 1e6 * t_bf16, "fp8_gemm_us": 1e6 * t_gemm, "fp8_linear_us": 1e6 * t_lin,
            }  # fmt: skip
            rows.append(row)
            print(
                f"fp8 gemm {name:8s} M={m:5d}: bf16 {row['bf16_tflops']:7.1f} TF/s, "
                f"fp8 {row['fp8_gemm_tflops']:7.1f} ({row['gemm_vs_bf16']:.2f}x), "
                f"with act quant {row['fp8_linear_tflops']:7.1f} ({row['linear_vs_bf16']:.2f}x)",
                flush=True,
            )
        del ws, qs
    return rows


def bench_mla(
    device: torch.device, cases: list[tuple[int, int, int]], bw: float, kv_dtype: torch.dtype
) -> list[dict[str, Any]]:
    from kernels.mla_decode import mla_decode_attention

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    v_dim, rope = (512, 64) if device.type == "cuda" else (32, 16)
    scale = (128 + 64) ** -0.5
    rows = []
    for batch, seq, heads in cases:
        slots = batch * seq + 16
        kv = (torch.randn(slots, 1, v_dim + rope, device=device) * 0.5).to(kv_dtype)
        # Each request's tokens on shuffled slots, as in a pool that has been running a while.
        req_to_token = (torch.randperm(slots - 16, device=device) + 16).view(batch, seq).to(torch.int32)
        req_rows = torch.arange(batch, device=device, dtype=torch.int32)
        seq_lens = torch.full((batch,), seq, device=device, dtype=torch.int32)
        q = torch.randn(batch, heads, v_dim + rope, device=device, dtype=dtype)

        def call(q=q, kv=kv, r=req_to_token, i=req_rows, s=seq_lens, n=seq) -> object:
            return mla_decode_attention(q, kv, r, i, s, scale, v_dim, max_seq_len=n)

        t = time_fn(graphed(call, device), device, iters=20)
        nbytes = batch * seq * (v_dim + rope) * kv.element_size()
        row = {"batch": batch, "seq": seq, "heads": heads, "kv_dtype": str(kv_dtype), "us": 1e6 * t,
               "bytes_per_s": nbytes / t, "vs_copy_bw": nbytes / t / bw}  # fmt: skip
        rows.append(row)
        print(
            f"mla decode B={batch:4d} seq={seq:5d} H={heads:3d} {kv_dtype!s:20s}: {1e6 * t:8.1f} us, "
            f"{nbytes / t / 1e12:5.2f} TB/s = {row['vs_copy_bw']:.2f} of copy bandwidth",
            flush=True,
        )
        del kv, req_to_token
    return rows


def bench_moe(
    device: torch.device, tokens: tuple[int, ...], experts: int, topk: int, hidden: int, inter: int
) -> list[dict[str, Any]]:
    from kernels.fp8_quant import block_quant_fp8
    from kernels.fused_moe import fused_moe, fused_moe_ref

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    w13 = torch.randn(experts, 2 * inter, hidden, device=device, dtype=dtype) * 0.02
    w2 = torch.randn(experts, hidden, inter, device=device, dtype=dtype) * 0.02
    q13, q2 = [block_quant_fp8(w) for w in w13], [block_quant_fp8(w) for w in w2]
    fp8 = {
        "w13": torch.stack([q[0] for q in q13]), "w13_scale": torch.stack([q[1] for q in q13]),
        "w2": torch.stack([q[0] for q in q2]), "w2_scale": torch.stack([q[1] for q in q2]),
    }  # fmt: skip
    rows = []
    for t in tokens:
        x = torch.randn(t, hidden, device=device, dtype=dtype)
        weights, ids = torch.topk(torch.randn(t, experts, device=device).softmax(-1), topk, dim=-1)
        hit = int(torch.unique(ids).numel())
        row: dict[str, Any] = {"tokens": t, "experts_hit": hit}
        for label, a, b, kw in [
            ("bf16", w13, w2, {}),
            ("fp8", fp8["w13"], fp8["w2"], {"w13_scale": fp8["w13_scale"], "w2_scale": fp8["w2_scale"]}),
        ]:
            t_kernel = time_fn(
                graphed(
                    lambda x=x, a=a, b=b, w=weights, i=ids, kw=kw: fused_moe(x, a, b, w, i, **kw), device
                ),
                device,
                20,
            )
            t_ref = time_fn(
                lambda x=x, a=a, b=b, w=weights, i=ids, kw=kw: fused_moe_ref(x, a, b, w, i, **kw), device, 5
            )
            nbytes = hit * 3 * inter * hidden * a.element_size()  # each hit expert's weights, once
            row |= {
                f"{label}_us": 1e6 * t_kernel, f"{label}_ref_us": 1e6 * t_ref,
                f"{label}_vs_ref": t_ref / t_kernel, f"{label}_weight_bytes_per_s": nbytes / t_kernel,
            }  # fmt: skip
            print(
                f"fused moe {label} T={t:5d} ({hit} experts hit): {1e6 * t_kernel:8.1f} us, "
                f"{t_ref / t_kernel:.1f}x the torch loop, {nbytes / t_kernel / 1e12:.2f} TB/s of weights",
                flush=True,
            )
        rows.append(row)
    return rows


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for --extend-sweep; tests/kernels/
# test_attention.py checks every one of them against the reference.
EXTEND_TILES = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2), (128, 32, 4, 3)]


def load_module(path: Path, name: str) -> Any:
    """A module from a file outside the package (another commit's copy of a kernel)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def causal_flops(prefix: int, new: int, heads: int, head_dim: int) -> float:
    """QK^T and PV of `new` queries after `prefix` cached keys, each seeing itself and before."""
    keys_seen = new * prefix + new * (new + 1) / 2
    return 4.0 * head_dim * heads * keys_seen


def bench_extend(
    device: torch.device,
    cases: list[tuple[int, int, int]],  # (requests, prefix, new tokens each)
    heads: tuple[int, int, int],  # (Hq, Hkv, head_dim)
    base: Any | None,
    sweep: bool,
) -> list[dict[str, Any]]:
    rows = []
    for batch, prefix, new in cases:
        row = extend_case(device, batch, prefix, new, heads, base, sweep)
        rows.append(row)
        line = f"extend {batch:3d} x {new:5d} new after {prefix:5d}: tree {row['tree_s'] * 1e6:8.1f} us "
        line += f"{row['tree_tflops']:6.1f} TFLOP/s"
        if "base_s" in row:
            line += f"; base {row['base_tflops']:6.1f} (tree/base time {row['tree_s'] / row['base_s']:.3f}x)"
        if "sdpa_s" in row:
            line += f"; torch SDPA {row['sdpa_tflops']:6.1f}"
        print(line, flush=True)
        if sweep:
            best = max(row["sweep"], key=row["sweep"].get)
            print(
                "    tiles: " + ", ".join(f"{t} {v:.1f}" for t, v in row["sweep"].items()) + f"; best {best}"
            )
    return rows


def extend_case(
    device: torch.device,
    batch: int,
    prefix: int,
    new: int,
    heads: tuple[int, int, int],
    base: Any | None,
    sweep: bool,
) -> dict[str, Any]:
    """One --only extend case: `batch` requests of `new` tokens after `prefix` cached ones."""
    import torch.nn.functional as F

    import kernels.extend_attention as tree

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hq, hkv, d = heads
    page, seq = 16, prefix + new
    pages_each = -(-seq // page)
    # Each request's pages shuffled over the pool, as in a pool that has been running a while.
    order = torch.randperm(batch * pages_each, device=device) + 1
    slots = (order.view(batch, pages_each, 1) * page + torch.arange(page, device=device)).flatten(1)
    req_to_token = slots[:, :seq].contiguous()
    num_slots = (batch * pages_each + 1) * page
    k_buf = torch.randn(num_slots, hkv, d, device=device, dtype=dtype)
    v_buf = torch.randn(num_slots, hkv, d, device=device, dtype=dtype)
    q = torch.randn(batch * new, hq, d, device=device, dtype=dtype)
    index = (torch.arange(batch, device=device), torch.full((batch,), prefix, device=device))
    lens = torch.full((batch,), new, device=device)
    flops = batch * causal_flops(prefix, new, hq, d)
    row: dict[str, Any] = {"requests": batch, "prefix": prefix, "new": new, "flops": flops}

    def timed(module: Any, tile: tuple[int, int, int, int] | None = None) -> float:
        kw = {"tile": tile} if tile is not None else {}

        def call() -> object:
            return module.extend_attention(
                q, k_buf, v_buf, req_to_token, *index, lens, d**-0.5, max_extend_len=new, **kw
            )

        return time_fn(graphed(call, device), device, *reps)

    reps = (20, 3) if device.type == "cuda" else (1, 0)  # (iters, warmup): one call checks a CPU run
    # Interleaved, twice each (tree, base, tree, base); the faster of each copy's two.
    copies = [("tree", tree), ("base", base)] if base is not None else [("tree", tree)]
    for label, module in copies * 2:
        row[label + "_s"] = min(row.get(label + "_s", float("inf")), timed(module))
    for label, _ in copies:
        row[label + "_tflops"] = flops / row[label + "_s"] / 1e12
    if prefix == 0:  # the same prompts contiguous, through torch's fused attention
        qc = q.view(batch, new, hq, d).transpose(1, 2)
        kc, vc = (buf[req_to_token].transpose(1, 2).contiguous() for buf in (k_buf, v_buf))

        def sdpa() -> object:
            return F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=True)

        row["sdpa_s"] = time_fn(graphed(sdpa, device), device, *reps)
        row["sdpa_tflops"] = flops / row["sdpa_s"] / 1e12
    if sweep:
        row["sweep"] = {str(t): flops / timed(tree, t) / 1e12 for t in EXTEND_TILES}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--only", default="fp8_gemm,mla,moe,extend", help="comma-separated: fp8_gemm, mla, moe, extend"
    )
    parser.add_argument(
        "--extend-base", type=Path, help="another copy of kernels/extend_attention.py to time"
    )
    parser.add_argument("--extend-sweep", action="store_true", help="extend attention at every tile shape")
    parser.add_argument("--tiny", action="store_true", help="small shapes (a CPU check of the script)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = resolve_device(args.device)
    only = set(args.only.split(","))
    result: dict[str, Any] = run_header(device) | {"args": vars(args) | {"json": str(args.json)}}
    bw = copy_bandwidth(device)
    result["copy_bytes_per_s"] = bw
    print(f"copy bandwidth: {bw / 1e12:.2f} TB/s", flush=True)
    if "fp8_gemm" in only:
        shapes = {"tiny": (160, 256)} if args.tiny else LLAMA3_8B_SHAPES
        result["fp8_gemm"] = bench_fp8_gemm(device, (1, 33) if args.tiny else GEMM_MS, shapes)
    if "mla" in only:
        cases = (
            [(2, 64, 4)]
            if args.tiny
            else [(1, 4096, 16), (32, 4096, 16), (128, 4096, 16), (64, 4096, 128), (128, 2048, 128)]
        )
        kv_dtypes = [torch.float32] if args.tiny else [torch.bfloat16, torch.float8_e4m3fn]
        result["mla"] = [row for d in kv_dtypes for row in bench_mla(device, cases, bw, d)]
    if "moe" in only:
        shape = (8, 2, 64, 32) if args.tiny else (64, 6, 2048, 1408)  # DeepSeek-V2-Lite: E, k, H, I
        tokens = (1, 5) if args.tiny else (1, 32, 128, 2048)
        result["moe"] = bench_moe(device, tokens, *shape)
    if "extend" in only:
        matmul, how = matmul_flops(device)
        result["matmul_flops"] = matmul
        print(f"matmul {matmul / 1e12:.1f} TFLOP/s ({how})", flush=True)
        base = load_module(args.extend_base, "extend_base") if args.extend_base else None
        heads = (4, 2, 64) if args.tiny else (32, 8, 128)  # Llama-3-8B: Hq, Hkv, head_dim
        # serving's mixed step (two 1k prompts), gpu_bench's prefill, a long prompt, its last chunk
        cases = (
            [(2, 0, 40), (1, 30, 50)]
            if args.tiny
            else [(2, 0, 1024), (16, 0, 1024), (1, 0, 8192), (1, 6144, 2048)]
        )
        result["extend"] = bench_extend(device, cases, heads, base, args.extend_sweep)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
