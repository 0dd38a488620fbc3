//! keel's conv2d vs candle 0.11.1's conv2d on CPU, f32, 3x3 padding 1, at the CPU shapes of
//! ../shared/GPU.md: forward, and forward+backward (gradients of input and weight), side by
//! side in one run.
//!
//! `cargo bench -p keel-kernels --bench conv` (PyTorch's numbers for the same shapes:
//! `python3 kernels/benches/bench_torch_conv_cpu.py`).

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

criterion_group!(benches, bench);
criterion_main!(benches);
