#!/usr/bin/env python3
"""Prints the GroupNorm+SiLU ratio table from JSON-line files of keel-gpu-suite `bench`
(impl keel and candle) and torch_gn_bench.py (impl torch).

  python3 report.py keel_bench.jsonl torch_bench.jsonl

"autograd": what candle's autograd adds by itself on x (seed ones_like(y), zeros_like(x) +
dx when storing the gradient), included in keel's and candle's f+b.
x torch / x candle are speedups of keel (their ms / keel ms). GB/s: 2 x tensor bytes / keel
forward time; % copy: of the device-to-device copy bandwidth measured by keel in the same
call. Targets (issue 3): forward >= 3x torch eager on every row and >= 70% of copy on
4x64x512x512; forward+backward >= 2x torch eager on every row.
"""
import json
import sys

TARGET_FWD, TARGET_FB, TARGET_COPY = 3.0, 2.0, 0.70
COPY_SHAPE = "4x64x512x512"


def load(paths):
    rows, copy = {}, {}
    for p in paths:
        try:
            f = open(p)
        except OSError as e:
            print(f"report: cannot read {p}: {e}")
            continue
        with f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if r.get("kind") == "autograd":
                    rows.setdefault((r["dtype"], r["shape"]), {})["autograd"] = r
                elif r.get("kind") == "copy":
                    copy[r["impl"]] = r["gbps"]
                elif r.get("kind") == "gn":
                    rows.setdefault((r["dtype"], r["shape"]), {})[r["impl"]] = r
    return rows, copy


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def main(paths):
    rows, copy = load(paths)
    if not rows:
        print("report: no GroupNorm rows found")
        return 1
    copy_gbps = copy.get("keel")
    order = {"f32": 0, "f16": 1, "bf16": 2}
    head = ("dtype", "shape", "keel fwd", "torch fwd", "candle fwd", "x torch", "x candle",
            "GB/s", "% copy", "keel f+b", "autograd", "torch f+b", "candle f+b", "x torch", "x candle", "targets")
    table = [head]
    misses = 0
    for (dt, shape) in sorted(rows, key=lambda k: (order.get(k[0], 9), k[1])):
        r = rows[(dt, shape)]
        get = lambda impl, key: r.get(impl, {}).get(key)
        kf, tf, cf = get("keel", "fwd_ms"), get("torch", "fwd_ms"), get("candle", "fwd_ms")
        kb, tb, cb = get("keel", "fwdbwd_ms"), get("torch", "fwdbwd_ms"), get("candle", "fwdbwd_ms")
        gbps = get("keel", "fwd_gbps")
        pct = ratio(gbps, copy_gbps)
        fx, bx = ratio(tf, kf), ratio(tb, kb)
        notes = []
        if fx is not None and fx < TARGET_FWD:
            notes.append(f"fwd<{TARGET_FWD:g}x")
        if bx is not None and bx < TARGET_FB:
            notes.append(f"f+b<{TARGET_FB:g}x")
        if shape == COPY_SHAPE and pct is not None and pct < TARGET_COPY:
            notes.append(f"copy<{TARGET_COPY:.0%}")
        if fx is None or bx is None:
            notes.append("incomplete")
        misses += bool(notes)
        table.append((dt, shape, fmt(kf), fmt(tf), fmt(cf), fmt(fx, ".1f"), fmt(ratio(cf, kf), ".1f"),
                      fmt(gbps, ".0f"), fmt(None if pct is None else 100 * pct, ".0f"),
                      fmt(kb), fmt(get("autograd", "ms")), fmt(tb), fmt(cb), fmt(bx, ".1f"), fmt(ratio(cb, kb), ".1f"),
                      "ok" if not notes else "MISS " + ",".join(notes)))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    print(f"\nGroupNorm(32)+SiLU, median ms (fwd+bwd = forward + backward through autograd); "
          f"copy bandwidth: keel {fmt(copy_gbps, '.0f')} GB/s, torch {fmt(copy.get('torch'), '.0f')} GB/s")
    for i, row in enumerate(table):
        print(" | ".join(str(v).rjust(widths[j]) if j > 1 else str(v).ljust(widths[j]) for j, v in enumerate(row)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    print(f"\nrows meeting every target: {len(table) - 1 - misses}/{len(table) - 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
