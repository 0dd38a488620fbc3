//! The one-pass CPU updates (`keel_optim::fused`) against the candle-op form of the same
//! rule: equal bits, parameters and state, after every step, for every option of SGD
//! (momentum, dampening, Nesterov, weight decay) and AdamW (weight decay on/off), with two
//! parameter groups (LR multiplier, weight-decay override) and awkward shapes; the fast
//! path must actually run (its counter), and f64 parameters keep the candle form.
use anyhow::Result;
use candle::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use keel_optim::{AdamW, AdamWConfig, Grouped, ParamGroup, Sgd, SgdConfig, StateDict, UpdateRule};
use keel_test_support::xorshift_data;

/// The last one is over `PAR_MIN` (65536) values, so its update runs in rayon chunks (a
/// ragged last one included) when the pool has more than one thread.
const SHAPES: [&[usize]; 5] = [&[3, 5, 2, 2], &[7], &[1], &[4, 9], &[3, 43691]];

fn params(dtype: DType, seed: u64) -> Result<Vec<Var>> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n = s.iter().product();
            let v = xorshift_data(n, seed + i as u64, 2.0, -1.0);
            Ok(Var::from_tensor(
                &Tensor::from_vec(v, *s, &Device::Cpu)?.to_dtype(dtype)?,
            )?)
        })
        .collect()
}

fn groups(vars: &[Var]) -> Vec<ParamGroup> {
    vec![
        ParamGroup::new(vars[..2].to_vec()).with_lr_mult(0.5),
        ParamGroup::new(vars[2..].to_vec()).with_weight_decay(0.0),
    ]
}

/// A loss whose gradient for each var is a fixed random tensor of step `step`.
fn loss(vars: &[Var], step: u64) -> Result<Tensor> {
    let mut total = Tensor::zeros((), vars[0].dtype(), &Device::Cpu)?;
    for (i, v) in vars.iter().enumerate() {
        let n = v.elem_count();
        let c = xorshift_data(n, 100 * step + i as u64 + 7, 4.0, -2.0);
        let c = Tensor::from_vec(c, v.shape(), &Device::Cpu)?.to_dtype(v.dtype())?;
        total = (total + (v.as_tensor() * c)?.sum_all()?)?;
    }
    Ok(total)
}

fn bits(t: &Tensor) -> Result<Vec<u64>> {
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(v.into_iter().map(f64::to_bits).collect())
}

/// Runs 6 steps of `rule` with the fast path on and off and compares everything after each
/// step. Returns the fused optimizer's count of one-pass updates.
fn compare<R: UpdateRule>(rule: R, dtype: DType) -> Result<u64> {
    let (a, b) = (params(dtype, 1)?, params(dtype, 1)?);
    let mut fused = Grouped::with_groups(groups(&a), rule.clone())?;
    let mut plain = Grouped::with_groups(groups(&b), rule.clone())?;
    fused.set_fused(true); // whatever KEEL_OPTIM_FUSED says
    plain.set_fused(false);
    for step in 0..6 {
        fused.backward_step(&loss(&a, step)?)?;
        plain.backward_step(&loss(&b, step)?)?;
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(bits(x)?, bits(y)?, "{rule:?}: param {i} after step {step}");
        }
        let (sa, sb) = (fused.state_dict()?, plain.state_dict()?);
        assert_eq!(sa.len(), sb.len());
        for (k, t) in &sa {
            assert_eq!(bits(t)?, bits(&sb[k])?, "{rule:?}: {k} after step {step}");
        }
    }
    assert_eq!(plain.fused_updates(), 0);
    Ok(fused.fused_updates())
}

