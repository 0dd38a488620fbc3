//! Box area, IoU and GIoU matrices vs torchvision (values and gradients), plus errors.
//!
//! Fixtures: `tests/fixtures/gen_det_ops.py`, whose core is
//! ```python
//! x, y = a.to(dtype).double().requires_grad_(), b.to(dtype).double().requires_grad_()
//! m = torchvision.ops.box_iou(x, y)            # or generalized_box_iou; box_area(x)
//! (m * dmat).sum().backward()                   # -> m, x.grad, y.grad as f32
//! ```
//! Tolerance: `|got - want| <= max(rtol * |want|, atol)`; NaN matches only NaN.

mod common;

use anyhow::Result;
use candle::{DType, Device, Tensor, Var};
use common::Fixtures;
use keel_det::boxes::{box_area, box_iou, generalized_box_iou};
use keel_test_support::{assert_close, Tol};

type MatFn = fn(&Tensor, &Tensor) -> candle::Result<Tensor>;

const CASES: [&str; 3] = ["grad", "degenerate", "empty"];
const OPS: [(&str, MatFn); 2] = [("iou", box_iou), ("giou", generalized_box_iou)];

#[test]
fn matrices_and_gradients_match_torchvision_in_f32_and_f16() -> Result<()> {
    let fx = Fixtures::load()?;
    for case in CASES {
        let p = format!("box.{case}");
        let (a, b) = (fx.get(&format!("{p}.a"))?, fx.get(&format!("{p}.b"))?);
        let dmat = fx.get(&format!("{p}.dmat"))?;
        // f32 values differ from the float64 reference by rounding; f16 inputs are exactly
        // the rounded inputs of the reference, computed in f32.
        for (dn, dtype) in [("f32", DType::F32), ("f16", DType::F16)] {
            let tol = Tol::new(1e-5, 1e-6);
            let (x, y) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
            let area = box_area(&x)?;
            assert_eq!(area.dtype(), DType::F32, "f16/bf16/f32 compute in f32");
            fx.check(&area, &format!("{p}.{dn}.area_a"), tol)?;
            for (name, f) in OPS {
                let (vx, vy) = (Var::from_tensor(&x)?, Var::from_tensor(&y)?);
                let m = f(vx.as_tensor(), vy.as_tensor())?;
                fx.check(&m, &format!("{p}.{dn}.{name}"), tol)?;
                if case != "grad" {
                    continue; // NaN matrices (degenerate) and empty ones have no gradients
                }
                let grads = m.mul(&dmat)?.sum_all()?.backward()?;
                let (ga, gb) = (grads.get(&vx).unwrap(), grads.get(&vy).unwrap());
                assert_eq!(ga.dtype(), dtype, "gradient in the input dtype");
                let gtol = if dtype == DType::F16 {
                    Tol::F16
                } else {
                    Tol::F32
                };
                fx.check(ga, &format!("{p}.{dn}.{name}.da"), gtol)?;
                fx.check(gb, &format!("{p}.{dn}.{name}.db"), gtol)?;
            }
        }
    }
    Ok(())
}

#[test]
fn f64_boxes_stay_f64_and_bf16_compute_in_f32() -> Result<()> {
    let fx = Fixtures::load()?;
    let (a, b) = (fx.get("box.grad.a")?, fx.get("box.grad.b")?);
    let want = fx.get("box.grad.f32.giou")?;
    let got = generalized_box_iou(&a.to_dtype(DType::F64)?, &b.to_dtype(DType::F64)?)?;
    assert_eq!(got.dtype(), DType::F64);
    assert_close("giou f64", &got, &want, Tol::new(1e-6, 1e-7));
    let got = box_iou(&a.to_dtype(DType::BF16)?, &b.to_dtype(DType::BF16)?)?;
    assert_eq!(got.dtype(), DType::F32);
    // bf16 rounds coordinates up to ~20 by 0.06: a loose check that it is the same matrix.
    assert_close(
        "iou bf16",
        &got,
        &fx.get("box.grad.f32.iou")?,
        Tol::new(5e-2, 3e-2),
    );
    Ok(())
}

