#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and a CUDA toolkit: build the CUDA extension, run every test
# (the GPU ones included: Triton compiled for real, the CUDA backend), then the full benchmark suite.
# Results: pytest's summary, results/bench.csv and results/*.png.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install torch numpy setuptools wheel ninja
ACN_KERNELS_BUILD_CUDA=1 .venv-gpu/bin/pip install --no-build-isolation -e ".[test]"
.venv-gpu/bin/python -m acn_kernels info
.venv-gpu/bin/python -m pytest
.venv-gpu/bin/python -m acn_kernels bench
