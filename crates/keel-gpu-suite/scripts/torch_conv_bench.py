#!/usr/bin/env python3
"""PyTorch (cuDNN) conv2d on the shapes of keel-gpu-suite's `conv` bench: 3x3, padding 1,
C_out = C_in, f32 (TF32 off, as keel's default), f16, bf16; cudnn.benchmark on.

Same method as keel-gpu-suite (crates/keel-gpu-suite/src/util.rs `time_ms`): one timed
first call, 3 warmups, then min(iters, 2000 ms / first call) (at least 5) iterations, each
between two device synchronizes; the median in ms. Forward = F.conv2d(x, w, padding=1);
forward+backward adds y.backward(torch.ones_like(y)) with x and w requiring grad (keel's
`sum_all().backward()` seeds ones too). One JSON line per (dtype, shape).

  python3 torch_conv_bench.py                      # on the GPU machine
  python3 torch_conv_bench.py --device cpu --quick # a smoke run anywhere
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

SHAPES = [(8, 64, 128, 128), (8, 128, 64, 64), (8, 256, 32, 32), (2, 64, 256, 256)]
QUICK_SHAPE = (2, 16, 32, 32)
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


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
    v.sort()
    return v[len(v) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        sync = torch.cuda.synchronize
    else:
        sync = lambda: None  # noqa: E731
    shapes = [QUICK_SHAPE] if args.quick else SHAPES
    for dt, dtype in DTYPES.items():
        for s in shapes:
            c = s[1]
            x = torch.randn(s, device=dev).to(dtype).requires_grad_(True)
            w = (torch.randn(c, c, 3, 3, device=dev) * 0.05).to(dtype).requires_grad_(True)

            def fwd():
                with torch.no_grad():
                    F.conv2d(x, w, padding=1)

            def fb():
                x.grad = None
                w.grad = None
                y = F.conv2d(x, w, padding=1)
                y.backward(torch.ones_like(y))

            f = time_ms(fwd, sync, args.iters)
            b = time_ms(fb, sync, args.iters)
            shape = "x".join(str(v) for v in s)
            print(json.dumps({"kind": "conv", "impl": "torch", "dtype": dt, "shape": shape,
                              "c_out": c, "fwd_ms": round(f, 5), "fwdbwd_ms": round(b, 5)}))


if __name__ == "__main__":
    main()