#[test]
fn sgd_one_pass_equals_the_candle_form_bit_for_bit() -> Result<()> {
    let base = SgdConfig {
        lr: 0.1,
        ..Default::default()
    };
    let cases = [
        (
            SgdConfig {
                momentum: 0.0,
                weight_decay: 0.0,
                ..base
            },
            30,
        ),
        (
            SgdConfig {
                momentum: 0.0,
                weight_decay: 1e-2,
                ..base
            },
            30,
        ),
        (
            SgdConfig {
                momentum: 0.9,
                weight_decay: 5e-4,
                ..base
            },
            25,
        ),
        (
            SgdConfig {
                momentum: 0.8,
                dampening: 0.3,
                weight_decay: 1e-3,
                ..base
            },
            25,
        ),
        (
            SgdConfig {
                momentum: 0.9,
                nesterov: true,
                weight_decay: 1e-4,
                ..base
            },
            25,
        ),
    ];
    for (cfg, want) in cases {
        // 5 params x 6 steps; with momentum the first step builds the buffers the slow way
        assert_eq!(compare(cfg, DType::F32)?, want, "{cfg:?}");
    }
    Ok(())
}

#[test]
fn adamw_one_pass_equals_the_candle_form_bit_for_bit() -> Result<()> {
    for wd in [0.0, 0.05] {
        let cfg = AdamWConfig {
            lr: 1e-2,
            weight_decay: wd,
            ..Default::default()
        };
        assert_eq!(compare(cfg, DType::F32)?, 25, "{cfg:?}");
        let cfg = AdamWConfig {
            beta1: 0.8,
            beta2: 0.99,
            eps: 1e-6,
            ..cfg
        };
        assert_eq!(compare(cfg, DType::F32)?, 25, "{cfg:?}");
    }
    Ok(())
}

/// The chunked update on a pool of 3 threads (whatever this machine has) and on one.
#[test]
fn chunked_updates_equal_the_candle_form_on_any_pool() -> Result<()> {
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        pool.install(|| -> Result<()> {
            let sgd = SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 1e-4,
                ..Default::default()
            };
            assert_eq!(compare(sgd, DType::F32)?, 25, "{threads} threads");
            let adamw = AdamWConfig {
                lr: 1e-2,
                weight_decay: 0.05,
                ..Default::default()
            };
            assert_eq!(compare(adamw, DType::F32)?, 25, "{threads} threads");
            Ok(())
        })?;
    }
    Ok(())
}

/// A gradient that shares the parameter's buffer (built by hand) takes the candle form,
/// with the candle form's result, instead of failing the in-place op.
#[test]
fn a_gradient_sharing_the_parameters_buffer_takes_the_candle_form() -> Result<()> {
    let sgd = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    };
    let run = |fused: bool| -> Result<Vec<u64>> {
        let w = Var::from_tensor(&Tensor::new(&[1f32, -2.0, 3.0], &Device::Cpu)?)?;
        let mut opt = Grouped::with_groups(vec![ParamGroup::new(vec![w.clone()])], sgd)?;
        opt.set_fused(fused);
        for _ in 0..3 {
            let mut g = w.as_tensor().sum_all()?.backward()?;
            g.insert(&w, w.as_tensor().clone());
            opt.step(&g)?;
        }
        assert_eq!(opt.fused_updates(), 0);
        bits(w.as_tensor())
    };
    assert_eq!(run(true)?, run(false)?);
    Ok(())
}

#[test]
fn f64_parameters_keep_the_candle_form() -> Result<()> {
    let sgd = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    };
    assert_eq!(compare(sgd, DType::F64)?, 0);
    assert_eq!(compare(AdamWConfig::default(), DType::F64)?, 0);
    Ok(())
}

/// The fast path is the default of `Sgd::new` / `AdamW::new` too.
#[test]
fn the_optimizers_take_the_one_pass_form_by_default() -> Result<()> {
    let w = params(DType::F32, 3)?;
    let mut sgd = Sgd::new(
        w.clone(),
        SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            ..Default::default()
        },
    )?;
    let mut adamw = AdamW::new(w.clone(), AdamWConfig::default())?;
    for step in 0..2 {
        sgd.backward_step(&loss(&w, step)?)?;
        adamw.backward_step(&loss(&w, step)?)?;
    }
    assert_eq!((sgd.fused_updates(), adamw.fused_updates()), (5, 5));
    Ok(())
}
