#!/usr/bin/env bash
# Compiles kernels/cuda/group_norm.cu as host C++ (shim.h emulates threads, barriers and warp
# shuffles) and checks it against a double-precision reference. Needs g++ >= 11 and the CUDA
# headers of the pinned toolchain (scripts/setup-nvcc.sh); no GPU.
set -euo pipefail
cd "$(dirname "$0")"
CUDA_HOME="${CUDA_HOME:-/opt/cuda-13.0-pip/cuda}"
OUT="${TMPDIR:-/tmp}/keel-cuda-host-check"
g++ -std=c++20 -O2 -pthread -I"$CUDA_HOME/include" -include shim.h check.cpp -o "$OUT"
"$OUT"
