//! Global-norm clipping vs `torch.nn.utils.clip_grad_norm_`.
//!
//! Fixture: `tests/fixtures/clip.json`, from `tests/fixtures/gen_optim.py`:
//! ```python
//! for max_norm, scale in [(1.0, 1.0), (0.5, 3.0), (100.0, 1.0)]:
//!     gs = [torch.randn(4, 3) * scale, torch.randn(4) * scale, torch.randn(2, 3, 3, 3) * scale]
//!     ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in gs]  # p.grad = g
//!     total = torch.nn.utils.clip_grad_norm_(ps, max_norm)       # -> total_norm, clipped
//! ```
mod common;

use anyhow::Result;
use candle::backprop::GradStore;
use candle::{DType, Device, Tensor, Var};
use common::{fixture, num, tensor, values};
use keel_optim::{clip_grad_norm, clip_grad_value};
use keel_test_support::{assert_close, check_close, Tol};

fn store(vars: &[Var], grads: &[Tensor]) -> GradStore {
    let mut s = GradStore::default();
    for (v, g) in vars.iter().zip(grads) {
        s.insert(v.as_tensor(), g.clone());
    }
    s
}

#[test]
fn clip_grad_norm_matches_torch() -> Result<()> {
    let cases = fixture("clip.json")?;
    for (k, case) in cases.as_array().unwrap().iter().enumerate() {
        let grads: Vec<Tensor> = case["grads"]
            .as_array()
            .unwrap()
            .iter()
            .map(tensor)
            .collect::<Result<_>>()?;
        let vars: Vec<Var> = grads
            .iter()
            .map(|g| Var::zeros(g.dims(), DType::F32, &Device::Cpu))
            .collect::<candle::Result<_>>()?;
        let mut s = store(&vars, &grads);
        let norm = clip_grad_norm(&mut s, &vars, num(&case["max_norm"])?)?;
        let want = num(&case["total_norm"])?;
        let c = check_close(
            &format!("case {k} norm"),
            &[norm],
            &[want],
            Tol::new(1e-6, 0.0),
        )?;
        let (a, r) = (c.max_abs, c.max_rel);
        println!("case {k}: norm {norm} vs torch {want}: abs {a:e} rel {r:e}");
        let (mut ga, mut gr) = (0.0f64, 0.0f64);
        for (i, (v, w)) in vars
            .iter()
            .zip(case["clipped"].as_array().unwrap())
            .enumerate()
        {
            let want = tensor(w)?;
            let got = s.get(v).unwrap();
            let c = check_close(
                &format!("case {k} grad {i}"),
                got,
                &want,
                Tol::new(1e-6, 1e-7),
            )?;
            (ga, gr) = (ga.max(c.max_abs), gr.max(c.max_rel));
        }
        println!("case {k}: clipped grads max abs {ga:e} rel {gr:e}");
    }
    Ok(())
}

#[test]
fn clip_norm_is_global_and_in_f32_for_half_grads() -> Result<()> {
    // Two tensors whose norms are 3 and 4: the global norm is 5, not per tensor.
    let dev = Device::Cpu;
    let a = Var::zeros(2, DType::F16, &dev)?;
    let b = Var::zeros(1, DType::BF16, &dev)?;
    let ga = Tensor::new(&[3f32, 0.0], &dev)?.to_dtype(DType::F16)?;
    let gb = Tensor::new(&[4f32], &dev)?.to_dtype(DType::BF16)?;
    let mut s = store(&[a.clone(), b.clone()], &[ga, gb]);
    let norm = clip_grad_norm(&mut s, &[a.clone(), b.clone()], 1.0)?;
    assert_close("norm", &[norm], &[5.0], Tol::new(1e-6, 0.0));
    let got = [values(s.get(&a).unwrap())?, values(s.get(&b).unwrap())?].concat();
    assert_close("clipped", &got, &[0.6, 0.0, 0.8], Tol::new(4e-3, 0.0));
    assert_eq!(s.get(&a).unwrap().dtype(), DType::F16);
    // f16 grads whose squares overflow f16 (300^2 > 65504) still give a finite norm.
    let big = Tensor::new(&[300f32, 400.0], &dev)?.to_dtype(DType::F16)?;
    let mut s = store(std::slice::from_ref(&a), &[big]);
    let norm = clip_grad_norm(&mut s, std::slice::from_ref(&a), 1e9)?;
    assert_close("big norm", &[norm], &[500.0], Tol::new(1e-6, 0.0));
    Ok(())
}

#[test]
fn non_finite_norm_leaves_grads_untouched() -> Result<()> {
    let dev = Device::Cpu;
    for bad in [f32::INFINITY, f32::NAN] {
        let a = Var::zeros(3, DType::F32, &dev)?;
        let b = Var::zeros(2, DType::F32, &dev)?;
        let ga = Tensor::new(&[1f32, bad, 2.0], &dev)?;
        let gb = Tensor::new(&[10f32, 20.0], &dev)?;
        let mut s = store(&[a.clone(), b.clone()], &[ga, gb]);
        let norm = clip_grad_norm(&mut s, &[a.clone(), b.clone()], 1.0)?;
        assert!(!norm.is_finite(), "norm {norm} for a {bad} gradient");
        assert_eq!(s.get(&b).unwrap().to_vec1::<f32>()?, vec![10.0, 20.0]);
        let ga = s.get(&a).unwrap().to_vec1::<f32>()?;
        assert_eq!((ga[0], ga[2]), (1.0, 2.0));
    }
    Ok(())
}

#[test]
fn clip_grad_value_clamps() -> Result<()> {
    let dev = Device::Cpu;
    let a = Var::zeros(4, DType::F32, &dev)?;
    let mut s = store(
        std::slice::from_ref(&a),
        &[Tensor::new(&[-3f32, -0.1, 0.2, 7.0], &dev)?],
    );
    clip_grad_value(&mut s, std::slice::from_ref(&a), 0.5)?;
    assert_eq!(
        s.get(&a).unwrap().to_vec1::<f32>()?,
        vec![-0.5, -0.1, 0.2, 0.5]
    );
    Ok(())
}
