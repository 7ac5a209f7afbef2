#!/usr/bin/env bash
# Everything the GPU machine needs beyond its image (Python 3.12, torch 2.11 cu130, triton,
# transformers, grpcio, numpy, httpx), fetched into .whl/ (git-ignored) with the workplace's
# ../shared/tools/device-wheels.sh, in one carry (about 38 MB of the device tool's 64 MiB):
#   - the services' runtime wheels (about 18 MB) and py-spy (3 MB, bench/pyspy_summary.py);
#   - NIXL for CUDA 13 (nixl + nixl-cu13, a 57 MB wheel) repacked as .whl/nixl-cu13.tar.xz
#     (about 19 MB): the wheel's contents without nixl_ep_cu13 (expert-parallel all-to-all, 91 MB
#     unpacked, unused here) and its .data folder (example programs and headers), so that NIXL
#     travels in the same call as the rest instead of a call of its own.
# On the GPU machine, with the device tool's carry [".whl"], start each command with
#   source bench/gpu_setup.sh
# (installs both into /tmp/site once per machine and sets PYTHONPATH).
# Usage, from the repository root: bash bench/gpu_wheels.sh
# Keep this list in step with pyproject.toml's runtime dependencies.
set -euo pipefail
fetch=${DEVICE_WHEELS:-../shared/tools/device-wheels.sh}
rm -rf .whl
bash "$fetch" \
    msgspec pyzmq xgrammar==0.2.8 apache-tvm-ffi pydantic pydantic-core annotated-types \
    typing-inspection typing-extensions fastapi starlette uvicorn h11 anyio sniffio idna \
    protobuf==7.36.2 grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
    opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto \
    opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-proto-grpc \
    opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-http-transport \
    opentelemetry-exporter-otlp-common googleapis-common-protos importlib-metadata zipp \
    requests urllib3 certifi charset-normalizer py-spy >/dev/null
bash "$fetch" nixl==1.5.1 nixl-cu13==1.5.1 >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for wheel in .whl/nixl-*.whl .whl/nixl_cu13-*.whl; do
    unzip -q -o "$wheel" -d "$work/site"
    rm "$wheel"
done
tar -C "$work/site" --exclude=./nixl_ep_cu13 --exclude='./nixl_cu13-*.data' -cf - . | xz -T0 -6 >.whl/nixl-cu13.tar.xz
du -sh .whl
