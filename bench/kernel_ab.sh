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
                (cd "$work/$copy" && python3 bench/gpu_bench.py --batches 1 --skip-hf --compare-fp8 \
                    --decode-tokens 64 --prefill-batch 1 --json "$out/${copy}_$round.json" "$@") \
                    | grep -E "fp8 weights|roofline" || true
            done
        done
        python3 - "$out" <<'PY'
import json, sys
from pathlib import Path

print(f"{'copy':<8} {'bf16 tok/s':>10} {'fp8 tok/s':>10} {'fp8/bf16':>9}")
for path in sorted(Path(sys.argv[1]).glob("*_[12].json")):
    result = json.loads(path.read_text())
    bf16 = result["tandem"]["decode"]["1"]["tok_s"]
    fp8 = result["tandem_fp8"]["decode"]["1"]["tok_s"]
    print(f"{path.stem:<8} {bf16:>10.1f} {fp8:>10.1f} {fp8 / bf16:>9.3f}")
PY
        ;;
    *)
        echo "usage: bench/kernel_ab.sh prepare [BASE] | run OUT_DIR [gpu_bench flags]" >&2
        exit 2
        ;;
esac
