#!/usr/bin/env python3
"""The one ratio table run.sh prints last: keel / PyTorch eager for every benchmark row
(GroupNorm+SiLU and conv2d forward and forward+backward, seg_train's and det_train's training
steps), and keel / candle where candle runs the row. Below 1 keel is faster.

  python3 report_all.py OUT_DIR   # reads keel_bench.jsonl, torch_bench.jsonl,
                                  # torch_conv_bench.jsonl, step_bench.jsonl, det_step.jsonl

Targets (issue 9) flagged MISS here: GN+SiLU forward keel/torch <= 1/3 and forward+backward
<= 1/2; conv2d forward+backward keel/torch <= 1.25; training step keel/torch <= 1.0 for GN in
f32 and f16 AMP, with peak memory at most the twin's; det_train's FCOS step keel/torch <= 1.0
(issue 15) in f32 and f16 AMP. (The conv keel/candle >= 5x target is
flagged by report_conv.py's table, printed above this one.)
"""
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
import report_conv  # noqa: E402


def div(a, b):
    return None if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b) else a / b


def fmt(v, spec=".3f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def step_rows(path):
    rows = []
    try:
        f = open(path)
    except OSError:
        return rows
    with f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def main(out):
    p = lambda name: os.path.join(out, name)  # noqa: E731
    table = []  # (suite, row, keel, torch, candle, target, ok)
    gn, _ = report.load([p("keel_bench.jsonl"), p("torch_bench.jsonl")])
    for (dt, shape), r in sorted(gn.items()):
        for key, what, t in (("fwd_ms", "fwd", 1 / 3), ("fwdbwd_ms", "f+b", 1 / 2)):
            k, tt, c = (r.get(i, {}).get(key) for i in ("keel", "torch", "candle"))
            table.append(("gn+silu", f"{dt} {shape} {what}", k, tt, c, t))
    conv, _ = report_conv.load([p("keel_bench.jsonl"), p("torch_conv_bench.jsonl")])
    for (dt, shape), r in sorted(conv.items()):
        for key, what, t in (("fwd_ms", "fwd", None), ("fwdbwd_ms", "f+b", 1.25)):
            k, tt, c = (r.get(i, {}).get(key) if r.get(i) else None for i in ("keel", "torch", "candle"))
            table.append(("conv2d", f"{dt} {shape} {what}", k, tt, c, t))
    for s in step_rows(p("step_bench.jsonl")):
        k = s.get("keel") or {}
        t = s.get("torch") or {}
        target = 1.0 if s.get("norm") == "gn" and s.get("mode") in ("f32", "f16") else None
        err = f" [{s['error']}]" if s.get("error") else ""
        table.append(("step", f"{s.get('norm')} {s.get('mode')} (twin cfg, batch 8, 256px){err}",
                      k.get("median_ms"), t.get("median_ms"), None, target))
        table.append(("step mem", f"{s.get('norm')} {s.get('mode')} peak MiB",
                      k.get("peak_mib"), t.get("peak_mib"), None,
                      1.0 if target is not None else None))
    for s in step_rows(p("det_step.jsonl")):
        k = s.get("keel") or {}
        t = s.get("torch") or {}
        err = f" [{s['error']}]" if s.get("error") else ""
        table.append(("det step", f"FCOS {s.get('norm')} {s.get('mode')} (batch 8, 256px){err}",
                      k.get("median_ms"), t.get("median_ms"), None, 1.0))
        table.append(("det step mem", f"FCOS {s.get('norm')} {s.get('mode')} peak MiB",
                      k.get("peak_mib"), t.get("peak_mib"), None, None))
    if not table:
        print("report_all: no benchmark rows")
        return 1
    print("\nkeel / PyTorch eager and keel / candle, one row per benchmark (median ms; < 1 = keel faster)")
    hdr = "| suite | row | keel | torch | keel/torch | candle | keel/candle | target keel/torch |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    miss = 0
    for suite, row, k, t, c, target in table:
        r = div(k, t)
        flag = ""
        if target is not None and r is not None and r > target:
            flag, miss = " MISS", miss + 1
        print(f"| {suite} | {row} | {fmt(k)} | {fmt(t)} | {fmt(r, '.2f')}{flag} | {fmt(c)} | "
              f"{fmt(div(k, c), '.2f')} | {fmt(target, '.2f') if target else '-'} |")
    print(f"{len(table)} rows, {miss} over their keel/torch target")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
