//! LR schedules vs PyTorch's `torch.optim.lr_scheduler` (to 1e-10 relative).
//!
//! Fixture: `tests/fixtures/schedules.json`, from `tests/fixtures/gen_optim.py`:
//! ```python
//! o = opt_for(0.01); S.PolynomialLR(o, total_iters=20, power=0.9)           # 26 steps
//! o = opt_for(0.1);  S.CosineAnnealingLR(o, T_max=20, eta_min=1e-4)         # 21 steps
//! o = opt_for(0.1);  S.MultiStepLR(o, milestones=[5, 8, 12], gamma=0.1)     # 16 steps
//! o = opt_for(0.05); S.SequentialLR(o, [S.LinearLR(o, start_factor=0.001, total_iters=5),
//!                                      S.CosineAnnealingLR(o, T_max=15)], milestones=[5])
//! o = opt_for(0.05); S.SequentialLR(o, [S.ConstantLR(o, factor=0.1, total_iters=4),
//!                                      S.MultiStepLR(o, [3, 6], gamma=0.5)], milestones=[4])
//! # lrs: optimizer.param_groups[0]["lr"] before each optimizer.step(); scheduler.step()
//! ```
mod common;

use anyhow::Result;
use common::{f64s, fixture, num};
use keel_optim::{Constant, Cosine, LrSchedule, MultiStep, Poly, Warmup};
use keel_test_support::{assert_close, check_close, Tol};
use serde_json::Value;

fn check(name: &str, case: &Value, s: &dyn LrSchedule) -> Result<()> {
    let want = f64s(&case["lrs"])?;
    let got: Vec<f64> = (0..want.len()).map(|i| s.lr(i)).collect();
    // f64 maths against PyTorch's f64: Tol::F64 is rtol 1e-10, atol 1e-15.
    let c = check_close(name, &got, &want, Tol::F64)?;
    println!(
        "{name}: {} steps, max abs {:e}, max rel {:e}",
        want.len(),
        c.max_abs,
        c.max_rel
    );
    Ok(())
}

#[test]
fn poly_matches_torch() -> Result<()> {
    let f = fixture("schedules.json")?;
    let c = &f["poly"];
    let s = Poly::new(
        num(&c["base_lr"])?,
        c["total_steps"].as_u64().unwrap() as usize,
        num(&c["power"])?,
    )?;
    check("poly", c, &s)
}

#[test]
fn cosine_matches_torch() -> Result<()> {
    let f = fixture("schedules.json")?;
    let c = &f["cosine"];
    let s = Cosine::new(
        num(&c["base_lr"])?,
        c["total_steps"].as_u64().unwrap() as usize,
        num(&c["min_lr"])?,
    )?;
    check("cosine", c, &s)?;
    // Past total_steps keel stays at min_lr (torch's closed form would rise again).
    assert_eq!(s.lr(21), num(&c["min_lr"])?);
    assert_eq!(s.lr(1000), num(&c["min_lr"])?);
    Ok(())
}

#[test]
fn multistep_matches_torch() -> Result<()> {
    let f = fixture("schedules.json")?;
    let c = &f["multistep"];
    let ms = c["milestones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_u64().unwrap() as usize)
        .collect();
    let s = MultiStep::new(num(&c["base_lr"])?, ms, num(&c["gamma"])?)?;
    check("multistep", c, &s)
}

#[test]
fn linear_warmup_cosine_matches_torch_sequential_lr() -> Result<()> {
    let f = fixture("schedules.json")?;
    let c = &f["warmup_cosine"];
    let inner = Cosine::new(
        num(&c["base_lr"])?,
        c["total_steps"].as_u64().unwrap() as usize,
        num(&c["min_lr"])?,
    )?;
    let s = Warmup::linear(
        inner,
        c["warmup_steps"].as_u64().unwrap() as usize,
        num(&c["start_factor"])?,
    )?;
    check("warmup_cosine", c, &s)
}

#[test]
fn constant_warmup_multistep_matches_torch_sequential_lr() -> Result<()> {
    let f = fixture("schedules.json")?;
    let c = &f["constant_warmup_multistep"];
    let ms = c["milestones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_u64().unwrap() as usize)
        .collect();
    let inner = MultiStep::new(num(&c["base_lr"])?, ms, num(&c["gamma"])?)?;
    let s = Warmup::constant(
        inner,
        c["warmup_steps"].as_u64().unwrap() as usize,
        num(&c["factor"])?,
    )?;
    check("constant_warmup_multistep", c, &s)
}

#[test]
fn exponential_and_multiplicative_warmup_forms() -> Result<()> {
    let base = Constant::new(0.1)?;
    let e = Warmup::exponential(base, 4, 0.01)?;
    let want = [
        0.1 * 0.01,
        0.1 * 0.01f64.powf(0.75),
        0.1 * 0.1,
        0.1 * 0.01f64.powf(0.25),
        0.1,
        0.1,
    ];
    let got: Vec<f64> = (0..6).map(|i| e.lr(i)).collect();
    assert_close("exponential warmup", &got, &want, Tol::new(1e-14, 0.0));

    // detectron2: the factor multiplies the main schedule on the same step axis.
    let cos = Cosine::new(0.1, 10, 0.0)?;
    let m = Warmup::linear_multiplicative(cos, 4, 0.001)?;
    for step in 0..12 {
        let factor = if step < 4 {
            0.001 + 0.999 * step as f64 / 4.0
        } else {
            1.0
        };
        let want = cos.lr(step) * factor;
        assert_close(
            &format!("multiplicative step {step}"),
            &[m.lr(step)],
            &[want],
            Tol::new(1e-14, 1e-18),
        );
    }
    // while the sequential form delays the main schedule by the warmup
    let seq = Warmup::linear(cos, 4, 0.001)?;
    assert_eq!(seq.lr(4), 0.1);
    assert!(m.lr(4) < 0.1);
    Ok(())
}

#[test]
fn schedules_are_object_safe_and_boxed() -> Result<()> {
    let s: Box<dyn LrSchedule> = Box::new(Warmup::linear(Poly::new(0.01, 10, 0.9)?, 2, 0.5)?);
    assert_eq!(s.lr(0), 0.005);
    assert_eq!(s.lr(2), 0.01);
    assert_eq!(s.lr(12), 0.0);
    Ok(())
}
