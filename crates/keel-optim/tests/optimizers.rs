//! 6-step SGD and AdamW trajectories vs `torch.optim.SGD` / `torch.optim.AdamW`.
//!
//! Fixture: `tests/fixtures/optimizers.json`, from `tests/fixtures/gen_optim.py`:
//! ```python
//! w, b = torch.randn(4, 3), torch.randn(4)        # init
//! opt = torch.optim.SGD([pw, pb], foreach=False, **cfg)   # or AdamW / param groups
//! for _ in range(6):
//!     pw.grad, pb.grad = torch.randn(4, 3), torch.randn(4)  # grads (fixed, recorded)
//!     opt.step()                                            # params after each step
//! # sgd_nesterov:  lr 0.1, momentum 0.9, nesterov, wd 1e-4
//! # sgd_momentum:  lr 0.1, momentum 0.9, wd 5e-4
//! # sgd_dampening: lr 0.05, momentum 0.8, dampening 0.3, wd 1e-3
//! # adamw:         lr 1e-2, betas (0.9, 0.999), eps 1e-8, wd 1e-2
//! # adamw_groups:  lr 1e-2, betas (0.8, 0.99), eps 1e-6, wd 0.1; bias group lr 0.5e-2, wd 0
//! ```
mod common;

use anyhow::Result;
use candle::backprop::GradStore;
use candle::{Device, Var};
use candle_nn::Optimizer;
use common::{fixture, num, tensor};
use keel_optim::StateDict;
use keel_optim::{AdamW, AdamWConfig, ParamGroup, Sgd, SgdConfig};
use keel_test_support::{check_close, Tol};
use serde_json::Value;

const TOL: Tol = Tol::new(1e-5, 1e-6);

/// Runs the fixture's 6 steps through `opt` and compares the params after every step.
fn run<O: Optimizer>(
    name: &str,
    case: &Value,
    make: impl FnOnce(&[Var]) -> Result<O>,
) -> Result<()> {
    let vars: Vec<Var> = case["init"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| Ok(Var::from_tensor(&tensor(t)?)?))
        .collect::<Result<_>>()?;
    let mut opt = make(&vars)?;
    let (mut ma, mut mr) = (0.0f64, 0.0f64);
    for (step, (grads, params)) in case["grads"]
        .as_array()
        .unwrap()
        .iter()
        .zip(case["params"].as_array().unwrap())
        .enumerate()
    {
        let mut store = GradStore::default();
        for (v, g) in vars.iter().zip(grads.as_array().unwrap()) {
            store.insert(v.as_tensor(), tensor(g)?);
        }
        opt.step(&store)?;
        for (i, (v, p)) in vars.iter().zip(params.as_array().unwrap()).enumerate() {
            let want = tensor(p)?;
            let c = check_close(
                &format!("{name} step {} param {i}", step + 1),
                v.as_tensor(),
                &want,
                TOL,
            )?;
            (ma, mr) = (ma.max(c.max_abs), mr.max(c.max_rel));
        }
    }
    println!("{name}: 6 steps, max abs {ma:e}, max rel {mr:e}");
    Ok(())
}

fn sgd_config(c: &Value) -> Result<SgdConfig> {
    Ok(SgdConfig {
        lr: num(&c["lr"])?,
        momentum: num(&c["momentum"])?,
        dampening: num(&c["dampening"])?,
        weight_decay: num(&c["weight_decay"])?,
        nesterov: c["nesterov"].as_bool().unwrap(),
    })
}

fn adamw_config(c: &Value) -> Result<AdamWConfig> {
    Ok(AdamWConfig {
        lr: num(&c["lr"])?,
        beta1: num(&c["beta1"])?,
        beta2: num(&c["beta2"])?,
        eps: num(&c["eps"])?,
        weight_decay: num(&c["weight_decay"])?,
    })
}

