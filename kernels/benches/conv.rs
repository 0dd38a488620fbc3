//! keel's conv2d vs candle 0.11.1's conv2d on CPU, f32, 3x3 padding 1, at the CPU shapes of
//! ../shared/GPU.md: forward, and forward+backward (gradients of input and weight), side by
//! side in one run.
//!
//! Then every distinct convolution of seg_train's network at the PyTorch twin's widths
//! (width 64, fpn 128, batch 4, 128x128 input), forward+backward, keel only (candle would take
//! minutes); the `twin` groups.
//!
//! `cargo bench -p keel-kernels --bench conv` (PyTorch's numbers for the same shapes:
//! `python3 kernels/benches/bench_torch_conv_cpu.py`, and `--twin-layers` for the layers;
//! only the layers: `cargo bench -p keel-kernels --bench conv -- twin`).

use candle::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use keel_kernels::{conv2d, Conv2dParams};
use std::hint::black_box;
use std::time::Duration;

/// `(N, C_in, H, W, C_out)`, 3x3 kernels, padding 1.
const SHAPES: [(usize, usize, usize, usize, usize); 3] = [
    (8, 32, 64, 64, 32),
    (8, 64, 32, 32, 64),
    (2, 16, 96, 96, 16),
];

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let p = Conv2dParams {
        padding: 1,
        ..Default::default()
    };
    for (n, ci, h, w, co) in SHAPES {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, ci, h, w), &dev).unwrap()).unwrap();
        let k = Var::from_tensor(&Tensor::randn(0f32, 0.1, (co, ci, 3, 3), &dev).unwrap()).unwrap();
        let mut g = c.benchmark_group(format!("conv3x3 {n}x{ci}x{h}x{w} -> {co}"));
        g.sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(4));
        g.bench_function("keel fwd", |b| {
            b.iter(|| black_box(conv2d(&x, &k, None, &p).unwrap()))
        });
        g.bench_function("candle fwd", |b| {
            b.iter(|| black_box(x.conv2d(&k, 1, 1, 1, 1).unwrap()))
        });
        g.bench_function("keel fwd+bwd", |b| {
            b.iter(|| {
                let y = conv2d(&x, &k, None, &p).unwrap();
                black_box(y.sum_all().unwrap().backward().unwrap())
            })
        });
        g.bench_function("candle fwd+bwd", |b| {
            b.iter(|| {
                let y = x.conv2d(&k, 1, 1, 1, 1).unwrap();
                black_box(y.sum_all().unwrap().backward().unwrap())
            })
        });
        g.finish();
    }
}

/// SegNet's convolutions at the twin widths: (name, C_in, H = W of the input, C_out, kernel,
/// stride), batch 4; padding 1 for 3x3, 0 for 1x1. Keep in step with
/// `bench_torch_conv_cpu.py`'s `TWIN_LAYERS`.
const TWIN_LAYERS: [(&str, usize, usize, usize, usize, usize); 18] = [
    ("stem1", 3, 128, 32, 3, 2),
    ("stem2", 32, 64, 64, 3, 2),
    ("s0 3x3", 64, 32, 64, 3, 1),
    ("s1 down", 64, 32, 128, 3, 2),
    ("s1 skip", 64, 32, 128, 1, 2),
    ("s1 3x3", 128, 16, 128, 3, 1),
    ("s2 down", 128, 16, 256, 3, 2),
    ("s2 skip", 128, 16, 256, 1, 2),
    ("s2 3x3", 256, 8, 256, 3, 1),
    ("s3 down", 256, 8, 512, 3, 2),
    ("s3 skip", 256, 8, 512, 1, 2),
    ("s3 3x3", 512, 4, 512, 3, 1),
    ("lat0", 64, 32, 128, 1, 1),
    ("lat1", 128, 16, 128, 1, 1),
    ("lat2", 256, 8, 128, 1, 1),
    ("lat3", 512, 4, 128, 1, 1),
    ("smooth", 128, 32, 128, 3, 1),
    ("head", 128, 32, 5, 1, 1),
];

fn twin_layers(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("twin");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (name, ci, h, co, k, stride) in TWIN_LAYERS {
        let p = Conv2dParams {
            padding: k / 2,
            stride,
            ..Default::default()
        };
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, ci, h, h), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (co, ci, k, k), &dev).unwrap()).unwrap();
        g.bench_function(format!("{name} fwd+bwd"), |b| {
            b.iter(|| {
                let y = conv2d(&x, &w, None, &p).unwrap();
                black_box(y.sum_all().unwrap().backward().unwrap())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench, twin_layers);
criterion_main!(benches);
