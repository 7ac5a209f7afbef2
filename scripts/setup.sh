#!/usr/bin/env bash
# Idempotent setup: a virtualenv in .venv with Tandem and its test tools installed.
# On a host without an NVIDIA GPU it pins torch==2.13.0 (the CPU build) so pip never pulls
# the CUDA wheels; on a GPU host it keeps whatever CUDA torch pip resolves.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.tandem-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q torch
else
    .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -e ".[test]"
touch "$stamp"
