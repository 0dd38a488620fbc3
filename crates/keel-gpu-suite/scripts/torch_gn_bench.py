#!/usr/bin/env python3
"""PyTorch eager GroupNorm(32) + SiLU on the shapes of keel-gpu-suite's `gn` bench.

Same method as keel-gpu-suite (crates/keel-gpu-suite/src/util.rs `time_ms`): one timed
first call, 3 warmups, then min(iters, 2000 ms / first call) (at least 5) iterations, each
between two device synchronizes; the median in ms. Forward = F.silu(F.group_norm(x)),
forward+backward adds y.backward(torch.ones_like(y)) (keel's `y.backward()` seeds ones too).
Prints one JSON line per (dtype, shape) plus a device-to-device copy line.

  python3 torch_gn_bench.py                      # on the GPU machine
  python3 torch_gn_bench.py --device cpu --quick # a smoke run anywhere
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [
    (1, 128, 256, 256),
    (2, 256, 128, 128),
    (8, 128, 128, 128),
    (4, 64, 512, 512),
    (2, 512, 64, 64),
    (16, 320, 64, 64),
]
QUICK_SHAPE = (2, 64, 32, 32)
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
GROUPS, EPS = 32, 1e-5


def time_ms(fn, sync, iters):
    sync()
    t = time.perf_counter()
    fn()
    sync()
    first = (time.perf_counter() - t) * 1e3
    for _ in range(3):
        fn()
    sync()
    n = max(5, min(iters, int(2000.0 / first))) if first > 0 else iters
    v = []
    for _ in range(n):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        v.append((time.perf_counter() - t) * 1e3)
    return statistics.median(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="one small shape per dtype")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)

    n = 64 << 20 if dev.type == "cuda" else 4 << 20
    buf = torch.zeros(n, dtype=torch.float32, device=dev)
    ms = time_ms(lambda: buf.clone(), sync, args.iters)
    print(json.dumps({"kind": "copy", "impl": "torch", "bytes": n * 4, "ms": round(ms, 5),
                      "gbps": round(2 * n * 4 / (ms * 1e-3) / 1e9, 1)}), flush=True)
    del buf

    shapes = [QUICK_SHAPE] if args.quick else SHAPES
    for name, dt in DTYPES.items():
        for s in shapes:
            c = s[1]
            x = torch.randn(s, device=dev).to(dt)
            w = (1 + 0.5 * torch.randn(c, device=dev)).to(dt)
            b = (0.5 * torch.randn(c, device=dev)).to(dt)
            with torch.no_grad():
                fwd = time_ms(lambda: F.silu(F.group_norm(x, GROUPS, w, b, EPS)), sync, args.iters)
            xv, wv, bv = (t.detach().clone().requires_grad_() for t in (x, w, b))

            def fwd_bwd():
                xv.grad = wv.grad = bv.grad = None
                y = F.silu(F.group_norm(xv, GROUPS, wv, bv, EPS))
                y.backward(torch.ones_like(y))

            fb = time_ms(fwd_bwd, sync, args.iters)
            nbytes = x.numel() * x.element_size()
            print(json.dumps({
                "kind": "gn", "impl": "torch", "dtype": name, "shape": "x".join(map(str, s)),
                "groups": GROUPS, "fwd_ms": round(fwd, 5), "fwdbwd_ms": round(fb, 5),
                "fwd_gbps": round(2 * nbytes / (fwd * 1e-3) / 1e9, 1),
                "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                "torch": torch.__version__,
            }), flush=True)
            del x, w, b, xv, wv, bv


if __name__ == "__main__":
    main()
