# syntax=docker/dockerfile:1
# Tandem's one image: gateway, router, prefill, decode and unified workers. The container runs
# what it is given under tini (PID 1: forwards SIGTERM, reaps orphans), so Kubernetes manifests
# pass the service as args, e.g. `args: [python, -m, services.router, --model, ...]`
# (deploy/k8s), and `docker run IMAGE python -m services.gateway --help` works the same.
#
#   docker build -t tandem:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t tandem:0.1.0 .
#
# torch: PyPI's Linux x86_64 wheels are CUDA builds that bring the CUDA runtime, cuBLAS and NCCL
# as nvidia-* wheels, so no CUDA base image is needed; the node only provides the driver. Set
# TORCH_INDEX_URL to pick another CUDA build (an older driver needs an older CUDA).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip \
    && if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" torch; fi
WORKDIR /src
# Dependencies first (a layer that survives source edits): install the project from its metadata
# with empty packages, then drop it; the real source goes in below without touching dependencies.
COPY pyproject.toml README.md ./
RUN mkdir -p shared services kernels \
    && touch shared/__init__.py services/__init__.py kernels/__init__.py \
    && pip install ".[nixl,gpu]" \
    && pip uninstall -y tandem \
    && rm -rf shared services kernels build *.egg-info
COPY shared shared
COPY services services
COPY kernels kernels
COPY proto proto
# Smoke test from / (not /src): the installed packages, not the source tree, must import.
RUN pip install --no-deps . \
    && cd / && python -m services.gateway --help >/dev/null \
    && python -m services.router --help >/dev/null \
    && python -m services.prefill --help >/dev/null \
    && python -m services.decode --help >/dev/null

FROM ${PYTHON_IMAGE}
# tini: PID 1. gcc + libc6-dev: Triton compiles its small C launcher stubs with the system C
# compiler when a kernel is first used on a GPU (the one build tool this image keeps). libnuma,
# libibverbs, librdmacm and the verbs providers: UCX (inside NIXL) finds RDMA NICs through them
# when a pod has one; without RDMA it uses TCP.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        tini gcc libc6-dev libnuma1 libibverbs1 librdmacm1 ibverbs-providers \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 tandem \
    && useradd --uid 10001 --gid 10001 --home-dir /home/tandem --create-home --shell /usr/sbin/nologin tandem
COPY --from=build /opt/venv /opt/venv
# Writable state goes to /tmp (an emptyDir in Kubernetes; the root filesystem is read-only there):
# Triton's kernel cache, the CUDA JIT cache, Hugging Face's cache, the engine's IPC sockets.
# NVIDIA_DRIVER_CAPABILITIES: the container toolkit mounts the CUDA driver (compute). The image
# sets no NVIDIA_VISIBLE_DEVICES: which GPUs a container sees is the device plugin's business.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/tandem \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    TRITON_CACHE_DIR=/tmp/.triton \
    CUDA_CACHE_PATH=/tmp/.nv/ComputeCache \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/tandem
# The uid/gid the manifests run as (runAsUser/runAsGroup 10001).
USER 10001:10001
# gateway HTTP, router gRPC (public), router admin gRPC, router admin HTTP, prefill gRPC, decode
# gRPC, metrics, tensor-parallel worker gRPC and its ranks' rendezvous (deploy/k8s/extras/)
EXPOSE 8000 50051 50052 8080 50061 50062 9400 50063 29500
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "services.gateway", "--help"]
