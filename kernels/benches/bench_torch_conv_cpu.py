#!/usr/bin/env python3
"""PyTorch CPU baseline for kernels/benches/conv.rs: conv2d 3x3 padding 1, f32, forward
and forward+backward (gradients of input and weight; loss y.sum() as in the bench),
torch.set_num_threads(2) unless --threads says otherwise; median and min ms.

With --twin-layers: instead, forward+backward of every distinct convolution of seg_train's
network at the twin widths (batch 4, 128x128 input), as conv.rs's `twin` group.

Run from the repository root:  python3 kernels/benches/bench_torch_conv_cpu.py [--reps 30] [--threads 2] [--twin-layers]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

# (N, C_in, H, W, C_out), the CPU conv shapes of ../shared/GPU.md
SHAPES = [(8, 32, 64, 64, 32), (8, 64, 32, 32, 64), (2, 16, 96, 96, 16)]

# (name, C_in, H = W, C_out, kernel, stride), batch 4: conv.rs's TWIN_LAYERS
TWIN_LAYERS = [
    ("stem1", 3, 128, 32, 3, 2), ("stem2", 32, 64, 64, 3, 2), ("s0 3x3", 64, 32, 64, 3, 1),
    ("s1 down", 64, 32, 128, 3, 2), ("s1 skip", 64, 32, 128, 1, 2), ("s1 3x3", 128, 16, 128, 3, 1),
    ("s2 down", 128, 16, 256, 3, 2), ("s2 skip", 128, 16, 256, 1, 2), ("s2 3x3", 256, 8, 256, 3, 1),
    ("s3 down", 256, 8, 512, 3, 2), ("s3 skip", 256, 8, 512, 1, 2), ("s3 3x3", 512, 4, 512, 3, 1),
    ("lat0", 64, 32, 128, 1, 1), ("lat1", 128, 16, 128, 1, 1), ("lat2", 256, 8, 128, 1, 1),
    ("lat3", 512, 4, 128, 1, 1), ("smooth", 128, 32, 128, 3, 1), ("head", 128, 32, 5, 1, 1),
]


def median_min_ms(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--twin-layers", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, mkldnn {torch.backends.mkldnn.is_available()}")
    if args.twin_layers:
        for name, ci, h, co, k, stride in TWIN_LAYERS:
            x = torch.randn(4, ci, h, h, requires_grad=True)
            w = (torch.randn(co, ci, k, k) * 0.1).requires_grad_(True)

            def fwd_bwd():
                x.grad = None
                w.grad = None
                F.conv2d(x, w, stride=stride, padding=k // 2).sum().backward()

            fb, fbm = median_min_ms(fwd_bwd, args.reps)
            print(f"twin/{name} fwd+bwd: {fb:.3f} / {fbm:.3f} ms (median / min)")
        return
    for n, ci, h, w, co in SHAPES:
        x = torch.randn(n, ci, h, w, requires_grad=True)
        k = (torch.randn(co, ci, 3, 3) * 0.1).requires_grad_(True)

        def fwd():
            with torch.no_grad():
                F.conv2d(x, k, padding=1)

        def fwd_bwd():
            x.grad = None
            k.grad = None
            F.conv2d(x, k, padding=1).sum().backward()

        f, fm = median_min_ms(fwd, args.reps)
        fb, fbm = median_min_ms(fwd_bwd, args.reps)
        print(f"conv3x3 {n}x{ci}x{h}x{w} -> {co}: fwd {f:.3f} / {fm:.3f} ms, "
              f"fwd+bwd {fb:.3f} / {fbm:.3f} ms (median / min)")


if __name__ == "__main__":
    main()
