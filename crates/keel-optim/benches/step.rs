//! One optimizer step, the one-pass CPU form (`keel_optim::fused`) vs the candle-op form of
//! the same rule (`set_fused(false)`), on the parameters of seg_train's default model
//! (the twin at width 16, fpn 32: 76 tensors, 718,381 f32 values) and of the same model at
//! 4x the channels (`x4`, ~11.5 M values). SGD with momentum 0.9 and weight decay 1e-4
//! (seg_train's default) and AdamW with weight decay 0.05 (det_train's), two groups
//! (decay / no decay) as the trainers build them, after a first step has made the state.
//!
//! `CANDLE_NUM_THREADS` is 1 unless set, as in keel's trainers.
//!
//! `cargo bench -p keel-optim --bench step`

use candle::backprop::GradStore;
use candle::{Device, Tensor, Var};
use candle_nn::Optimizer;
use criterion::{criterion_group, criterion_main, Criterion};
use keel_optim::{AdamWConfig, Grouped, ParamGroup, SgdConfig, UpdateRule};
use std::time::Duration;

/// The shapes of seg_train's default model (its checkpoint's `model` tensors).
const TWIN: &str = "[[5],[5,32,1,1],[32],[32,16,1,1],[32],[32,32,1,1],[32],[32,64,1,1],[32],\
[32,128,1,1],[32,32,3,3],[32],[32],[16,16,3,3],[16,16,3,3],[16],[16],[16],[16],[16,16,3,3],\
[16,16,3,3],[16],[16],[16],[16],[32,16,3,3],[32,32,3,3],[32],[32],[32],[32],[32,16,1,1],[32],\
[32],[32,32,3,3],[32,32,3,3],[32],[32],[32],[32],[64,32,3,3],[64,64,3,3],[64],[64],[64],[64],\
[64,32,1,1],[64],[64],[64,64,3,3],[64,64,3,3],[64],[64],[64],[64],[128,64,3,3],[128,128,3,3],\
[128],[128],[128],[128],[128,64,1,1],[128],[128],[128,128,3,3],[128,128,3,3],[128],[128],\
[128],[128],[8,3,3,3],[8],[8],[16,8,3,3],[16],[16]]";

fn shapes(scale: usize) -> Vec<Vec<usize>> {
    let parsed: Vec<Vec<usize>> = TWIN
        .trim_matches(|c| c == '[' || c == ']')
        .split("],[")
        .map(|s| s.split(',').map(|d| d.parse().unwrap()).collect())
        .collect();
    parsed
        .into_iter()
        .map(|s| {
            // Channels scale; the input's 3 channels and the kernel sizes do not.
            let mut s = s;
            for d in s.iter_mut().take(2) {
                if *d > 5 {
                    *d *= scale;
                }
            }
            s
        })
        .collect()
}

/// The vars, the trainers' two groups, and one gradient store for them.
fn setup(scale: usize) -> (Vec<Var>, GradStore) {
    let vars: Vec<Var> = shapes(scale)
        .iter()
        .map(|s| Var::randn(0f32, 0.1, s.as_slice(), &Device::Cpu).unwrap())
        .collect();
    let mut loss = Tensor::zeros((), candle::DType::F32, &Device::Cpu).unwrap();
    for v in &vars {
        let c = Tensor::randn(0f32, 1.0, v.shape(), &Device::Cpu).unwrap();
        loss = (loss + (v.as_tensor() * c).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    (vars, grads)
}

fn optimizer<R: UpdateRule>(vars: &[Var], rule: R, fused: bool, grads: &GradStore) -> Grouped<R> {
    let (decay, no_decay): (Vec<Var>, Vec<Var>) = vars.iter().cloned().partition(|v| v.rank() > 1);
    let groups = vec![
        ParamGroup::new(decay),
        ParamGroup::new(no_decay).with_weight_decay(0.0),
    ];
    let mut opt = Grouped::with_groups(groups, rule).unwrap();
    opt.set_fused(fused);
    opt.step(grads).unwrap(); // the state exists from here on
    opt
}

fn bench(c: &mut Criterion) {
    // As keel's trainers run (keel_train::threads::candle_pool_single_thread): candle's
    // element-wise pool busy-waits, which on a loaded box times the spinning, not the ops.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let sgd = SgdConfig {
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 1e-4,
        ..Default::default()
    };
    let adamw = AdamWConfig {
        lr: 1e-4,
        weight_decay: 0.05,
        ..Default::default()
    };
    for (model, scale) in [("twin", 1), ("x4", 4)] {
        let (vars, grads) = setup(scale);
        let mut g = c.benchmark_group(format!("step/{model}"));
        g.sample_size(30).measurement_time(Duration::from_secs(3));
        for fused in [true, false] {
            let form = if fused { "one-pass" } else { "candle" };
            let mut opt = optimizer(&vars, sgd, fused, &grads);
            g.bench_function(format!("sgd/{form}"), |b| {
                b.iter(|| opt.step(&grads).unwrap())
            });
            let mut opt = optimizer(&vars, adamw, fused, &grads);
            g.bench_function(format!("adamw/{form}"), |b| {
                b.iter(|| opt.step(&grads).unwrap())
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
