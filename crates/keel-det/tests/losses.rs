//! Sigmoid focal loss and GIoU loss vs torchvision (values and gradients), plus errors.
//!
//! Fixtures: `tests/fixtures/gen_det_ops.py`, whose core is
//! ```python
//! x = inputs.to(dtype).double().requires_grad_(True)
//! loss = sigmoid_focal_loss(x, targets, alpha, gamma, reduction)   # or generalized_box_iou_loss
//! (loss * (dnone if reduction == "none" else 0.7)).sum().backward()  # -> loss, x.grad as f32
//! ```
//! Tolerance: `|got - want| <= max(rtol * |want|, atol)`.

mod common;

use anyhow::Result;
use candle::{DType, Device, Tensor, Var};
use common::Fixtures;
use keel_det::losses::{generalized_box_iou_loss, sigmoid_focal_loss, Reduction};
use keel_test_support::{assert_close, Tol};

const ALPHAS: [f64; 3] = [0.25, -1.0, 0.5];
const GAMMAS: [f64; 2] = [0.0, 2.0];
const REDUCTIONS: [(&str, Reduction); 3] = [
    ("none", Reduction::None),
    ("mean", Reduction::Mean),
    ("sum", Reduction::Sum),
];
/// (name, dtype, loss tolerance, gradient tolerance). The f16 references are float64 on
/// the f16-rounded inputs and keel computes in f32, so f16 is as tight as f32 for the loss;
/// its gradient is rounded to f16 once.
const DTYPES: [(&str, DType, Tol, Tol); 2] = [
    (
        "f32",
        DType::F32,
        Tol::new(1e-5, 1e-6),
        Tol::new(1e-5, 1e-6),
    ),
    (
        "f16",
        DType::F16,
        Tol::new(1e-5, 1e-6),
        Tol::new(1e-3, 1e-6),
    ),
];

/// The loss and the input gradients for torchvision's upstream gradient.
fn backward(loss: &Tensor, dnone: &Tensor, vars: &[&Var]) -> Result<Vec<Tensor>> {
    let up = if loss.rank() == 0 {
        (loss * 0.7)?
    } else {
        loss.mul(&dnone.to_dtype(loss.dtype())?)?
    };
    let grads = up.sum_all()?.backward()?;
    Ok(vars.iter().map(|v| grads.get(v).unwrap().clone()).collect())
}

