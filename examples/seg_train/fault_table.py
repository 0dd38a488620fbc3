#!/usr/bin/env python3
"""The guard's fault table (issue 12): for each injected fault, seg_train's final val mIoU
with --guard off / skip / rollback over 3 seeds, on the synthetic set.

Builds the release example once, then runs faults x guards x seeds one run at a time
(seg_train's hidden `--fault SPEC`, see keel_train::fault), reads each run's summary.json and
health.json, and writes a markdown table (mean +- std of the final mIoU, verdicts,
interventions, exit codes) to examples/seg_train/results/faults.md.

    python3 examples/seg_train/fault_table.py            # the committed table
    python3 examples/seg_train/fault_table.py --steps 40 --seeds 0 --out /tmp/ft.md  # a smoke run
"""
import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUARDS = ["off", "skip", "rollback"]


def faults(steps):
    """The faults, mid-run ones at half the run."""
    at = steps // 2
    return [
        ("none", "none"),
        ("lr-burst", f"lr-burst@{at}"),
        ("nan-batch", f"nan-batch@{at}"),
        ("poison-labels", f"poison-labels@{at}"),
        ("huge-lr", "huge-lr"),
    ]


def number(v):
    """A summary float: keel writes NaN and infinities as strings ("NaN", "inf")."""
    if v is None:
        return math.nan
    return float(v)


def run_one(exe, args, fault, guard, seed, work):
    out = os.path.join(work, f"{fault}-{guard}-{seed}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [exe, "--quiet", "--device", "cpu", "--fault", fault, "--guard", guard,
           "--seed", str(seed), "--steps", str(args.steps), "--eval-every", str(args.eval_every),
           "--train-size", str(args.train_size), "--val-size", str(args.val_size),
           "--image-size", str(args.image_size), "--out", out]
    t0 = time.time()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    secs = time.time() - t0
    rec = {"fault": fault, "guard": guard, "seed": seed, "exit": p.returncode, "seconds": secs,
           "miou": math.nan, "verdict": "none", "interventions": 0, "stopped_at": None}
    try:
        with open(os.path.join(out, "summary.json")) as f:
            s = json.load(f)
        rec["miou"] = number(s.get("final_miou"))
        rec["interventions"] = s.get("guard_interventions", 0)
        rec["stopped_at"] = s.get("guard_stopped_at")
        with open(os.path.join(out, "health.json")) as f:
            rec["verdict"] = json.load(f)["verdict"]
    except (OSError, ValueError, KeyError) as e:
        tail = p.stderr.strip().splitlines()[-1:] if p.stderr else []
        rec["error"] = f"{e}; {tail}"
    shutil.rmtree(out, ignore_errors=True)
    return rec


def cell(recs):
    finite = [r["miou"] for r in recs if math.isfinite(r["miou"])]
    nan = len(recs) - len(finite)
    if not finite:
        return f"NaN (all {nan})"
    sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
    s = f"{statistics.mean(finite):.3f} ± {sd:.3f}"
    return s + (f" ({nan} NaN)" if nan else "")


def detail(recs):
    verdicts = {}
    for r in recs:
        verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
    v = ", ".join(f"{k} {n}" for k, n in sorted(verdicts.items()))
    inter = "/".join(str(r["interventions"]) for r in recs)
    codes = "/".join(str(r["exit"]) for r in recs)
    return f"{v}; interventions {inter}; exit {codes}"


def write_table(args, rows, total, cmdline):
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        "# seg_train fault table (issue 12)",
        "",
        f"Final val mIoU (mean ± std over seeds {seeds}) of seg_train on the synthetic set with one "
        "injected fault (`--fault`, keel_train::fault) per run, by `--guard` policy. Mid-run faults "
        f"at step {args.steps // 2}: `lr-burst` (LR x1000 for 5 steps), `nan-batch` (NaN inputs), "
        "`poison-labels` (targets x1e4 for one batch); `huge-lr`: LR x1000 from step 0. "
        "NaN = the weights were non-finite at the end.",
        "",
        f"Settings: `--device cpu --steps {args.steps} --eval-every {args.eval_every} "
        f"--train-size {args.train_size} --val-size {args.val_size} --image-size {args.image_size}` "
        "(other flags at their defaults: gn, batch 2, SGD lr 0.05, clip 2).",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}; {len(rows)} runs, one at a time, "
        f"{total / 60:.1f} min. Command: `{cmdline}`",
        "",
        "| fault | guard off | guard skip | guard rollback |",
        "|---|---|---|---|",
    ]
    for name, _ in faults(args.steps):
        cells = [cell([r for r in rows if r["fault_name"] == name and r["guard"] == g])
                 for g in GUARDS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Per cell: verdicts, interventions per seed, exit codes per seed "
              "(1: the guard stopped the run, DIVERGED).", "",
              "| fault | guard off | guard skip | guard rollback |", "|---|---|---|---|"]
    for name, _ in faults(args.steps):
        cells = [detail([r for r in rows if r["fault_name"] == name and r["guard"] == g])
                 for g in GUARDS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "Runs without a summary:"]
        lines += [f"- {r['fault']} {r['guard']} seed {r['seed']}: exit {r['exit']}, {r['error']}"
                  for r in errors]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--train-size", type=int, default=256)
    ap.add_argument("--val-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=os.path.join(ROOT, "examples/seg_train/results/faults.md"))
    ap.add_argument("--no-build", action="store_true", help="use the release example as built")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--example", "seg_train"], cwd=ROOT,
                       check=True)
    exe = os.path.join(ROOT, "target/release/examples/seg_train")
    cmdline = "python3 examples/seg_train/fault_table.py " + " ".join(sys.argv[1:])
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory(prefix="keel-fault-table-") as work:
        for name, spec in faults(args.steps):
            for guard in GUARDS:
                for seed in args.seeds:
                    r = run_one(exe, args, spec, guard, seed, work)
                    r["fault_name"] = name
                    rows.append(r)
                    print(f"{spec:>20} {guard:>8} seed {seed}: mIoU {r['miou']:.4f} "
                          f"{r['verdict']} n={r['interventions']} exit {r['exit']} "
                          f"{r['seconds']:.0f}s", flush=True)
    total = time.time() - t0
    write_table(args, rows, total, cmdline.strip())
    print(f"wrote {args.out} ({total / 60:.1f} min)")


if __name__ == "__main__":
    main()
