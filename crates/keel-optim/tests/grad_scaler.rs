//! GradScaler vs `torch.amp.GradScaler` driven on CPU tensors.
//!
//! Fixture: `tests/fixtures/grad_scaler.json`, from `tests/fixtures/gen_optim.py`:
//! ```python
//! scaler = torch.amp.GradScaler("cpu", init_scale, growth_factor, backoff_factor, growth_interval)
//! p = torch.nn.Parameter(p0.clone()); opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
//! for c in pattern:                    # 'c' clean, 'i' grad[2] = inf, 'n' grad[1] = nan
//!     opt.zero_grad(); scaler.scale((p * x).sum()).backward()
//!     if c == "i": p.grad[2] = math.inf
//!     elif c == "n": p.grad[1] = math.nan
//!     scaler.step(opt); scaler.update()  # record scaler.get_scale() and p
//! # cases: (1024, 2.0, 0.5, 3, "ccciccccccnicccc"), (1000, 1.5, 0.3, 2, "ccicciiccccc"),
//! #        (65536, 2.0, 0.5, 2000, "iiccccci")
//! ```
mod common;

use anyhow::Result;
use candle::{Device, Tensor, Var};
use candle_nn::Optimizer;
use common::{fixture, num, tensor, values};
use keel_optim::StateDict;
use keel_optim::{GradScaler, GradScalerConfig, Sgd, SgdConfig};
use keel_test_support::{assert_close, Tol};

#[test]
fn scale_sequence_and_params_match_torch() -> Result<()> {
    let cases = fixture("grad_scaler.json")?;
    for (k, c) in cases.as_array().unwrap().iter().enumerate() {
        let cfg = GradScalerConfig {
            init_scale: num(&c["init_scale"])?,
            growth_factor: num(&c["growth_factor"])?,
            backoff_factor: num(&c["backoff_factor"])?,
            growth_interval: c["growth_interval"].as_u64().unwrap() as usize,
        };
        let mut scaler = GradScaler::new(cfg)?;
        let x = tensor(&c["x"])?;
        let p = Var::from_tensor(&tensor(&c["p0"])?)?;
        let sgd = SgdConfig {
            lr: num(&c["lr"])?,
            momentum: num(&c["momentum"])?,
            ..Default::default()
        };
        let mut opt = Sgd::new(vec![p.clone()], sgd)?;
        let pattern = c["pattern"].as_str().unwrap();
        let want_scales = common::f64s(&c["scales"])?;
        let mut got_scales = Vec::new();
        for (i, (ch, want_p)) in pattern
            .chars()
            .zip(c["params"].as_array().unwrap())
            .enumerate()
        {
            let loss = (p.as_tensor() * &x)?.sum_all()?;
            let mut grads = scaler.scale(&loss)?.backward()?;
            let bad = match ch {
                'i' => Some((2, f32::INFINITY)),
                'n' => Some((1, f32::NAN)),
                _ => None,
            };
            if let Some((idx, val)) = bad {
                let mut g = grads.get(&p).unwrap().to_vec1::<f32>()?;
                g[idx] = val;
                grads.insert(p.as_tensor(), Tensor::new(g, &Device::Cpu)?);
            }
            let before = values(p.as_tensor())?;
            let state_before = opt.state_dict()?;
            let stepped = scaler.step(&mut opt, &mut grads, std::slice::from_ref(&p))?;
            assert_eq!(stepped, bad.is_none(), "case {k} step {i} ({ch})");
            if !stepped {
                assert_eq!(
                    values(p.as_tensor())?,
                    before,
                    "case {k} step {i}: a skipped step moved the weights"
                );
                let state_after = opt.state_dict()?;
                for (key, t) in &state_before {
                    assert_eq!(
                        values(t)?,
                        values(&state_after[key])?,
                        "case {k} step {i}: skipped step changed {key}"
                    );
                }
                assert_eq!(state_before.len(), state_after.len());
            }
            scaler.update(!stepped);
            got_scales.push(scaler.current_scale());
            assert_close(
                &format!("case {k} step {i} param"),
                p.as_tensor(),
                &tensor(want_p)?,
                Tol::new(1e-6, 1e-6),
            );
        }
        // The scale is an f32 in both: exact equality.
        assert_close(
            &format!("case {k} scales"),
            &got_scales,
            &want_scales,
            Tol::EXACT,
        );
        println!(
            "case {k}: {} scales identical to torch: {got_scales:?}",
            got_scales.len()
        );
    }
    Ok(())
}

