#!/usr/bin/env bash
# A/B a change that serving feels (the engine loop, the KV hand-off, the allocator, the
# services) on the GPU, in one run, before it lands: bench/serving.py --launch for the base
# commit's shared/, kernels/ and services/ and for the working tree's, interleaved base, tree,
# base, tree on the same machine (the first `tandem up` of a fresh machine runs slower than the
# later ones, docs/benchmarks.md), then one --compare table of every copy against the first.
#
#   here (needs git):     bash bench/serving_ab.sh prepare [BASE]    # default BASE: HEAD
#                         writes bench/results/serving-ab-base.tar.gz (ignored by git: carry it)
#   on the GPU machine:   bash bench/serving_ab.sh run OUT_DIR [serving.py flags]
#                         e.g. --topology pd --make-model llama3-8b --concurrency 1,64,128 \
#                              --worker-args "--device cuda:0 --max-total-tokens 150000"
#                         ROUNDS=1 for one copy of each; the serving flags go to every run;
#                         PYTHON=.venv/bin/python off the GPU machine.
#
# Writes OUT_DIR/{base,tree}_{1,2}.json (and each run's logs under OUT_DIR/logs/).
#
# A/B of worker flags on the working tree alone (no prepare): runs "a" with the serving flags,
# "b" with B_FLAGS added to the workers' (a second --worker-args), interleaved a, b, a, b:
#                         bash bench/serving_ab.sh flags OUT_DIR "B_FLAGS" [serving.py flags]
#                         writes OUT_DIR/{a,b}_{1,2}.json
# The same with B_ARGS added to run b's serving.py flags instead (the last of a flag given twice
# wins), e.g. unified against PD on one tree: args OUT_DIR "--topology pd" --topology unified ...
#                         bash bench/serving_ab.sh args OUT_DIR "B_ARGS" [serving.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
archive=bench/results/serving-ab-base.tar.gz
python=${PYTHON:-python3}
case $python in /*) ;; */*) python="$PWD/$python" ;; esac  # the runs start in the copies
case ${1:-} in
    prepare)
        base=${2:-HEAD}
        mkdir -p bench/results
        git archive --format=tar.gz -o "$archive" "$base" shared kernels services
        echo "$archive: shared/, kernels/ and services/ at $(git rev-parse --short "$base")"
        ;;
    run | flags | args)
        mode=$1
        out=${2:?usage: bench/serving_ab.sh run OUT_DIR [serving.py flags] | flags|args OUT_DIR "B_FLAGS" [serving.py flags]}
        shift 2
        if [ "$mode" != run ]; then
            b_flags=${1?usage: bench/serving_ab.sh $mode OUT_DIR "B_FLAGS" [serving.py flags]}
            shift
            copies=(a b)
        else
            [ -f "$archive" ] || { echo "no $archive: run 'bench/serving_ab.sh prepare' first" >&2; exit 2; }
            copies=(base tree)
        fi
        mkdir -p "$out"
        out=$(cd "$out" && pwd)
        work=$(mktemp -d)
        trap 'rm -rf "$work"' EXIT
        for copy in "${copies[@]}"; do  # the checkout without its virtualenv, history or results
            mkdir "$work/$copy"
            tar -cf - --exclude=./.venv --exclude=./.git --exclude=./bench/results . | tar -xf - -C "$work/$copy"
        done
        if [ "$mode" = run ]; then
            rm -rf "$work/base/shared" "$work/base/kernels" "$work/base/services"
            tar -xzf "$archive" -C "$work/base"
        fi
        runs=()
        for round in $(seq 1 "${ROUNDS:-2}"); do
            for copy in "${copies[@]}"; do
                name="${copy}_$round"
                extra=()
                if [ "$copy" = b ] && [ "$mode" = flags ]; then
                    extra=("--worker-args=$b_flags")  # "=": the flags may start with --
                elif [ "$copy" = b ]; then
                    read -ra extra <<< "$b_flags"
                fi
                echo "== $name"
                # The copy's modules first, for this process and the suite it launches.
                (cd "$work/$copy" && PYTHONPATH="$work/$copy${PYTHONPATH:+:$PYTHONPATH}" \
                    "$python" bench/serving.py --launch --label "$name" --log-dir "$out/logs/$name" \
                    --json "$out/$name.json" "$@" "${extra[@]}") | grep -vE "^(INFO|DEBUG|launching|logs:)" || true
                [ -f "$out/$name.json" ] && runs+=("$out/$name.json")
            done
        done
        [ ${#runs[@]} -gt 0 ] || { echo "no run finished" >&2; exit 1; }
        "$python" bench/serving.py --compare "${runs[@]}"
        ;;
    *)
        echo "usage: bench/serving_ab.sh prepare [BASE] | run OUT_DIR [serving.py flags] | flags|args OUT_DIR \"B\" [serving.py flags]" >&2
        exit 2
        ;;
esac
