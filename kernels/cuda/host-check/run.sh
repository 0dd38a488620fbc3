#!/usr/bin/env bash
# Compiles kernels/cuda/group_norm.cu as host C++ (shim.h emulates threads, barriers and warp
# shuffles; include/ holds host stand-ins for the three CUDA headers it needs) and checks it
# against a double-precision reference. Needs only a C++20 compiler (g++ >= 11 or clang >= 14):
# no CUDA toolchain, no GPU. `cargo xtask ci` runs it (step `hostcheck`).
set -euo pipefail
cd "$(dirname "$0")"
CXX="${CXX:-c++}"
OUT="${TMPDIR:-/tmp}/keel-cuda-host-check-$$"
trap 'rm -f "$OUT"' EXIT
"$CXX" -std=c++20 -O2 -pthread -Iinclude -include shim.h check.cpp -o "$OUT"
"$OUT"
