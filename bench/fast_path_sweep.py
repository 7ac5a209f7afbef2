"""Launch-config sweeps for the decode fast path, on a GPU, in one run.

1. The dense GEMV (`kernels.gemv.dense_gemv`) against cuBLAS (`F.linear`) at Llama-3-8B's layer
   shapes and its lm head, M = 1, 2, 4: every config of a grid, checked against float32 first;
2. the FP8 GEMV (`kernels.gemv.fp8_gemv`, block W8A8: the activation quantized in the kernel,
   or first by `per_token_group_quant_fp8`, timed with it) at the same shapes, M = 1, against the
   bandwidth its FP8 weight bytes need, over rows, splits, warps and stages, every config
   checked against float32 first;
3. the tensor-core FP8 GEMV (`kernels.gemv.fp8_gemv(..., mma=True)`: the weight on the MMA's M
   side, the tokens padded to 16 on its N side) at M = 1, 4 and 16 against, at the same M, the
   CUDA-core GEMV (M <= 4) and the block GEMM `fp8_linear` takes today, over rows, splits, warps
   and stages;
4. paged decode attention (`kernels.decode_attention`, both stages) at batch 1 and 128 over a
   1088-token context (Llama-3-8B: 32 query heads, 8 KV heads, head dim 128), bf16 and FP8
   pools: K/V splits, key block, warps and pipeline stages.

Every call is timed as a CUDA-graph replay, its weights (or per-layer pools) cycled past the
L2 cache. Prints the best configs last; `--json` writes every figure.

    python bench/fast_path_sweep.py --json out/sweep.json
    python bench/fast_path_sweep.py --only fp8gemv,gemv --json out/sweep.json    # the GEMVs only
    python bench/fast_path_sweep.py --only fp8mma --json out/mma.json            # FP8 on tensor cores
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_bench import copy_bandwidth, run_header
from bench.kernel_bench import LLAMA3_8B_SHAPES, copies_for, per_copy

GEMV_SHAPES = {**LLAMA3_8B_SHAPES, "lm_head": (128256, 4096)}


def sweep_gemv(device: torch.device, ms: tuple[int, ...], full: bool) -> list[dict[str, Any]]:
    from kernels.gemv import dense_gemv, dense_gemv_config

    rows = []
    for name, (n, k) in GEMV_SHAPES.items():
        copies = copies_for(2 * n * k, device)
        ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        nbytes = 2 * n * k
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ref = F.linear(x.float(), ws[0].float())
            t_cublas = per_copy(lambda w, x=x: F.linear(x, w), ws, device, 20)
            default = dense_gemv_config(m, n, k)
            grid = [default]
            if full and m == 1:
                for bn, bk, split, warps, stages in itertools.product(
                    (8, 16, 32), (128, 256, 512), (1, 2, 4, 8), (4, 8), (2, 4)
                ):
                    tiles = -(-n // bn)
                    if tiles * split < 132 or k // (bk * split) < 2 or tiles * split > 16384:
                        continue
                    grid.append(
                        {
                            "BLOCK_N": bn,
                            "BLOCK_K": bk,
                            "SPLIT_K": split,
                            "num_warps": warps,
                            "num_stages": stages,
                        }
                    )
            for cfg in grid:
                out = dense_gemv(x, ws[0], config=cfg)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                t = per_copy(lambda w, x=x, c=cfg: dense_gemv(x, w, config=c), ws, device, 20)
                row = {
                    "shape": name, "M": m, "N": n, "K": k, "config": cfg, "default": cfg is default,
                    "us": 1e6 * t, "cublas_us": 1e6 * t_cublas, "vs_cublas": t_cublas / t,
                    "tb_s": nbytes / t / 1e12, "cublas_tb_s": nbytes / t_cublas / 1e12, "rel_err": err,
                }  # fmt: skip
                rows.append(row)
                if err > 1e-2:
                    print(f"  BAD {name} M={m} {cfg}: rel err {err:.2e}", flush=True)
            best = min((r for r in rows if r["shape"] == name and r["M"] == m), key=lambda r: r["us"])
            dflt = next(r for r in rows if r["shape"] == name and r["M"] == m and r["default"])
            print(
                f"gemv {name:8s} M={m}: cuBLAS {1e6 * t_cublas:7.1f} us "
                f"({nbytes / t_cublas / 1e12:.2f} TB/s); "
                f"default {dflt['us']:7.1f} us ({dflt['tb_s']:.2f}); best {best['us']:7.1f} us "
                f"({best['tb_s']:.2f}) {best['config']}",
                flush=True,
            )
        del ws
    return rows


def sweep_fp8_gemv(device: torch.device, full: bool, mma: bool) -> list[dict[str, Any]]:
    """The FP8 GEMV on CUDA cores (M = 1) or tensor cores (`mma`: M = 1, 4, 16, against the
    CUDA-core GEMV where it runs and the block GEMM at the same M)."""
    from kernels import fp8_gemm
    from kernels.fp8_quant import block_quant_fp8, per_token_group_quant_fp8
    from kernels.gemv import (
        GEMV_FUSES_QUANT,
        GEMV_MAX_ROWS,
        MMA_FUSES_QUANT,
        fp8_gemv,
        gemv_config,
        mma_gemv_config,
    )

    block = (128, 128)
    label = "fp8 mma gemv" if mma else "fp8 gemv"
    rows: list[dict[str, Any]] = []
    for name, (n, k) in LLAMA3_8B_SHAPES.items():
        w_q, w_s = block_quant_fp8(torch.randn(n, k, device=device) * 0.02, block)
        copies = copies_for(n * k, device)
        ws = [(w_q.clone(), w_s.clone()) for _ in range(copies)]
        w_deq = (w_q.float().view(n // 128, 128, k // 128, 128) * w_s[:, None, :, None]).view(n, k)
        for m in (1, 4, 16) if mma else (1,):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ref = F.linear(x.float(), w_deq)
            # What runs these M today, beside the tensor-core GEMV: the CUDA-core GEMV (its own
            # quantization inside) and the block GEMM (a quantization launch, tokens on its M side).
            baselines = {}
            if mma:
                baselines["block_gemm"] = lambda w, x=x: fp8_gemm.fp8_linear(x, w[0], w[1], config={})
                if m <= GEMV_MAX_ROWS:
                    baselines["cuda_core_gemv"] = lambda w, x=x: fp8_gemv(
                        x, None, w[0], w[1], torch.bfloat16, block
                    )
            base_us = {b: 1e6 * per_copy(f, ws, device, 20) for b, f in baselines.items()}
            default = (mma_gemv_config if mma else gemv_config)(m, n, k)
            grid = [(default, True), (default, False)]
            if full:
                rows_n = (64, 128) if mma else (16, 32, 64, 128)
                stages = (2, 3, 4, 6) if mma else (2, 4, 6)
                for bn, split, warps, st in itertools.product(rows_n, (1, 2, 4, 8, 16), (4, 8), stages):
                    tiles = -(-n // bn)
                    if tiles * split < 132 or k // (128 * split) < 2 or (mma and bn == 64 and warps == 8):
                        continue
                    cfg = {"BLOCK_N": bn, "SPLIT_K": split, "num_warps": warps, "num_stages": st}
                    grid.append((cfg, True))
                    if st == 4 and (mma or warps == 4):
                        grid.append((cfg, False))

            def call(
                w: tuple[torch.Tensor, torch.Tensor], cfg: dict[str, int], fused: bool, x: torch.Tensor = x
            ) -> torch.Tensor:
                if fused:
                    return fp8_gemv(x, None, w[0], w[1], torch.bfloat16, block, config=cfg, mma=mma)
                x_q, x_s = per_token_group_quant_fp8(x, 128)
                return fp8_gemv(x_q, x_s, w[0], w[1], torch.bfloat16, block, config=cfg, mma=mma)

            for cfg, fused in grid:
                try:
                    err = ((call(ws[0], cfg, fused).float() - ref).norm() / ref.norm()).item()
                    t = per_copy(lambda w, c=cfg, f=fused: call(w, c, f), ws, device, 20)
                except Exception as e:  # a config Triton cannot build (shared memory): skip it
                    print(f"  skipped {label} {name} M={m} {cfg}: {type(e).__name__}: {e}", flush=True)
                    continue
                row = {
                    "shape": name, "M": m, "N": n, "K": k, "mma": mma, "config": cfg, "fused_quant": fused,
                    "default": cfg is default, "us": 1e6 * t, "tb_s": n * k / t / 1e12, "rel_err": err,
                    **{f"{b}_us": us for b, us in base_us.items()},
                }  # fmt: skip
                rows.append(row)
                if err > 5e-2:
                    print(f"  BAD {label} {name} M={m} {cfg} fused={fused}: rel err {err:.2e}", flush=True)
            mine = [r for r in rows if r["shape"] == name and r["M"] == m and r["rel_err"] <= 5e-2]
            if not mine:
                continue
            best = min(mine, key=lambda r: r["us"])
            fuses = MMA_FUSES_QUANT if mma else GEMV_FUSES_QUANT  # as fp8_linear runs it
            dflt = next((r for r in mine if r["default"] and r["fused_quant"] == fuses), best)
            bases = "".join(f"{b} {us:.1f} us ({n * k / us / 1e6:.2f} TB/s); " for b, us in base_us.items())
            print(
                f"{label} {name:8s} M={m:2d}: {bases}default {dflt['us']:7.1f} us ({dflt['tb_s']:.2f} TB/s);"
                f" best {best['us']:7.1f} us ({best['tb_s']:.2f}) {best['config']}"
                f" fused={best['fused_quant']}",
                flush=True,
            )
        del ws
    return rows


def sweep_decode(device: torch.device, full: bool) -> list[dict[str, Any]]:
    from kernels.decode_attention import decode_attention

    hq, hkv, d, ctx, page = 32, 8, 128, 1088, 16
    rows = []
    for batch, kv_dtype in ((1, torch.bfloat16), (128, torch.bfloat16), (128, torch.float8_e4m3fn)):
        pages = batch * (-(-ctx // page))
        slots = (pages + 1) * page
        layers = 1 if batch * ctx * hkv * d * 4 > (256 << 20) else 32
        pools = [
            (
                (torch.randn(slots, hkv, d, device=device) * 0.5).to(kv_dtype),
                (torch.randn(slots, hkv, d, device=device) * 0.5).to(kv_dtype),
            )
            for _ in range(layers)
        ]
        # Pages shuffled across requests, as in a pool that has been running a while.
        order = torch.randperm(pages, device=device) + 1
        token_slots = (order[:, None] * page + torch.arange(page, device=device)).view(batch, -1)[:, :ctx]
        req_to_token = token_slots.to(torch.int32).contiguous()
        req_rows = torch.arange(batch, device=device, dtype=torch.int32)
        seq_lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
        q = torch.randn(batch, hq, d, device=device, dtype=torch.bfloat16)
        nbytes = batch * ctx * hkv * d * 2 * pools[0][0].element_size()
        splits_grid = (8, 16, 32) if batch == 1 else (1, 2)
        grid: list[tuple[int, dict[str, int]]] = [(16 if batch == 1 else 1, {})]  # today's plan
        if full:
            for splits, bn, warps, stages in itertools.product(
                splits_grid, (16, 32, 64, 128), (2, 4, 8), (1, 2, 3, 4)
            ):
                if (batch == 1 and bn == 128) or (batch > 1 and bn == 16):
                    continue
                grid.append((splits, {"BLOCK_N": bn, "num_warps": warps, "num_stages": stages}))
        for splits, cfg in grid:
            args = (q, req_to_token, req_rows, seq_lens)

            def call(pool, cfg=cfg, splits=splits, args=args) -> object:
                q, r2t, rows, lens = args
                return decode_attention(q, pool[0], pool[1], r2t, rows, lens, d**-0.5,
                                        max_seq_len=ctx, num_kv_splits=splits, config=cfg)  # fmt: skip

            try:
                t = per_copy(call, pools, device, 20)
            except Exception as exc:  # a config the compiler rejects (shared memory): skip it
                print(f"  skip B={batch} splits={splits} {cfg}: {type(exc).__name__}", flush=True)
                continue
            rows.append({"batch": batch, "kv_dtype": str(kv_dtype), "splits": splits, "config": cfg,
                         "us": 1e6 * t, "tb_s": nbytes / t / 1e12})  # fmt: skip
        mine = [r for r in rows if r["batch"] == batch and r["kv_dtype"] == str(kv_dtype)]
        best = min(mine, key=lambda r: r["us"])
        print(
            f"decode B={batch:3d} {kv_dtype!s:20s}: today {mine[0]['us']:7.1f} us "
            f"({mine[0]['tb_s']:.2f} TB/s); "
            f"best {best['us']:7.1f} us ({best['tb_s']:.2f}) splits={best['splits']} {best['config']}",
            flush=True,
        )
        del pools
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", default="gemv,fp8gemv,fp8mma,decode")
    parser.add_argument("--quick", action="store_true", help="default configs only")
    parser.add_argument("--gemv-ms", default="1,2,4", help="rows of the dense GEMV sweep")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    result: dict[str, Any] = run_header(device) | {"copy_bytes_per_s": copy_bandwidth(device)}
    print(f"copy bandwidth {result['copy_bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    only = set(args.only.split(","))
    if "decode" in only:
        result["decode"] = sweep_decode(device, not args.quick)
    if "fp8gemv" in only:
        result["fp8_gemv"] = sweep_fp8_gemv(device, not args.quick, mma=False)
    if "fp8mma" in only:
        result["fp8_mma_gemv"] = sweep_fp8_gemv(device, not args.quick, mma=True)
    if "gemv" in only:
        result["gemv"] = sweep_gemv(device, tuple(int(m) for m in args.gemv_ms.split(",")), not args.quick)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
