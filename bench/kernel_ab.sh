#!/usr/bin/env bash
# A/B a change to kernels/ or the engine's hot path on the GPU, in one run, before it lands:
# batch-1 decode with bf16 and with FP8 weights (bench/gpu_bench.py --compare-fp8) for the base
# commit's kernels/ + shared/ and for the working tree's, interleaved base, tree, base, tree on
# the same machine. It is the check that would have caught 630cc3b (FP8 batch 1 1.29x -> 0.89x
# bf16; docs/benchmarks.md, "FP8 GEMV regression and fix").
#
#   here (needs git):     bash bench/kernel_ab.sh prepare [BASE]    # default BASE: HEAD
#                         writes bench/results/ab-base.tar.gz (ignored by git: carry it)
#   on the GPU machine:   bash bench/kernel_ab.sh run OUT_DIR [more gpu_bench.py flags]
#                         (with the device tool: carry ["bench/results/ab-base.tar.gz"])
#
# Prints and writes OUT_DIR/{base,tree}_{1,2}.json and a summary table (FP8 / bf16 per copy).
# AB_FLAGS replaces the default gpu_bench flags, e.g. for a prompt-side kernel:
#   AB_FLAGS="--batches 1 --skip-hf --mixed 94 --mixed-chunks 2048 --decode-tokens 16" bash bench/kernel_ab.sh run OUT
# (the table then shows the mixed steps and the prefill row instead of FP8).
# First, here, with no GPU: `PYTHONPATH=. python bench/ptx_diff.py BASE` says whether the decode
# GEMV's machine code changed at all (identical PTX: nothing to A/B for it).
set -euo pipefail
cd "$(dirname "$0")/.."
archive=bench/results/ab-base.tar.gz
case ${1:-} in
    prepare)
        base=${2:-HEAD}
        mkdir -p bench/results
        git archive --format=tar.gz -o "$archive" "$base" kernels shared
        echo "$archive: kernels/ and shared/ at $(git rev-parse --short "$base")"
        ;;
    run)
        out=${2:?usage: bench/kernel_ab.sh run OUT_DIR [gpu_bench flags]}
        shift 2
        [ -f "$archive" ] || { echo "no $archive: run 'bench/kernel_ab.sh prepare' first" >&2; exit 2; }
        mkdir -p "$out"
        out=$(cd "$out" && pwd)
        work=$(mktemp -d)
        cp -r . "$work/tree"
        cp -r . "$work/base"
        rm -rf "$work/base/kernels" "$work/base/shared"
        tar -xzf "$archive" -C "$work/base"
        for round in 1 2; do
            for copy in base tree; do
                echo "== $copy, round $round"
                # shellcheck disable=SC2086  # AB_FLAGS is a list of flags
                (cd "$work/$copy" && python3 bench/gpu_bench.py \
                    ${AB_FLAGS:---batches 1 --skip-hf --compare-fp8 --decode-tokens 64 --prefill-batch 1} \
                    --json "$out/${copy}_$round.json" "$@") | grep -E "fp8 weights|roofline|budget" || true
            done
        done
        python3 - "$out" <<'PY'
import json, sys
from pathlib import Path

for path in sorted(Path(sys.argv[1]).glob("*_[12].json")):
    result = json.loads(path.read_text())
    tandem = result["tandem"]
    line = f"{path.stem:<8} decode batch 1 {tandem['decode']['1']['tok_s']:7.1f} tok/s"
    if "tandem_fp8" in result:
        fp8 = result["tandem_fp8"]["decode"]["1"]["tok_s"]
        line += f", fp8 {fp8:7.1f} ({fp8 / tandem['decode']['1']['tok_s']:.3f}x)"
    if "prefill" in tandem:
        line += f", prefill {tandem['prefill']['tok_s']:8.1f} tok/s"
    for chunk, m in sorted(tandem.get("mixed", {}).items()):
        line += f", budget {chunk}: mixed {m['mixed_ms']:.2f} ms, prompts alone {m['prefill_ms']:.2f} ms"
    print(line)
PY
        ;;
    *)
        echo "usage: bench/kernel_ab.sh prepare [BASE] | run OUT_DIR [gpu_bench flags]" >&2
        exit 2
        ;;
esac