#[test]
fn touching_boxes_get_no_gradient_like_pytorch_clamp() -> Result<()> {
    // a = [0,0,2,2], b = [2,0,4,2]: intersection width exactly 0, height 2. PyTorch's
    // clamp(min=0) has gradient 0 at 0 (checked with torch 2.15: a.grad == 0), so the IoU,
    // 0, has a zero gradient; a relu-style clamp would give d iou / d a.x2 = 2 / 8.
    let dev = Device::Cpu;
    let a = Var::new(&[[0f32, 0., 2., 2.]], &dev)?;
    let b = Tensor::new(&[[2f32, 0., 4., 2.]], &dev)?;
    for (name, f) in OPS {
        let m = f(a.as_tensor(), &b)?;
        let g = m.sum_all()?.backward()?.get(&a).unwrap().to_vec2::<f32>()?;
        let want = if name == "iou" {
            [0f32; 4]
        } else {
            giou_touching_grad()
        };
        assert_close(
            &format!("d {name} / d a"),
            &g[0],
            &want,
            Tol::new(1e-6, 1e-7),
        );
    }
    Ok(())
}

/// d GIoU / d a for the touching pair, from torch 2.15 (`a.grad` of
/// `generalized_box_iou(a, b).sum()`): GIoU = iou - (E - U) / E with the enclosing area
/// E = 8 fixed by b's x2 and U = 8; only a.x2 moves U (by h = 2): -(-2) / 8 = 0.25.
fn giou_touching_grad() -> [f32; 4] {
    [0.0, 0.0, 0.25, 0.0]
}

#[test]
fn empty_results_are_plain_tensors_that_read_back_and_reduce() -> Result<()> {
    // candle panics in to_vec2 / sum_all on narrowed views of empty tensors; the results
    // must not be such views.
    let dev = Device::Cpu;
    let e = Tensor::zeros((0, 4), DType::F32, &dev)?;
    let b = Tensor::ones((2, 4), DType::F32, &dev)?;
    for (name, f) in OPS {
        for (x, y, dims) in [(&e, &b, [0, 2]), (&b, &e, [2, 0]), (&e, &e, [0, 0])] {
            let m = f(x, y)?;
            assert_eq!(m.dims(), dims, "{name}");
            assert_eq!(m.to_vec2::<f32>()?.len(), dims[0], "{name}");
            assert_eq!(m.sum_all()?.to_scalar::<f32>()?, 0.0, "{name}");
        }
    }
    assert_eq!(box_area(&e)?.to_vec1::<f32>()?, Vec::<f32>::new());
    assert_eq!(box_area(&e)?.sum_all()?.to_scalar::<f32>()?, 0.0);
    Ok(())
}

#[test]
fn bad_shapes_dtypes_and_devices_are_errors_that_name_the_op() -> Result<()> {
    let dev = Device::Cpu;
    let good = Tensor::zeros((3, 4), DType::F32, &dev)?;
    let cases: Vec<(Tensor, &str)> = vec![
        (
            Tensor::zeros((3, 5), DType::F32, &dev)?,
            "must have shape (N, 4)",
        ),
        (
            Tensor::zeros(12, DType::F32, &dev)?,
            "must have shape (N, 4)",
        ),
        (
            Tensor::zeros((3, 4), DType::U32, &dev)?,
            "must be a float tensor",
        ),
    ];
    for (bad, msg) in cases {
        for (name, f) in OPS {
            let err = f(&good, &bad).unwrap_err().to_string();
            assert!(err.contains(msg) && err.contains("boxes2"), "{name}: {err}");
            let err = f(&bad, &good).unwrap_err().to_string();
            assert!(err.contains(msg) && err.contains("boxes1"), "{name}: {err}");
        }
        let err = box_area(&bad).unwrap_err().to_string();
        assert!(err.starts_with("box_area:") && err.contains(msg), "{err}");
    }
    Ok(())
}
