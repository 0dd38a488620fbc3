#!/usr/bin/env python3
"""The results table of a `seg_train compare` / `det_train compare` grid, rebuilt from its
run directories (`<out>/runs/<row>-b<batch>-s<seed>/summary.json`): for a grid stopped
before its end (the rows whose runs all finished are shown; a row with a missing seed is
listed as incomplete), or to re-render one. Same statistics as keel::train::grid: mean and
sample std of the final metric over seeds, loss spikes / NaN-Inf / skipped steps summed,
the nearest-rank p99 of every finite pre-clip grad norm of every seed, mean s/step.

usage: scripts/grid_table.py RUNS_DIR [--metric final_map50|final_miou]
"""
import argparse
import json
import math
import re
from collections import defaultdict
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("runs", type=Path)
ap.add_argument("--metric", default="final_miou")
a = ap.parse_args()

cells = defaultdict(dict)
for d in sorted(a.runs.iterdir()):
    m = re.fullmatch(r"(.+)-b(\d+)-s(\d+)", d.name)
    if not (d.is_dir() and m):
        continue
    s = d / "summary.json"
    if s.is_file():
        cells[(m[1], int(m[2]))][int(m[3])] = json.loads(s.read_text())

def mean_std(v):
    n = len(v)
    mu = sum(v) / n
    var = sum((x - mu) ** 2 for x in v) / (n - 1) if n > 1 else 0.0
    return mu, math.sqrt(var)

def p99(v):
    v = sorted(x for x in v if math.isfinite(x))
    return v[round(0.99 * (len(v) - 1))] if v else float("nan")

seeds = max((max(c) + 1 for c in cells.values()), default=0)
print(f"| norm | batch | final val {a.metric.removeprefix('final_')} (mean ± std) | per seed | loss spikes (total) "
      "| grad-norm p99 | NaN/Inf steps | skipped steps | s/step | verdicts |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (row, b), runs in sorted(cells.items()):
    rs = [runs[k] for k in sorted(runs)]
    vals = [r[a.metric] for r in rs]
    mu, sd = mean_std(vals)
    done = "" if len(rs) == seeds else f" (incomplete: {len(rs)} of {seeds} seeds)"
    print(f"| {row} | {b} | {mu:.4f} ± {sd:.4f}{done} | {', '.join(f'{v:.3f}' for v in vals)} "
          f"| {sum(r['loss_spikes'] for r in rs)} "
          f"| {p99([g for r in rs for g in r['grad_norms']]):.3f} "
          f"| {sum(r['nonfinite_steps'] for r in rs)} | {sum(r['skipped_steps'] for r in rs)} "
          f"| {sum(r['seconds_per_step'] for r in rs) / len(rs):.3f} "
          f"| {', '.join(r['verdict'] for r in rs)} |")