#[test]
fn focal_loss_matches_torchvision_for_alphas_gammas_reductions() -> Result<()> {
    let fx = Fixtures::load()?;
    let (inputs, targets) = (fx.get("focal.inputs")?, fx.get("focal.targets")?);
    let dnone = fx.get("focal.dnone")?;
    for (i, alpha) in ALPHAS.iter().enumerate() {
        for gamma in GAMMAS {
            for (rn, r) in REDUCTIONS {
                for (dn, dtype, ltol, gtol) in DTYPES {
                    let p = format!("focal.a{i}.g{gamma}.{rn}.{dn}");
                    let x = Var::from_tensor(&inputs.to_dtype(dtype)?)?;
                    let loss = sigmoid_focal_loss(x.as_tensor(), &targets, *alpha, gamma, r)?;
                    assert_eq!(loss.dtype(), DType::F32, "{p}: the loss is f32");
                    fx.check(&loss, &format!("{p}.loss"), ltol)?;
                    let g = backward(&loss, &dnone, &[&x])?;
                    assert_eq!(g[0].dtype(), dtype, "{p}: gradient in the input dtype");
                    fx.check(&g[0], &format!("{p}.dinputs"), gtol)?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn focal_loss_gradient_at_logit_zero_is_sigmoid_minus_target() -> Result<()> {
    // d BCE / dx at x = 0 is sigmoid(0) - t = 0.5 - t; a BCE written with |x| and
    // min(x, 0) through candle's ops would give -t (min halves the tie at 0, d|x| = +1).
    let x = Var::new(&[0f32, 0.], &Device::Cpu)?;
    let t = Tensor::new(&[1f32, 0.], &Device::Cpu)?;
    let loss = sigmoid_focal_loss(x.as_tensor(), &t, -1.0, 0.0, Reduction::Sum)?;
    let g = loss.backward()?.get(&x).unwrap().to_vec1::<f32>()?;
    assert_close("d bce / dx at 0", &g, &[-0.5f32, 0.5], Tol::new(1e-7, 1e-7));
    assert_close(
        "bce at 0",
        &[loss.to_scalar::<f32>()?],
        &[2.0 * std::f32::consts::LN_2],
        Tol::new(1e-6, 1e-7),
    );
    Ok(())
}

#[test]
fn giou_loss_matches_torchvision_on_disjoint_nested_identical_degenerate() -> Result<()> {
    let fx = Fixtures::load()?;
    let (b1, b2) = (fx.get("giou_loss.b1")?, fx.get("giou_loss.b2")?);
    let dnone = fx.get("giou_loss.dnone")?;
    for (rn, r) in REDUCTIONS {
        for (dn, dtype, ltol, gtol) in DTYPES {
            let p = format!("giou_loss.{rn}.{dn}");
            let x = Var::from_tensor(&b1.to_dtype(dtype)?)?;
            let y = Var::from_tensor(&b2.to_dtype(dtype)?)?;
            let loss = generalized_box_iou_loss(x.as_tensor(), y.as_tensor(), r, 1e-7)?;
            assert_eq!(loss.dtype(), DType::F32, "{p}: the loss is f32");
            fx.check(&loss, &format!("{p}.loss"), ltol)?;
            let g = backward(&loss, &dnone, &[&x, &y])?;
            fx.check(&g[0], &format!("{p}.db1"), gtol)?;
            fx.check(&g[1], &format!("{p}.db2"), gtol)?;
        }
    }
    Ok(())
}

#[test]
fn empty_inputs_reduce_like_torchvision() -> Result<()> {
    let dev = Device::Cpu;
    let e = Tensor::zeros((0, 4), DType::F32, &dev)?;
    let mean = generalized_box_iou_loss(&e, &e, Reduction::Mean, 1e-7)?.to_scalar::<f32>()?;
    assert_eq!(mean, 0.0, "torchvision: 0.0 * loss.sum() for an empty mean");
    assert_eq!(
        generalized_box_iou_loss(&e, &e, Reduction::None, 1e-7)?.dims(),
        &[0]
    );
    let x = Tensor::zeros(0, DType::F32, &dev)?;
    assert_eq!(
        sigmoid_focal_loss(&x, &x, 0.25, 2.0, Reduction::Sum)?.to_scalar::<f32>()?,
        0.0
    );
    assert!(
        sigmoid_focal_loss(&x, &x, 0.25, 2.0, Reduction::Mean)?
            .to_scalar::<f32>()?
            .is_nan(),
        "torch: mean of empty is NaN"
    );
    Ok(())
}

#[test]
fn f64_losses_stay_f64() -> Result<()> {
    let fx = Fixtures::load()?;
    let x = fx.get("focal.inputs")?.to_dtype(DType::F64)?;
    let loss = sigmoid_focal_loss(&x, &fx.get("focal.targets")?, 0.25, 2.0, Reduction::Sum)?;
    assert_eq!(loss.dtype(), DType::F64);
    assert_close(
        "focal f64",
        &loss,
        &fx.get("focal.a0.g2.sum.f32.loss")?,
        Tol::new(1e-6, 1e-7),
    );
    Ok(())
}

#[test]
fn bad_arguments_are_errors_naming_op_value_and_fix() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3), DType::F32, &dev)?;
    let r = Reduction::Mean;
    let focal = |x: &Tensor, t: &Tensor, a: f64, g: f64| {
        sigmoid_focal_loss(x, t, a, g, r).unwrap_err().to_string()
    };
    for (err, want) in [
        (focal(&x, &x, 1.5, 2.0), "alpha (1.5) must be in [0, 1]"),
        (focal(&x, &x, f64::NAN, 2.0), "alpha (NaN)"),
        (
            focal(&x, &x, 0.25, -1.0),
            "gamma (-1) must be finite and >= 0",
        ),
        (focal(&x, &x, 0.25, f64::INFINITY), "gamma (inf)"),
        (
            focal(&x, &Tensor::zeros(3, DType::F32, &dev)?, 0.25, 2.0),
            "targets shape [3] must equal inputs shape [2, 3]",
        ),
        (
            focal(&x, &x.to_dtype(DType::U8)?, 0.25, 2.0),
            "targets must be a float tensor",
        ),
    ] {
        assert!(
            err.starts_with("sigmoid_focal_loss: ") && err.contains(want),
            "{err}"
        );
    }
    let b = Tensor::zeros((2, 4), DType::F32, &dev)?;
    let giou = |a: &Tensor, b: &Tensor, eps: f64| {
        generalized_box_iou_loss(a, b, r, eps)
            .unwrap_err()
            .to_string()
    };
    for (err, want) in [
        (giou(&x, &x, 1e-7), "boxes1 must have shape (.., 4)"),
        (
            giou(&b, &Tensor::zeros((3, 4), DType::F32, &dev)?, 1e-7),
            "boxes2 shape [3, 4] must equal boxes1 shape [2, 4]",
        ),
        (giou(&b, &b, -1.0), "eps (-1) must be finite and >= 0"),
        (
            giou(&b, &b.to_dtype(DType::U32)?, 1e-7),
            "boxes2 must be a float tensor",
        ),
    ] {
        assert!(
            err.starts_with("generalized_box_iou_loss: ") && err.contains(want),
            "{err}"
        );
    }
    assert_eq!("sum".parse::<Reduction>()?, Reduction::Sum);
    assert!("avg"
        .parse::<Reduction>()
        .unwrap_err()
        .to_string()
        .contains("\"none\", \"mean\" or \"sum\""));
    Ok(())
}
