#!/usr/bin/env python3
"""Prints the conv2d ratio table from JSON-line files of keel-gpu-suite `bench` (kind conv,
impl keel and candle) and torch_conv_bench.py (impl torch).

  python3 report_conv.py keel_bench.jsonl torch_conv_bench.jsonl

keel/torch: keel ms / torch ms (<= 1.25 is the target on every row, issue 6);
x candle: candle ms / keel ms for forward+backward (>= 5 is the target). "backend" is
keel's CUDA path is cuDNN (keel's `cuda` feature includes it); candle's own conv forward is
cuDNN too in that build (candle's `cudnn` feature).
"""
import json
import sys

T_TORCH, T_CANDLE = 1.25, 5.0


def load(paths):
    rows = {}
    backend = "?"
    for p in paths:
        try:
            f = open(p)
        except OSError as e:
            print(f"report_conv: cannot read {p}: {e}")
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
                if r.get("kind") != "conv":
                    continue
                if r.get("impl") == "keel":
                    backend = r.get("backend", backend)
                rows.setdefault((r["dtype"], r["shape"]), {})[r["impl"]] = r
    return rows, backend


def main():
    rows, backend = load(sys.argv[1:])
    if not rows:
        print("report_conv: no conv rows")
        return 1
    print(f"\nConv2d 3x3 pad 1, C_out = C_in, median ms (keel backend: {backend})")
    hdr = "| dtype | x | keel fwd | candle fwd | torch fwd | keel f+b | candle f+b | torch f+b | keel/torch fwd | keel/torch f+b | x candle f+b |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    miss = 0
    order = {"f32": 0, "f16": 1, "bf16": 2}
    for (dt, shape), r in sorted(rows.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1])):
        k, c, t = r.get("keel"), r.get("candle"), r.get("torch")
        g = lambda d, key: f"{d[key]:.3f}" if d else "-"  # noqa: E731
        rf = k["fwd_ms"] / t["fwd_ms"] if k and t else None
        rb = k["fwdbwd_ms"] / t["fwdbwd_ms"] if k and t else None
        xc = c["fwdbwd_ms"] / k["fwdbwd_ms"] if k and c else None
        flag = lambda v, ok: "-" if v is None else f"{v:.2f}{'' if ok(v) else ' MISS'}"  # noqa: E731
        for v, ok in ((rf, lambda v: v <= T_TORCH), (rb, lambda v: v <= T_TORCH), (xc, lambda v: v >= T_CANDLE)):
            if v is not None and not ok(v):
                miss += 1
        print(f"| {dt} | {shape} | {g(k, 'fwd_ms')} | {g(c, 'fwd_ms')} | {g(t, 'fwd_ms')} | "
              f"{g(k, 'fwdbwd_ms')} | {g(c, 'fwdbwd_ms')} | {g(t, 'fwdbwd_ms')} | "
              f"{flag(rf, lambda v: v <= T_TORCH)} | {flag(rb, lambda v: v <= T_TORCH)} | {flag(xc, lambda v: v >= T_CANDLE)} |")
    print(f"targets: keel/torch <= {T_TORCH} (fwd and f+b), x candle f+b >= {T_CANDLE}; {miss} miss(es)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
