#!/usr/bin/env bash
# The one script the GPU machine runs (from the repository root, with .bundle carried):
#   bash .bundle/run.sh
# Unpacks the keel-gpu-suite binary (python lzma: no xz needed), sets LD_LIBRARY_PATH as
# shared/GPU.md verified, checks ldd, runs the CUDA correctness suite, the keel/candle
# benchmark and PyTorch eager on the same shapes, and prints ONE ratio table last.
# Every phase has a timeout so the whole call stays under ~7.5 minutes even if one hangs
# (150 + 150 + 60 + 60 s; override with T_TEST, T_BENCH, T_TORCH). SUITES="gn" (or "conv")
# restricts the suites and the PyTorch baselines; empty = all.
# Results (logs, JSON lines, the table) go to $OUT, which the device tool brings back.
# Exit code: 0 all passed, 1 correctness failed, 2 setup failed, 3 a benchmark failed.
set -uo pipefail
B="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-/tmp/keel-gpu-out}"
mkdir -p "$OUT"
BIN=/tmp/keel-gpu-suite
T_TEST="${T_TEST:-150}" T_BENCH="${T_BENCH:-150}" T_TORCH="${T_TORCH:-60}"
SUITES="${SUITES:-}"
want() { [ -z "$SUITES" ] || [[ " $SUITES " == *" $1 "* ]]; }
DRY_RUN="${DRY_RUN:-0}" # 1: skip the binary (no GPU), still run torch on CPU and the report

say() { echo "== $(date -u +%H:%M:%S) $*"; }
cat "$B/MANIFEST" 2>/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true

PY=python3
if ! "$PY" -c "import torch" 2>/dev/null && [ -x /opt/torch/.venv/bin/python3 ]; then
  PY=/opt/torch/.venv/bin/python3
fi

test_rc=0 bench_rc=0 torch_rc=0
if [ "$DRY_RUN" != 1 ]; then
  say "unpack"
  "$PY" -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" \
    "$B/keel-gpu-suite.xz" "$BIN" || { echo "unpack failed"; exit 2; }
  chmod +x "$BIN"
  L=""
  for d in /usr/local/cuda/lib64 /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib \
    /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cudnn/lib; do
    [ -d "$d" ] && L="$L:$d"
  done
  export LD_LIBRARY_PATH="${L#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  ldd "$BIN" | grep -E 'not found|libcu'
  if ldd "$BIN" | grep -q 'not found'; then
    echo "missing shared libraries (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"
    exit 2
  fi

  say "correctness suite (timeout ${T_TEST}s)"
  timeout "$T_TEST" "$BIN" test $SUITES 2>&1 | tee "$OUT/test.log"
  test_rc=${PIPESTATUS[0]}

  say "keel + candle benchmark (timeout ${T_BENCH}s)"
  timeout "$T_BENCH" "$BIN" bench $SUITES >"$OUT/keel_bench.jsonl" 2>"$OUT/keel_bench.err"
  bench_rc=$?
  cat "$OUT/keel_bench.jsonl"
  tail -5 "$OUT/keel_bench.err"
fi

TORCH_ARGS=()
[ "$DRY_RUN" = 1 ] && TORCH_ARGS=(--device cpu --quick --iters 5)
if want gn; then
  say "torch eager GroupNorm benchmark (timeout ${T_TORCH}s)"
  timeout "$T_TORCH" "$PY" "$B/torch_gn_bench.py" "${TORCH_ARGS[@]}" >"$OUT/torch_bench.jsonl" 2>"$OUT/torch_bench.err"
  torch_rc=$?
  cat "$OUT/torch_bench.jsonl"
  tail -5 "$OUT/torch_bench.err"
fi

if want conv; then
  say "torch conv2d benchmark (timeout ${T_TORCH}s)"
  timeout "$T_TORCH" "$PY" "$B/torch_conv_bench.py" "${TORCH_ARGS[@]}" >"$OUT/torch_conv_bench.jsonl" 2>"$OUT/torch_conv_bench.err" || torch_rc=$?
  cat "$OUT/torch_conv_bench.jsonl"
  tail -5 "$OUT/torch_conv_bench.err"
fi

echo
n_pass=$(grep -c '^PASS' "$OUT/test.log" 2>/dev/null || true)
n_fail=$(grep -c '^FAIL' "$OUT/test.log" 2>/dev/null || true)
echo "correctness: rc=$test_rc (${n_pass:-0} PASS, ${n_fail:-0} FAIL)  keel bench rc=$bench_rc  torch bench rc=$torch_rc"
grep '^FAIL' -A8 "$OUT/test.log" 2>/dev/null | head -40
: >"$OUT/report.txt"
want conv && "$PY" "$B/report_conv.py" "$OUT/keel_bench.jsonl" "$OUT/torch_conv_bench.jsonl" | tee -a "$OUT/report.txt"
want gn && "$PY" "$B/report.py" "$OUT/keel_bench.jsonl" "$OUT/torch_bench.jsonl" | tee -a "$OUT/report.txt"
if [ "$test_rc" != 0 ]; then exit 1; fi
if [ "$bench_rc" != 0 ] || [ "$torch_rc" != 0 ]; then exit 3; fi
exit 0
