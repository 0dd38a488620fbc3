//! f16 training with f32 master weights and the GradScaler: a small conv net tracks the
//! f32 loss curve, and a deliberately huge init scale backs off instead of producing NaN
//! weights. Data and weights come from a fixed LCG, so the runs are deterministic.
mod common;

use anyhow::Result;
use candle::{DType, Device, Module, Tensor, Var};
use candle_nn::{Conv2dConfig, Optimizer, VarBuilder, VarMap};
use keel_optim::mixed::cast_var_builder;
use keel_optim::{GradScaler, GradScalerConfig, Sgd, SgdConfig};
use keel_test_support::{check_close, Tol};

struct Lcg(u64);

impl Lcg {
    /// Uniform in [-1, 1).
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn tensor(&mut self, dims: &[usize], scale: f32) -> Result<Tensor> {
        let n = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.next() * scale).collect();
        Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
    }
}

const N: usize = 32;

/// 32 images 1x8x8; label 1 when the image sum is positive.
fn data() -> Result<(Tensor, Tensor)> {
    let mut r = Lcg(7);
    let x = r.tensor(&[N, 1, 8, 8], 1.0)?;
    let y = x.sum((1, 2, 3))?.gt(0f64)?.to_dtype(DType::U32)?;
    Ok((x, y))
}

/// A VarMap holding the initial f32 master weights (PyTorch-style uniform fan-in init).
fn init_varmap() -> Result<VarMap> {
    let mut r = Lcg(42);
    let vm = VarMap::new();
    let shapes: [(&str, &[usize], usize); 6] = [
        ("c1.weight", &[8, 1, 3, 3], 9),
        ("c1.bias", &[8], 9),
        ("c2.weight", &[8, 8, 3, 3], 72),
        ("c2.bias", &[8], 72),
        ("fc.weight", &[2, 8], 8),
        ("fc.bias", &[2], 8),
    ];
    let mut data = vm.data().lock().unwrap();
    for (name, dims, fan_in) in shapes {
        let t = r.tensor(dims, 1.0 / (fan_in as f32).sqrt())?;
        data.insert(name.to_string(), Var::from_tensor(&t)?);
    }
    drop(data);
    Ok(vm)
}

/// conv3x3(1->8) - relu - conv3x3/2(8->8) - relu - global mean - linear(8->2); the loss
/// (cross-entropy) in f32 whatever the dtype of `vb`.
fn loss(vb: VarBuilder, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let c1 = candle_nn::conv2d(
        1,
        8,
        3,
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
        vb.pp("c1"),
    )?;
    let c2 = candle_nn::conv2d(
        8,
        8,
        3,
        Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        },
        vb.pp("c2"),
    )?;
    let fc = candle_nn::linear(8, 2, vb.pp("fc"))?;
    let h = c2.forward(&c1.forward(x)?.relu()?)?.relu()?.mean((2, 3))?;
    let logits = fc.forward(&h)?.to_dtype(DType::F32)?;
    Ok(candle_nn::loss::cross_entropy(&logits, y)?)
}

const SGD: SgdConfig = SgdConfig {
    lr: 0.2,
    momentum: 0.9,
    dampening: 0.0,
    weight_decay: 0.0,
    nesterov: false,
};

fn train_f32(steps: usize) -> Result<Vec<f32>> {
    let (x, y) = data()?;
    let vm = init_varmap()?;
    let mut opt = Sgd::new(vm.all_vars(), SGD)?;
    let mut curve = Vec::new();
    for _ in 0..steps {
        let l = loss(
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
            &x,
            &y,
        )?;
        curve.push(l.to_scalar::<f32>()?);
        opt.backward_step(&l)?;
    }
    Ok(curve)
}

struct F16Run {
    curve: Vec<f32>,
    scales: Vec<f64>,
    stepped: Vec<bool>,
}

fn train_f16(steps: usize, cfg: GradScalerConfig, check_skips: bool) -> Result<F16Run> {
    let (x, y) = data()?;
    let x16 = x.to_dtype(DType::F16)?;
    let vm = init_varmap()?;
    let vars = vm.all_vars();
    let mut opt = Sgd::new(vars.clone(), SGD)?;
    let mut scaler = GradScaler::new(cfg)?;
    let mut run = F16Run {
        curve: vec![],
        scales: vec![],
        stepped: vec![],
    };
    for step in 0..steps {
        let l = loss(cast_var_builder(&vm, DType::F16, &Device::Cpu), &x16, &y)?;
        run.curve.push(l.to_scalar::<f32>()?);
        let mut grads = scaler.scale(&l)?.backward()?;
        let before: Vec<Vec<f64>> = vars
            .iter()
            .map(|v| common::values(v.as_tensor()))
            .collect::<Result<_>>()?;
        let stepped = scaler.step(&mut opt, &mut grads, &vars)?;
        scaler.update(!stepped);
        for (v, b) in vars.iter().zip(&before) {
            let now = common::values(v.as_tensor())?;
            assert!(
                now.iter().all(|x| x.is_finite()),
                "step {step}: non-finite master weight"
            );
            if check_skips && !stepped {
                assert_eq!(&now, b, "step {step}: a skipped step moved the weights");
            }
        }
        run.scales.push(scaler.current_scale());
        run.stepped.push(stepped);
    }
    Ok(run)
}

#[test]
fn f16_with_scaler_tracks_the_f32_loss_curve() -> Result<()> {
    let steps = 40;
    let f32_curve = train_f32(steps)?;
    let cfg = GradScalerConfig {
        init_scale: 1024.0,
        ..Default::default()
    };
    let run = train_f16(steps, cfg, false)?;
    assert!(
        run.stepped.iter().all(|&s| s),
        "an in-range scale overflowed: {:?}",
        run.stepped
    );
    let (first, last) = (f32_curve[0], f32_curve[steps - 1]);
    assert!(
        last < 0.5 * first,
        "the f32 run does not learn: {first} -> {last}"
    );
    let got: Vec<f64> = run.curve.iter().map(|&x| x as f64).collect();
    let want: Vec<f64> = f32_curve.iter().map(|&x| x as f64).collect();
    let c = check_close("f16 loss curve", &got, &want, Tol::new(0.05, 0.02));
    if let Ok(c) = &c {
        println!(
            "f16 vs f32 loss curve over {steps} steps: max abs {:e}, max rel {:e}",
            c.max_abs, c.max_rel
        );
    }
    println!(
        "f32 {first} -> {last}; f16 {} -> {}",
        run.curve[0],
        run.curve[steps - 1]
    );
    c?;
    Ok(())
}

#[test]
fn huge_init_scale_backs_off_instead_of_nan() -> Result<()> {
    let steps = 30;
    let cfg = GradScalerConfig {
        init_scale: 2f64.powi(32),
        ..Default::default()
    };
    let run = train_f16(steps, cfg, true)?;
    let skipped = run.stepped.iter().filter(|&&s| !s).count();
    println!("skipped {skipped} of {steps}; scales {:?}", run.scales);
    assert!(!run.stepped[0], "2^32 must overflow f16 on the first step");
    assert!(skipped >= 5, "only {skipped} skips from 2^32");
    assert!(skipped <= 20, "the scale never recovered: {:?}", run.scales);
    // Each skip halves the scale; clean steps keep it (growth_interval 2000).
    assert_eq!(run.scales[steps - 1], 2f64.powi(32 - skipped as i32));
    let (first, last) = (run.curve[0], run.curve[steps - 1]);
    assert!(
        last < first,
        "no progress after backing off: {first} -> {last}"
    );
    Ok(())
}
