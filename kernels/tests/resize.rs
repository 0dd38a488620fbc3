//! Fused resize ops vs the composed `*_slow` twins vs PyTorch fixtures, plus errors.
//!
//! The fixtures come from `kernels/tests/fixtures/gen_resize.py` (run it from the repo root
//! to regenerate `resize.safetensors`); its core is:
//! ```python
//! xr = x.to(dtype).to(ref).requires_grad_(True)     # ref: f64 bilinear, f32 nearest
//! y = F.interpolate(xr, size=size, mode=mode, align_corners=False if bilinear)
//! (y * dy.to(dtype).to(ref)).sum().backward()       # -> y, xr.grad as f32
//! ```
//! Tolerance everywhere: `|got - want| <= max(rtol * |want|, atol)`.

use anyhow::{bail, Result};
use candle::{DType, Device, Tensor, Var};
use keel_kernels::{resize_bilinear, resize_bilinear_slow, resize_nearest, resize_nearest_slow};
use keel_test_support::{assert_close, Tol};
use proptest::prelude::*;
use std::collections::HashMap;

type ResizeFn = fn(&Tensor, (usize, usize)) -> candle::Result<Tensor>;

/// y and dx of `f` with loss `sum(y * dy)`.
fn run(f: ResizeFn, x: &Tensor, size: (usize, usize), dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let v = Var::from_tensor(x)?;
    let y = f(v.as_tensor(), size)?;
    let grads = (&y * dy)?.sum_all()?.backward()?;
    let Some(g) = grads.get(&v) else {
        bail!("no gradient for x")
    };
    Ok((y, g.clone()))
}

const FUSED: [(&str, ResizeFn, ResizeFn); 2] = [
    ("nearest", resize_nearest, resize_nearest_slow),
    ("bilinear", resize_bilinear, resize_bilinear_slow),
];

#[test]
fn fused_and_slow_match_pytorch_in_f32_f16_bf16() -> Result<()> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/resize.safetensors"
    );
    let fx: HashMap<String, Tensor> = candle::safetensors::load(path, &Device::Cpu)?;
    let mut cases: Vec<&str> = fx.keys().filter_map(|k| k.strip_suffix(".size")).collect();
    cases.sort();
    assert_eq!(cases.len(), 8, "fixture cases: {cases:?}");
    for case in cases {
        let get = |k: &str| fx[&format!("{case}.{k}")].clone();
        let s = get("size").to_vec1::<i64>()?;
        let size = (s[0] as usize, s[1] as usize);
        for (mode, fused, slow) in FUSED {
            for (dn, dtype, rtol, atol) in [
                ("f32", DType::F32, 1e-5, 1e-5),
                ("f16", DType::F16, 2e-3, 2e-3),
                ("bf16", DType::BF16, 1.6e-2, 1.6e-2),
            ] {
                let (x, dy) = (get("x").to_dtype(dtype)?, get("dy").to_dtype(dtype)?);
                let (want_y, want_dx) = (
                    get(&format!("{mode}.{dn}.y")),
                    get(&format!("{mode}.{dn}.dx")),
                );
                for (name, f) in [("fused", fused), ("slow", slow)] {
                    let (y, dx) = run(f, &x, size, &dy)?;
                    assert_eq!(y.dtype(), dtype);
                    let what = format!("{case} {mode} {dn} {name}");
                    // Nearest copies values: exact in every dtype.
                    let (yr, ya) = if mode == "nearest" {
                        (0.0, 0.0)
                    } else {
                        (rtol, atol)
                    };
                    assert_close(&format!("{what} y"), &y, &want_y, Tol::new(yr, ya));
                    assert_close(&format!("{what} dx"), &dx, &want_dx, Tol::new(rtol, atol));
                }
            }
        }
    }
    Ok(())
}

