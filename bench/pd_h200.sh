#!/usr/bin/env bash
# PD at speed on one GPU, in one run (docs/benchmarks.md, "PD on one H200"):
#   1. KV transfer between two processes on the GPU: NIXL (UCX variants) and the gRPC transport
#      against a CUDA-IPC device-to-device copy of the same bytes (bench/kv_transfer.py);
#   2. serving through the gateway, unified (one worker) against PD (one prefill + one decode
#      worker sharing the GPU, KV over NIXL), random 1024-token prompts, 128 output tokens,
#      concurrency 1/16/64/128, 4 x concurrency requests per level (bench/serving.py).
# Usage, from the repository root on the GPU machine (NIXL and the service wheels importable):
#   bash bench/pd_h200.sh OUT_DIR [serving.py flags...]
# e.g. TOPOLOGIES="unified pd:20" bash bench/pd_h200.sh out. `tandem up` runs a PD pair that
# shares the GPU under MPS, decode paced 20 ms, by default; "pd:N" sets the pacing (pd:0: none)
# and --launch-args="--mps off" time-slices the GPU (the runs before that default).
# Writes OUT_DIR/{kv_transfer,serving_unified,serving_pd}.json, serving_pd_vs_unified.png and
# logs.tar.gz (every service's log).
set -euo pipefail
out=${1:?usage: bench/pd_h200.sh OUT_DIR [serving.py flags...]}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
model=${TANDEM_BENCH_MODEL:-/dev/shm/tandem-llama3-8b}
logs=$(mktemp -d)
trap 'tar -czf "$out/logs.tar.gz" -C "$logs" . 2>/dev/null || true' EXIT

if [ -z "${SKIP_KV:-}" ]; then
    python3 bench/kv_transfer.py --device cuda --tokens 1024,4096,16384 --json "$out/kv_transfer.json" \
        --variants "${KV_VARIANTS:-default; UCX_TLS=cuda_ipc,cuda_copy,tcp; UCX_TLS=cuda_copy,tcp; pt}"
fi
serve() {  # topology json-name extra-flags...
    local topology=$1 name=$2
    shift 2
    python3 bench/serving.py --launch --topology "$topology" --make-model llama3-8b --model-dir "$model" \
        --worker-args "--device cuda:0 --max-total-tokens 150000" --log-dir "$logs/$name" \
        --json "$out/$name.json" "$@"
}
# TOPOLOGIES: "unified", "pd", or "pd:N" (PD with --decode-step-interval-ms N, saved as
# serving_pd_iN.json). A topology named again runs again (saved as ..._2.json, ...): the first
# `tandem up` on a fresh machine prefills slower than later ones (docs/benchmarks.md), so
# "unified pd unified pd" compares like with like at low load.
topologies=${TOPOLOGIES:-unified pd}
declare -A runs=()
for topology in $topologies; do
    case $topology in
        pd:*) name="serving_pd_i${topology#pd:}" ;;
        *) name="serving_$topology" ;;
    esac
    runs[$name]=$((${runs[$name]:-0} + 1))
    [ "${runs[$name]}" -eq 1 ] || name="${name}_${runs[$name]}"
    case $topology in
        pd:*)
            serve pd "$name" --kv-transport nixl \
                --worker-args "--device cuda:0 --max-total-tokens 150000 --decode-step-interval-ms ${topology#pd:}" "$@"
            ;;
        *) serve "$topology" "$name" --kv-transport nixl "$@" ;;
    esac
done
if [[ " $topologies " == *" unified "* && " $topologies " == *" pd "* ]]; then
    python3 bench/serving.py --compare "$out/serving_unified.json" "$out/serving_pd.json" \
        --png "$out/serving_pd_vs_unified.png"
fi
