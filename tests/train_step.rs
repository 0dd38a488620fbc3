//! End-to-end parity with PyTorch through the facade: four training steps of a small
//! conv -> GN+SiLU (fused) -> strided conv -> GN+SiLU -> 1x1 head network, with keel::norm's
//! layers, keel::optim's warmup+poly schedule, global-norm clipping and SGD (momentum 0.9,
//! weight decay 1e-4), against `tests/fixtures/gen_train_step.py` (torch 2.15, float64 maths
//! on float32-rounded weights and inputs). Loss, pre-clip gradient norm and every weight are
//! compared after each step.
use std::collections::HashMap;

use candle::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, Optimizer, VarBuilder, VarMap};
use keel::kernels::{cross_entropy, CrossEntropyConfig};
use keel::norm::{conv_for, norm, Activation, Conv, Norm, NormKind};
use keel::optim::{clip_grad_norm, LrSchedule, Poly, Sgd, SgdConfig, Warmup};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/train_step.safetensors"
);

struct Net {
    c1: Conv,
    n1: Norm,
    c2: Conv,
    n2: Norm,
    head: candle_nn::Conv2d,
}

impl Net {
    fn new(vb: VarBuilder) -> candle::Result<Self> {
        let gn = |g| NormKind::GroupNorm { groups: Some(g) };
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let stride2 = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            c1: conv_for(gn(4), 3, 16, 3, pad1, vb.pp("c1"))?,
            n1: norm(gn(4), 16, vb.pp("n1"))?,
            c2: conv_for(gn(16), 16, 16, 3, stride2, vb.pp("c2"))?,
            n2: norm(gn(16), 16, vb.pp("n2"))?,
            head: candle_nn::conv2d(16, 5, 1, Default::default(), vb.pp("head"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle::Result<Tensor> {
        let y = self
            .n1
            .forward_act(&self.c1.forward(x)?, true, Activation::Silu)?;
        let y = self
            .n2
            .forward_act(&self.c2.forward(&y)?, true, Activation::Silu)?;
        self.head.forward(&y)
    }
}

/// Mean cross-entropy over the pixels whose target is not 255 (PyTorch's ignore_index).
fn cross_entropy_ignore(logits: &Tensor, target: &Tensor) -> candle::Result<Tensor> {
    let cfg = CrossEntropyConfig {
        ignore_index: Some(255),
        weight: None,
    };
    cross_entropy(logits, target, &cfg)
}

fn scalar(fx: &HashMap<String, Tensor>, key: &str) -> f64 {
    fx[key].to_vec1::<f64>().unwrap()[0]
}

#[test]
fn four_sgd_steps_match_pytorch() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let fx = candle::safetensors::load(FIXTURE, &dev)?;
    let mut vm = VarMap::new();
    let net = Net::new(VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    vm.load(FIXTURE)?; // the initial weights, under their PyTorch keys
    let names: Vec<String> = {
        let mut n: Vec<_> = vm.data().lock().unwrap().keys().cloned().collect();
        n.sort();
        n
    };
    assert_eq!(names.len(), 8, "{names:?}");
    let vars = vm.all_vars();
    let schedule = Warmup::linear(Poly::new(0.05, 10, 0.9)?, 2, 0.1)?;
    let cfg = SgdConfig {
        lr: schedule.lr(0),
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 1e-4,
        nesterov: false,
    };
    let mut opt = Sgd::new(vars.clone(), cfg)?;
    let (x, target) = (&fx["x"], &fx["target"]);
    for step in 0..4 {
        let lr = schedule.lr(step);
        let want_lr = scalar(&fx, &format!("step{step}.lr"));
        assert!(
            (lr - want_lr).abs() <= 1e-12 * want_lr,
            "step {step}: lr {lr} vs {want_lr}"
        );
        opt.set_learning_rate(lr);
        let loss = cross_entropy_ignore(&net.forward(x)?, target)?;
        let want = scalar(&fx, &format!("step{step}.loss"));
        let got = loss.to_scalar::<f32>()? as f64;
        assert!(
            (got - want).abs() <= 2e-5 * want,
            "step {step}: loss {got} vs PyTorch {want}"
        );
        let mut grads = loss.backward()?;
        let norm = clip_grad_norm(&mut grads, &vars, 1.0)?;
        let want = scalar(&fx, &format!("step{step}.grad_norm"));
        assert!(
            (norm - want).abs() <= 1e-4 * want,
            "step {step}: grad norm {norm} vs PyTorch {want}"
        );
        opt.step(&grads)?;
        let data = vm.data().lock().unwrap();
        for name in &names {
            let got = data[name].as_tensor();
            let want = &fx[&format!("step{step}.{name}")];
            let err = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(
                err <= 1e-5 * scale.max(1.0),
                "step {step}: {name} differs by {err} (scale {scale})"
            );
        }
    }
    Ok(())
}
