#!/usr/bin/env bash
# The one script the GPU machine runs (from the repository root, with .bundle carried):
#   bash .bundle/run.sh
# Unpacks keel-gpu-suite, seg_train and det_train (python lzma: no xz needed), sets LD_LIBRARY_PATH
# for keel's binaries only (the PyTorch baselines load their own CUDA libraries), checks
# ldd, and runs in one call:
#   1. the GN, conv and det correctness suites (f32/f16/bf16, NaN-poisoned outputs; det:
#      keel-det's box IoU/GIoU, focal and GIoU losses with gradients, NMS indices), and the
#      memory-pool setting;
#   2. the GN+SiLU and conv benchmarks against candle and PyTorch eager;
#   3. seg_train's training step at the twin's configuration (width 64, fpn 128, 21 classes,
#      batch 8, 256x256; GN and BN; f32, TF32, f16 AMP with the GradScaler, bf16), median
#      of 4 windows of 5 steps (one host read each, --log-every 5) after 5 warm-up steps
#      and peak device memory, side by side with the
#      PyTorch eager twin (examples/seg_train/torch_twin.py) in the same call;
#   3b. det_train's FCOS training step (det_train's widths: width 16, fpn 32, 2 head convs;
#      batch 8, 256x256; GN; f32 and f16 AMP), median of 20 steps after 5 warm-up steps,
#      side by side with its PyTorch eager twin (examples/det_train/torch_twin.py, on keel's
#      init weights and batch: parameter count, names and first losses checked);
#   4. a short real seg_train run (synthetic data, batch 8, 128x128, deterministic cuDNN),
#      killed once (SIGKILL) and resumed, against an uninterrupted run: identical per-step
#      losses and final mIoU.
# It prints ONE ratio table last (keel / PyTorch for every benchmark row, keel vs candle
# where candle runs it). Every phase has a timeout; the whole call stays under 8 minutes
# (T_TEST 90 + T_BENCH 90 + T_TORCH 2x35 + 8 step configs x T_CFG 18 + 2 det step configs
# x T_DET 30 + the run's three processes, each under T_RUN 45 but together about a minute
# = about 530 s; the det configs take about 15 s each when nothing hangs).
# SUITES="gn conv det step detstep run" (any subset) restricts the phases; empty = all.
# Results go to $OUT (at most 9 files: test.log, keel_bench.jsonl, torch_bench.jsonl,
# torch_conv_bench.jsonl, step_bench.jsonl, det_step.jsonl, seg_run.log, stderr.log,
# report.txt).
# Exit code: 0 all passed, 1 correctness or exact resume failed, 2 setup failed,
# 3 a benchmark failed.
set -uo pipefail
B="$(cd "$(dirname "$0")" && pwd)"
R="$(cd "$B/.." && pwd)" # the repository root (examples/seg_train/torch_twin.py)
OUT="${OUT:-/tmp/keel-gpu-out}"
mkdir -p "$OUT"
BIN=/tmp/keel-gpu-suite
SEG=/tmp/seg_train
DET=/tmp/det_train
T_TEST="${T_TEST:-90}" T_BENCH="${T_BENCH:-90}" T_TORCH="${T_TORCH:-35}"
T_CFG="${T_CFG:-18}" T_DET="${T_DET:-30}" T_RUN="${T_RUN:-45}"
RUN_STEPS="${RUN_STEPS:-900}"
if [ "$RUN_STEPS" -lt 3 ]; then echo "RUN_STEPS must be at least 3 (got $RUN_STEPS)"; exit 2; fi
SUITES="${SUITES:-}"
want() { [ -z "$SUITES" ] || [[ " $SUITES " == *" $1 "* ]]; }
DRY_RUN="${DRY_RUN:-0}" # 1: no GPU binaries; still run the PyTorch scripts on CPU and the reports
ERR="$OUT/stderr.log"
# A reused $OUT must not mix in an earlier call's rows.
for f in test.log keel_bench.jsonl torch_bench.jsonl torch_conv_bench.jsonl step_bench.jsonl \
  det_step.jsonl seg_run.log stderr.log report.txt; do : >"$OUT/$f"; done

say() { echo "== $(date -u +%H:%M:%S) $*"; }
cat "$B/MANIFEST" 2>/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true

PY=python3
if ! "$PY" -c "import torch" 2>/dev/null && [ -x /opt/torch/.venv/bin/python3 ]; then
  PY=/opt/torch/.venv/bin/python3
fi

# keel's binaries get the CUDA/cuDNN library path; PyTorch keeps its own environment.
KEEL_LD=""
for d in /usr/local/cuda/lib64 /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib \
  /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cudnn/lib; do
  [ -d "$d" ] && KEEL_LD="$KEEL_LD:$d"
