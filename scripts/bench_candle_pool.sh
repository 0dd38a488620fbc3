#!/usr/bin/env bash
# candle's own CPU pool at 2 threads vs 1, under 0, 1 and 2 extra busy-loop processes
# (BENCHMARKS.md "candle's CPU pool"). Usage: scripts/bench_candle_pool.sh [SEG_TRAIN_BINARY]
# (default target/release/examples/seg_train; build it with
# `cargo build --release --example seg_train`). Prints one line per run: median and min ms.
set -euo pipefail
B="${1:-target/release/examples/seg_train}"
T="bench --device cpu --width 64 --fpn 128 --batch-size 4 --image-size 128 --warmup 2 --steps 8"
D="bench --device cpu --warmup 3 --steps 15"
times() { env "$1" "$B" $2 2>&1 | grep 'keel   step' | sed 's/.*median \([0-9.]*\) ms, min \([0-9.]*\) ms.*/\1 \2/'; }
for hogs in 0 1 2; do
  pids=()
  for _ in $(seq 1 "$hogs"); do (while :; do :; done) & pids+=($!); done
  sleep 1
  for r in 1 2; do
    # X=1: a no-op variable, so the default (keel sets CANDLE_NUM_THREADS=1) applies.
    for e in "CANDLE_NUM_THREADS=2" "X=1"; do
      echo "hogs=$hogs round=$r $e twin(med,min)=$(times "$e" "$T") default(med,min)=$(times "$e" "$D") load=$(cut -d' ' -f1 /proc/loadavg)"
    done
  done
  [ "${#pids[@]}" -gt 0 ] && kill "${pids[@]}"
done