#[test]
fn sgd_nesterov_matches_torch() -> Result<()> {
    let f = fixture("optimizers.json")?;
    let c = &f["sgd_nesterov"];
    run("sgd_nesterov", c, |v| {
        Ok(Sgd::new(v.to_vec(), sgd_config(&c["config"])?)?)
    })
}

#[test]
fn sgd_momentum_weight_decay_matches_torch() -> Result<()> {
    let f = fixture("optimizers.json")?;
    let c = &f["sgd_momentum"];
    run("sgd_momentum", c, |v| {
        Ok(Sgd::new(v.to_vec(), sgd_config(&c["config"])?)?)
    })
}

#[test]
fn sgd_dampening_matches_torch() -> Result<()> {
    let f = fixture("optimizers.json")?;
    let c = &f["sgd_dampening"];
    run("sgd_dampening", c, |v| {
        Ok(Sgd::new(v.to_vec(), sgd_config(&c["config"])?)?)
    })
}

#[test]
fn adamw_matches_torch() -> Result<()> {
    let f = fixture("optimizers.json")?;
    let c = &f["adamw"];
    run("adamw", c, |v| {
        Ok(AdamW::new(v.to_vec(), adamw_config(&c["config"])?)?)
    })
}

#[test]
fn adamw_param_groups_match_torch() -> Result<()> {
    let f = fixture("optimizers.json")?;
    let c = &f["adamw_groups"];
    run("adamw_groups", c, |v| {
        let groups = vec![
            ParamGroup::new(vec![v[0].clone()]),
            ParamGroup::new(vec![v[1].clone()])
                .with_lr_mult(num(&c["bias_lr_mult"])?)
                .with_weight_decay(num(&c["bias_weight_decay"])?),
        ];
        Ok(AdamW::with_groups(groups, adamw_config(&c["config"])?)?)
    })
}

#[test]
fn defaults_are_pytorch_defaults() {
    let s = SgdConfig::default();
    assert_eq!(
        (s.lr, s.momentum, s.dampening, s.weight_decay, s.nesterov),
        (1e-3, 0.0, 0.0, 0.0, false)
    );
    let a = AdamWConfig::default();
    assert_eq!(
        (a.lr, a.beta1, a.beta2, a.eps, a.weight_decay),
        (1e-3, 0.9, 0.999, 1e-8, 1e-2)
    );
}

#[test]
fn params_without_grad_are_untouched_and_half_params_keep_f32_moments() -> Result<()> {
    let dev = Device::Cpu;
    let a = Var::new(&[1f32, 2.0], &dev)?;
    let b = Var::new(&[3f32], &dev)?;
    let h =
        Var::from_tensor(&candle::Tensor::new(&[1f32, -1.0], &dev)?.to_dtype(candle::DType::F16)?)?;
    let mut opt = AdamW::new(
        vec![a.clone(), b.clone(), h.clone()],
        AdamWConfig {
            lr: 0.1,
            ..Default::default()
        },
    )?;
    let loss =
        (a.as_tensor().sum_all()? + h.as_tensor().to_dtype(candle::DType::F32)?.sum_all()?)?;
    opt.backward_step(&loss)?;
    assert_eq!(b.to_vec1::<f32>()?, vec![3.0]);
    let st = opt.state_dict()?;
    assert!(
        !st.contains_key("state.1.step"),
        "a param without a gradient got state"
    );
    assert_eq!(st["state.2.exp_avg"].dtype(), candle::DType::F32);
    assert_eq!(h.dtype(), candle::DType::F16);
    // eps = 1e-8 is representable in the f32 moments: the f16 param moved by ~lr.
    let hv: Vec<f32> = h.as_tensor().to_dtype(candle::DType::F32)?.to_vec1()?;
    assert!(
        (hv[0] - 0.899).abs() < 2e-3 && (hv[1] + 1.099).abs() < 2e-3,
        "{hv:?}"
    );
    Ok(())
}