done
KEEL_LD="${KEEL_LD#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
keel() { LD_LIBRARY_PATH="$KEEL_LD" "$@"; }

test_rc=0 bench_rc=0 torch_rc=0 step_rc=0 run_rc=0
if [ "$DRY_RUN" != 1 ]; then
  say "unpack"
  for b in keel-gpu-suite seg_train det_train; do
    "$PY" -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" \
      "$B/$b.xz" "/tmp/$b" || { echo "unpack of $b failed"; exit 2; }
    chmod +x "/tmp/$b"
    keel ldd "/tmp/$b" | grep -E 'not found|libcu'
    if keel ldd "/tmp/$b" | grep -q 'not found'; then
      echo "missing shared libraries for $b (LD_LIBRARY_PATH=$KEEL_LD)"
      exit 2
    fi
  done

  if want gn || want conv || want det; then
    SUITE_ARGS=()
    want gn && SUITE_ARGS+=(gn)
    want conv && SUITE_ARGS+=(conv)
    want det && SUITE_ARGS+=(det)
    say "correctness suite (timeout ${T_TEST}s)"
    timeout "$T_TEST" env LD_LIBRARY_PATH="$KEEL_LD" "$BIN" test "${SUITE_ARGS[@]}" 2>&1 | tee "$OUT/test.log"
    test_rc=${PIPESTATUS[0]}

    say "keel + candle benchmark (timeout ${T_BENCH}s)"
    timeout "$T_BENCH" env LD_LIBRARY_PATH="$KEEL_LD" "$BIN" bench "${SUITE_ARGS[@]}" >"$OUT/keel_bench.jsonl" 2>>"$ERR"
    bench_rc=$?
    tail -3 "$OUT/keel_bench.jsonl"
  fi
fi

TORCH_ARGS=()
[ "$DRY_RUN" = 1 ] && TORCH_ARGS=(--device cpu --quick --iters 5)
if want gn; then
  say "torch eager GroupNorm benchmark (timeout ${T_TORCH}s)"
  timeout "$T_TORCH" "$PY" "$B/torch_gn_bench.py" "${TORCH_ARGS[@]}" >"$OUT/torch_bench.jsonl" 2>>"$ERR" || torch_rc=$?
fi
if want conv; then
  say "torch conv2d benchmark (timeout ${T_TORCH}s)"
  timeout "$T_TORCH" "$PY" "$B/torch_conv_bench.py" "${TORCH_ARGS[@]}" >"$OUT/torch_conv_bench.jsonl" 2>>"$ERR" || torch_rc=$?
fi

# record_step RC LIMIT JSON FILE LABEL MODE NORM: after a step benchmark that exited with RC
# under `timeout LIMIT`, appends its JSON report (with mode and norm) to FILE, or a row
# saying why there is none (and sets step_rc=3).
record_step() {
  local rc=$1 limit=$2 json=$3 file=$4 label=$5 mode=$6 norm=$7 why
  if [ "$rc" = 0 ] && [ -f "$json" ]; then
    "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); r['mode']=sys.argv[2]; r['norm']=sys.argv[3]; print(json.dumps(r))" \
      "$json" "$mode" "$norm" >>"$file"
    tail -1 "$file" | cut -c1-160
  else
    [ "$rc" = 137 ] && why="timed out after ${limit}s" || why="failed (rc $rc, see stderr.log)"
    echo "$label $norm $mode $why"
    echo "{\"norm\": \"$norm\", \"mode\": \"$mode\", \"error\": \"$why\"}" >>"$file"
    step_rc=3
  fi
}

# 3. The training step, keel and the PyTorch twin side by side (seg_train bench --vs-torch).
# Each config under its own `timeout` (coreutils signals the whole process group, so the
# twin's python goes too); a config that times out is recorded as such.
if want step && [ "$DRY_RUN" != 1 ]; then
  say "seg_train step at the twin configuration vs PyTorch (timeout ${T_CFG}s per config)"
  for norm in gn bn; do
    for mode in f32 tf32 f16 bf16; do
      case $mode in
        f32) amp=(--amp off) ;;
        tf32) amp=(--amp off --tf32) ;;
        *) amp=(--amp "$mode") ;;
      esac
      rm -f /tmp/step.json
      timeout -s KILL "$T_CFG" env LD_LIBRARY_PATH="$KEEL_LD" "$SEG" bench --device cuda --norm "$norm" \
        "${amp[@]}" --width 64 --fpn 128 --num-classes 21 --batch-size 8 --image-size 256 \
        --warmup 5 --steps 20 --log-every 5 --clip-grad 0 --vs-torch --python "$PY" \
        --twin-script "$R/examples/seg_train/torch_twin.py" --json /tmp/step.json >>"$ERR" 2>&1
      record_step $? "$T_CFG" /tmp/step.json "$OUT/step_bench.jsonl" step "$mode" "$norm"
    done
  done