#[test]
fn defaults_are_pytorch_defaults() -> Result<()> {
    let d = GradScalerConfig::default();
    assert_eq!(
        (
            d.init_scale,
            d.growth_factor,
            d.backoff_factor,
            d.growth_interval
        ),
        (65536.0, 2.0, 0.5, 2000)
    );
    assert_eq!(GradScaler::new(d)?.current_scale(), 65536.0);
    Ok(())
}

#[test]
fn growth_that_overflows_f32_keeps_the_scale() -> Result<()> {
    let mut s = GradScaler::new(GradScalerConfig {
        init_scale: 2f64.powi(127),
        growth_interval: 1,
        ..Default::default()
    })?;
    s.update(false);
    assert_eq!(s.current_scale(), 2f64.powi(127));
    assert_eq!(s.growth_tracker(), 0);
    Ok(())
}

#[test]
fn unscale_then_clip_then_step() -> Result<()> {
    let dev = Device::Cpu;
    let p = Var::new(&[0f32, 0.0], &dev)?;
    let mut opt = Sgd::new(
        vec![p.clone()],
        SgdConfig {
            lr: 1.0,
            ..Default::default()
        },
    )?;
    let mut scaler = GradScaler::new(GradScalerConfig {
        init_scale: 256.0,
        ..Default::default()
    })?;
    let loss = (p.as_tensor() * &Tensor::new(&[3f32, 4.0], &dev)?)?.sum_all()?;
    let mut grads = scaler.scale(&loss)?.backward()?;
    assert!(!scaler.unscale(&mut grads, std::slice::from_ref(&p))?);
    let norm = keel_optim::clip_grad_norm(&mut grads, std::slice::from_ref(&p), 1.0)?;
    assert_close("unscaled norm", &[norm], &[5.0], Tol::new(1e-6, 0.0));
    assert!(
        scaler
            .unscale(&mut grads, std::slice::from_ref(&p))
            .is_err(),
        "a second unscale must be refused"
    );
    let stepped = scaler.step(&mut opt, &mut grads, std::slice::from_ref(&p))?; // does not unscale again
    scaler.update(!stepped);
    assert_close(
        "p",
        &values(p.as_tensor())?,
        &[-0.6, -0.8],
        Tol::new(1e-5, 0.0),
    );
    Ok(())
}

#[test]
fn state_round_trip_continues_identically() -> Result<()> {
    let cfg = GradScalerConfig {
        init_scale: 1000.0,
        growth_factor: 1.5,
        backoff_factor: 0.3,
        growth_interval: 3,
    };
    let pattern = [
        false, false, true, false, false, false, false, true, false, false, false, false,
    ];
    let mut a = GradScaler::new(cfg)?;
    for &f in &pattern[..5] {
        a.update(f);
    }
    let path = common::scratch("scaler.safetensors");
    a.save(&path)?;
    let mut b = GradScaler::new(GradScalerConfig::default())?;
    b.load(&path)?;
    assert_eq!(
        (b.current_scale(), b.growth_tracker()),
        (a.current_scale(), a.growth_tracker())
    );
    for &f in &pattern[5..] {
        a.update(f);
        b.update(f);
        assert_eq!(a.current_scale(), b.current_scale());
    }
    Ok(())
}