/// The example's original bilinear form (f64 taps, two matmuls): the fused op stays within
/// f32 rounding of it.
fn matmul_bilinear(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let matrix = |out: usize, inp: usize| -> Result<Tensor> {
        let mut m = vec![0f32; out * inp];
        let scale = inp as f64 / out as f64;
        for d in 0..out {
            let src = ((d as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(inp - 1);
            let i1 = (i0 + 1).min(inp - 1);
            let l1 = (src - i0 as f64) as f32;
            m[d * inp + i0] += 1.0 - l1;
            m[d * inp + i1] += l1;
        }
        Ok(Tensor::from_vec(m, (out, inp), x.device())?)
    };
    let y = x.reshape((n * c * h, w))?.matmul(&matrix(ow, w)?.t()?)?;
    let y = matrix(oh, h)?
        .broadcast_left(n * c)?
        .matmul(&y.reshape((n * c, h, ow))?)?;
    Ok(y.reshape((n, c, oh, ow))?)
}

#[test]
fn bilinear_is_within_f32_rounding_of_the_examples_matmul_form() -> Result<()> {
    for (shape, size) in [
        ((2, 5, 8, 8), (32, 32)),
        ((1, 21, 16, 16), (64, 64)),
        ((1, 3, 7, 9), (30, 31)),
        ((2, 2, 11, 6), (4, 5)),
    ] {
        let x = Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?;
        let a = resize_bilinear(&x, size)?;
        let b = matmul_bilinear(&x, size.0, size.1)?;
        // f32 taps vs f64 taps: the weights differ by ~1e-7 per unit of source index.
        assert_close(
            &format!("{shape:?} -> {size:?}"),
            &a,
            &b,
            Tol::new(1e-5, 5e-6),
        );
    }
    Ok(())
}

#[test]
fn backward_is_the_adjoint_and_double_backward_is_the_forward_resize() -> Result<()> {
    // <resize(v), dy> = <v, dx> for the autograd dx of sum(resize(x) * dy).
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 2, 3, 5), &dev)?;
    let dy = Tensor::randn(0f32, 1.0, (1, 2, 7, 4), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (1, 2, 3, 5), &dev)?;
    for (mode, fused, _) in FUSED {
        let (_, dx) = run(fused, &x, (7, 4), &dy)?;
        let lhs = (fused(&v, (7, 4))? * &dy)?.sum_all()?.to_scalar::<f32>()?;
        let rhs = (&v * &dx)?.sum_all()?.to_scalar::<f32>()?;
        assert!(
            (lhs - rhs).abs() <= 1e-5 * lhs.abs().max(1.0),
            "{mode}: {lhs} vs {rhs}"
        );
    }
    // candle detaches gradients unless CANDLE_GRAD_DO_NOT_DETACH is set (read once per
    // thread): in a fresh thread, d/d(dy) of <dx, v> must be resize(v).
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    std::thread::spawn(move || -> Result<()> {
        let x = Var::from_tensor(&x)?;
        let dy = Var::from_tensor(&dy)?;
        for (mode, fused, _) in FUSED {
            let y = fused(x.as_tensor(), (7, 4))?;
            let g = (&y * dy.as_tensor())?.sum_all()?.backward()?;
            let dx = g.get(&x).unwrap().clone();
            let g2 = (dx * &v)?.sum_all()?.backward()?;
            let Some(got) = g2.get(&dy) else {
                bail!("{mode}: no second-order gradient")
            };
            assert_close(
                &format!("{mode} d/d(dy)"),
                got,
                &fused(&v, (7, 4))?,
                Tol::new(1e-6, 1e-6),
            );
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("double-backward thread panicked"))?
}

#[test]
fn errors_name_the_op_the_values_and_the_fix() -> Result<()> {
    let dev = Device::Cpu;
    let err = |r: candle::Result<Tensor>| r.err().map(|e| e.to_string()).unwrap_or_default();
    for (mode, fused, slow) in FUSED {
        for (name, f) in [("", fused), ("_slow", slow)] {
            let op = format!("resize_{mode}{name}:");
            let x = Tensor::zeros((1, 2, 3, 3), DType::F32, &dev)?;
            let e = err(f(&x, (0, 4)));
            assert!(
                e.starts_with(&op) && e.contains("output size (0, 4)"),
                "{e}"
            );
            let e = err(f(&x.flatten_to(1)?, (4, 4)));
            assert!(
                e.starts_with(&op) && e.contains("(N, C, H, W), got [2, 3, 3]"),
                "{e}"
            );
            let e = err(f(&x.to_dtype(DType::U8)?, (4, 4)));
            assert!(
                e.contains("unsupported dtype U8") && e.contains("to_dtype"),
                "{e}"
            );
            let e = err(f(&Tensor::zeros((1, 2, 0, 3), DType::F32, &dev)?, (4, 4)));
            assert!(e.contains("empty spatial size 0x3"), "{e}");
        }
    }
    Ok(())
}

#[test]
fn same_size_is_the_identity_and_non_contiguous_input_works() -> Result<()> {
    let x = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &Device::Cpu)?;
    for (_, fused, slow) in FUSED {
        let y = fused(&x, (4, 5))?;
        assert_close("identity", &y, &x, Tol::new(0.0, 0.0));
        let xt = x.transpose(2, 3)?; // (2, 3, 5, 4), strided
        assert_close(
            "strided",
            &fused(&xt, (3, 9))?,
            &slow(&xt.contiguous()?, (3, 9))?,
            Tol::new(1e-5, 1e-6),
        );
    }
    Ok(())
}

/// The composed bilinear twin computes in f32 for f16/bf16 inputs, like the fused op, and
/// rounds once: the two agree to one unit in the last place of the output dtype (the f32
/// sums may differ in their last bits, which can move a rounding). Computing in the input
/// dtype rounds the interpolation weights and the intermediate rows, and misses this by far
/// around zero crossings.
#[test]
fn bilinear_slow_computes_in_f32_for_f16_and_bf16() -> Result<()> {
    let x = Tensor::randn(0f32, 1.0, (2, 3, 13, 29), &Device::Cpu)?;
    for (dtype, ulp) in [(DType::F16, 2f64.powi(-10)), (DType::BF16, 2f64.powi(-7))] {
        let xh = x.to_dtype(dtype)?;
        for size in [(5, 11), (31, 37), (7, 29)] {
            let fused = resize_bilinear(&xh, size)?;
            let slow = resize_bilinear_slow(&xh, size)?;
            assert_eq!(slow.dtype(), dtype);
            let what = format!("{dtype:?} {size:?}");
            assert_close(&what, &slow, &fused, Tol::new(ulp, 1e-6));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn fused_matches_slow_on_random_shapes(
        n in 1usize..3, c in 1usize..5, h in 1usize..10, w in 1usize..10,
        oh in 1usize..20, ow in 1usize..20,
    ) {
        let check = || -> Result<()> {
            let dev = Device::Cpu;
            let x = (Tensor::randn(0f32, 1.0, (n, c, h, w), &dev)? * 10.0)?;
            let dy = Tensor::randn(0f32, 1.0, (n, c, oh, ow), &dev)?;
            for (mode, fused, slow) in FUSED {
                let (y, dx) = run(fused, &x, (oh, ow), &dy)?;
                let (ys, dxs) = run(slow, &x, (oh, ow), &dy)?;
                let exact = if mode == "nearest" { 0.0 } else { 1e-5 };
                assert_close(&format!("{mode} y"), &y, &ys, Tol::new(exact, exact));
                assert_close(&format!("{mode} dx"), &dx, &dxs, Tol::new(1e-5, 1e-5));
            }
            Ok(())
        };
        check().map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
}