fi

# 3b. det_train's FCOS step beside its PyTorch twin (det_train bench --vs-torch), f32 and
# f16 AMP, each config under its own `timeout` as above; rows go to det_step.jsonl.
if want detstep && [ "$DRY_RUN" != 1 ]; then
  say "det_train step (batch 8, 256x256) vs PyTorch (timeout ${T_DET}s per config)"
  for mode in f32 f16; do
    [ "$mode" = f32 ] && amp=off || amp=f16
    rm -f /tmp/det_step.json
    timeout -s KILL "$T_DET" env LD_LIBRARY_PATH="$KEEL_LD" "$DET" bench --device cuda --norm gn \
      --amp "$amp" --width 16 --fpn 32 --head-convs 2 --batch-size 8 --image-size 256 \
      --bench-warmup 5 --bench-steps 20 --vs-torch --python "$PY" \
      --twin-script "$R/examples/det_train/torch_twin.py" --json /tmp/det_step.json >>"$ERR" 2>&1
    record_step $? "$T_DET" /tmp/det_step.json "$OUT/det_step.jsonl" "det step" "$mode" gn
  done
fi

# 4. A short real run, killed once and resumed, against an uninterrupted one.
if want run && [ "$DRY_RUN" != 1 ]; then
  say "seg_train run: uninterrupted vs SIGKILL + --resume (deterministic, timeout ${T_RUN}s each)"
  {
    common=(--device cuda --deterministic --batch-size 8 --image-size 128 --steps "$RUN_STEPS"
      --eval-every $((RUN_STEPS / 3)) --seed 0 --quiet)
    rm -rf /tmp/runA /tmp/runB
    tk() { timeout -s KILL "$T_RUN" env LD_LIBRARY_PATH="$KEEL_LD" "$SEG" "$@"; }
    if ! tk "${common[@]}" --out /tmp/runA; then
      echo "RESUME: uninterrupted run failed or timed out"; exit 1
    fi
    # seg_train itself in the background (not a shell function: $! must be its pid).
    LD_LIBRARY_PATH="$KEEL_LD" "$SEG" "${common[@]}" --out /tmp/runB &
    pid=$!
    t0=$SECONDS
    while kill -0 $pid 2>/dev/null && ! ls /tmp/runB/checkpoints/ckpt-*.safetensors >/dev/null 2>&1; do
      sleep 0.2
      if [ $((SECONDS - t0)) -gt "$T_RUN" ]; then break; fi
    done
    if ! kill -0 $pid 2>/dev/null; then
      echo "RESUME: FAIL (the run to kill ended before its first checkpoint was seen)"; exit 1
    fi
    kill -9 $pid; wait $pid 2>/dev/null
    echo "killed after: $(ls /tmp/runB/checkpoints)"
    if ! tk --resume /tmp/runB --device cuda --deterministic --quiet; then
      echo "RESUME: resumed run failed or timed out"; exit 1
    fi
    "$PY" "$B/compare_runs.py" /tmp/runA /tmp/runB
  } >"$OUT/seg_run.log" 2>&1
  run_rc=$?
  tail -6 "$OUT/seg_run.log"
fi

echo
n_pass=$(grep -c '^PASS' "$OUT/test.log" 2>/dev/null || true)
n_fail=$(grep -c '^FAIL' "$OUT/test.log" 2>/dev/null || true)
echo "correctness: rc=$test_rc (${n_pass:-0} PASS, ${n_fail:-0} FAIL)  keel bench rc=$bench_rc  torch rc=$torch_rc  step rc=$step_rc  run rc=$run_rc"
grep '^FAIL' -A8 "$OUT/test.log" 2>/dev/null | head -30
tail -5 "$ERR"
: >"$OUT/report.txt"
want conv && "$PY" "$B/report_conv.py" "$OUT/keel_bench.jsonl" "$OUT/torch_conv_bench.jsonl" | tee -a "$OUT/report.txt"
want gn && "$PY" "$B/report.py" "$OUT/keel_bench.jsonl" "$OUT/torch_bench.jsonl" | tee -a "$OUT/report.txt"
"$PY" "$B/report_all.py" "$OUT" | tee -a "$OUT/report.txt"
if [ "$test_rc" != 0 ] || [ "$run_rc" != 0 ]; then exit 1; fi
if [ "$bench_rc" != 0 ] || [ "$torch_rc" != 0 ] || [ "$step_rc" != 0 ]; then exit 3; fi
exit 0
