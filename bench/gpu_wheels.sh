#!/usr/bin/env bash
# The wheels the GPU machine needs beyond its image (Python 3.12, torch 2.11 cu130, triton,
# transformers, grpcio, numpy, httpx), fetched into .whl/ (git-ignored) with the workplace's
# ../shared/tools/device-wheels.sh. Carry them with the device tool (carry: [".whl"], 64 MiB per
# call) and start each device command with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
# Usage, from the repository root: bash bench/gpu_wheels.sh [nixl]
#   (no argument) the services' runtime dependencies (about 25 MB);
#   nixl          nixl + nixl-cu13 alone (about 57 MB: a call's carry on its own; install it to
#                 /tmp/site in one call and use it in the next while the machine stays warm).
# Keep this list in step with pyproject.toml's runtime dependencies.
set -euo pipefail
fetch=${DEVICE_WHEELS:-../shared/tools/device-wheels.sh}
rm -rf .whl
if [ "${1:-}" = nixl ]; then
    exec bash "$fetch" nixl==1.5.1 nixl-cu13==1.5.1
fi
bash "$fetch" \
    msgspec pyzmq xgrammar==0.2.8 apache-tvm-ffi pydantic pydantic-core annotated-types \
    typing-inspection typing-extensions fastapi starlette uvicorn h11 anyio sniffio idna \
    protobuf==7.36.2 grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
    opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto \
    opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-proto-grpc \
    opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-http-transport \
    opentelemetry-exporter-otlp-common googleapis-common-protos importlib-metadata zipp \
    requests urllib3 certifi charset-normalizer
