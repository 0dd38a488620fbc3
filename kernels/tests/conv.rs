//! keel's conv2d (forward, dx, dw, dbias) vs PyTorch fixtures, vs the composed reference
//! `conv2d_slow`, and vs candle's own conv where its backward works.
//!
//! The fixtures come from `kernels/tests/fixtures/gen_conv.py` (run it from the repo root
//! to regenerate `conv.safetensors`); its core is:
//! ```python
//! x64, w64, b64 = (t.double().requires_grad_(True) for t in (x, w, b))
//! y = F.conv2d(x64, w64, b64, stride, padding, dilation, groups)
//! (y * dy.double()).sum().backward()   # -> y, x.grad, w.grad, b.grad as f32
//! ```
//! Tolerance everywhere: `|got - want| <= max(rtol * |want|, atol)`.

use anyhow::{bail, Result};
use candle::{DType, Device, Tensor, Var};
use keel_kernels::{conv2d, conv2d_slow, Conv2dParams};
use keel_test_support::{assert_close, check_close, Tol};
use proptest::prelude::*;

const DEV: Device = Device::Cpu;

/// `max(1, max |t|)`: the f16/bf16 tests scale `atol` with the output's magnitude.
fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?
        .max_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        .max(1.0))
}

type ConvFn = fn(&Tensor, &Tensor, Option<&Tensor>, &Conv2dParams) -> candle::Result<Tensor>;

/// `[y, dx, dw, dbias]` of `f` with loss `sum(y * dy)`, all in f32.
fn run(
    f: ConvFn,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    p: &Conv2dParams,
) -> Result<[Tensor; 4]> {
    let (xv, wv, bv) = (
        Var::from_tensor(x)?,
        Var::from_tensor(w)?,
        Var::from_tensor(b)?,
    );
    let y = f(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()), p)?;
    let grads = (y.to_dtype(DType::F32)? * dy)?.sum_all()?.backward()?;
    let get = |v: &Var| -> Result<Tensor> {
        match grads.get(v) {
            Some(t) => Ok(t.to_dtype(DType::F32)?),
            None => bail!("missing gradient"),
        }
    };
    Ok([y.to_dtype(DType::F32)?, get(&xv)?, get(&wv)?, get(&bv)?])
}

fn randn(shape: &[usize], std: f32) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, std, shape, &DEV)?)
}

const NAMES: [&str; 4] = ["y", "dx", "dweight", "dbias"];

#[test]
fn matches_pytorch_fixtures() -> Result<()> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/conv.safetensors"
    );
    let t = candle::safetensors::load(path, &DEV)?;
    let mut cases: Vec<&str> = t.keys().filter_map(|k| k.strip_suffix(".params")).collect();
    cases.sort();
    assert!(cases.len() >= 10, "fixture cases: {cases:?}");
    for case in cases {
        let get = |s: &str| t[&format!("{case}.{s}")].clone();
        let pv = get("params").to_vec1::<i64>()?;
        let p = Conv2dParams {
            stride: pv[0] as usize,
            padding: pv[1] as usize,
            dilation: pv[2] as usize,
            groups: pv[3] as usize,
        };
        let out = run(
            conv2d,
            &get("x"),
            &get("weight"),
            &get("bias"),
            &get("dy"),
            &p,
        )?;
        let mut errs = Vec::new();
        for (name, got) in NAMES.iter().zip(&out) {
            errs.push(assert_close(
                &format!("{case} {name}"),
                got,
                &get(name),
                Tol::F32,
            ));
        }
        // Measured max abs errors (y, dx, dweight, dbias); see them with --nocapture.
        println!("{case} f32 max abs err y/dx/dw/db: {errs:?}");
        // f16 / bf16: inputs rounded, f32 accumulation, output rounded once.
        for (dt, tol) in [(DType::F16, 1e-2), (DType::BF16, 5e-2)] {
            let r = |s: &str| get(s).to_dtype(dt);
            let out = run(conv2d, &r("x")?, &r("weight")?, &r("bias")?, &get("dy"), &p)?;
            for (name, got) in NAMES.iter().zip(&out) {
                let want = get(name);
                let scale = max_abs(&want)?;
                assert_close(
                    &format!("{case} {dt:?} {name}"),
                    got,
                    &want,
                    Tol::new(tol, tol * scale),
                );
            }
        }
    }
    Ok(())
}

/// (x shape, C_out, (kh, kw), stride, padding, dilation, groups)
type Case = (
    [usize; 4],
    usize,
    (usize, usize),
    usize,
    usize,
    usize,
    usize,
);

const CASES: [Case; 15] = [
    ([2, 5, 9, 7], 6, (3, 3), 1, 1, 1, 1),
    ([2, 3, 7, 8], 4, (3, 3), 2, 1, 1, 1),
    ([2, 3, 8, 8], 4, (3, 3), 2, 1, 1, 1),
    ([1, 3, 9, 9], 5, (3, 3), 2, 0, 1, 1),
    ([3, 8, 5, 6], 7, (1, 1), 1, 0, 1, 1),
    ([2, 6, 9, 8], 5, (1, 1), 2, 0, 1, 1),
    ([2, 6, 5, 5], 5, (1, 1), 1, 1, 1, 1),
    ([1, 3, 15, 13], 8, (7, 7), 2, 2, 1, 1),
    ([1, 3, 16, 16], 8, (7, 7), 2, 3, 1, 1),
    ([2, 4, 10, 9], 6, (3, 3), 1, 2, 2, 1),
    ([2, 8, 11, 10], 6, (3, 3), 2, 0, 1, 2),
    ([2, 6, 8, 7], 6, (3, 3), 1, 1, 1, 6),
    ([1, 4, 9, 10], 8, (3, 3), 2, 1, 1, 4),
    ([9, 40, 12, 12], 24, (3, 3), 1, 1, 1, 1),
    // pointwise with >= 256 output pixels: the backward-filter copies x to a padded buffer
    ([2, 3, 20, 20], 4, (1, 1), 1, 0, 1, 1),
];

fn params(c: &Case) -> Conv2dParams {
    Conv2dParams {
        stride: c.3,
        padding: c.4,
        dilation: c.5,
        groups: c.6,
    }
}

fn inputs(c: &Case) -> Result<[Tensor; 4]> {
    let (xs, co, (kh, kw)) = (c.0, c.1, c.2);
    let p = params(c);
    let w = randn(&[co, xs[1] / p.groups, kh, kw], 0.3)?;
    let b = randn(&[co], 1.0)?;
    let x = randn(&xs, 1.0)?;
    let y = conv2d_slow(&x, &w, Some(&b), &p)?;
    let dy = randn(y.dims(), 1.0)?;
    Ok([x, w, b, dy])
}

#[test]
fn matches_composed_reference() -> Result<()> {
    for c in &CASES {
        let [x, w, b, dy] = inputs(c)?;
        let p = params(c);
        let got = run(conv2d, &x, &w, &b, &dy, &p)?;
        let want = run(conv2d_slow, &x, &w, &b, &dy, &p)?;
        for (name, (g, r)) in NAMES.iter().zip(got.iter().zip(&want)) {
            assert_close(&format!("{c:?} {name}"), g, r, Tol::F32);
        }
    }
    Ok(())
}

/// candle's own conv2d (forward and, where the remainders agree, backward) as a second
/// reference.
#[test]
fn matches_candle_conv_where_its_backward_works() -> Result<()> {
    let candle_conv: ConvFn = |x, w, b, p| {
        let y = x.conv2d(w, p.padding, p.stride, p.dilation, p.groups)?;
        y.broadcast_add(&b.unwrap().reshape((1, (), 1, 1))?)
    };
    let mut compared = 0;
    for c in &CASES {
        let [x, w, b, dy] = inputs(c)?;
        let p = params(c);
        let ours = run(conv2d, &x, &w, &b, &dy, &p)?;
        match run(candle_conv, &x, &w, &b, &dy, &p) {
            Ok(theirs) => {
                compared += 1;
                for (name, (g, r)) in NAMES.iter().zip(ours.iter().zip(&theirs)) {
                    assert_close(&format!("candle {c:?} {name}"), g, r, Tol::F32);
                }
            }
            Err(e) => {
                // Only the known candle bug: stride > 1 with unequal row/column remainders.
                let (h, wd) = (c.0[2], c.0[3]);
                let eff = |k: usize| p.dilation * (k - 1) + 1;
                let rh = (h + 2 * p.padding - eff(c.2 .0)) % p.stride;
                let rw = (wd + 2 * p.padding - eff(c.2 .1)) % p.stride;
                assert!(rh != rw, "candle failed unexpectedly on {c:?}: {e}");
                let y = conv2d(&x, &w, Some(&b), &p)?;
                let yc = candle_conv(&x, &w, Some(&b), &p)?;
                assert_close(&format!("candle fwd {c:?}"), &y, &yc, Tol::F32);
            }
        }
    }
    assert!(compared >= 10, "only {compared} cases compared with candle");
    Ok(())
}

#[test]
fn half_types_match_f32_on_rounded_inputs() -> Result<()> {
    for c in &CASES[..6] {
        let [x, w, b, dy] = inputs(c)?;
        let p = params(c);
        for (dt, tol) in [(DType::F16, 1e-2), (DType::BF16, 4e-2)] {
            let r = |t: &Tensor| t.to_dtype(dt);
            let got = run(conv2d, &r(&x)?, &r(&w)?, &r(&b)?, &dy, &p)?;
            // The reference: the same rounded inputs in f32, the output gradient too (the
            // half-precision backward receives dy rounded to `dt`; an unrounded dy made the
            // bias gradient, a sum over N*H*W terms, differ by the rounding of dy itself).
            let f = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dt)?.to_dtype(DType::F32)?) };
            let want = run(conv2d_slow, &f(&x)?, &f(&w)?, &f(&b)?, &f(&dy)?, &p)?;
            // dbias is a sum of N*H*W terms in `dt`: its rounding error scales with the sum
            // of the terms' magnitudes, not with the (cancelling) result.
            let db_mass = max_abs(&f(&dy)?.abs()?.sum((0, 2, 3))?)?;
            for (name, (g, r)) in NAMES.iter().zip(got.iter().zip(&want)) {
                let scale = match *name {
                    "dbias" => max_abs(r)?.max(db_mass),
                    _ => max_abs(r)?,
                };
                assert_close(
                    &format!("{dt:?} {c:?} {name}"),
                    g,
                    r,
                    Tol::new(tol, tol * scale),
                );
            }
        }
    }
    Ok(())
}

#[test]
fn strided_non_square_input_backpropagates() -> Result<()> {
    // 7x8 at stride 2: candle's own backward fails here; ours matches the reference.
    let x = Var::from_tensor(&randn(&[2, 3, 7, 8], 1.0)?)?;
    let w = randn(&[4, 3, 3, 3], 0.5)?;
    assert!(x
        .as_tensor()
        .conv2d(&w, 1, 2, 1, 1)?
        .sum_all()?
        .backward()
        .is_err());
    let p = Conv2dParams {
        stride: 2,
        padding: 1,
        ..Default::default()
    };
    let g = conv2d(x.as_tensor(), &w, None, &p)?
        .sqr()?
        .sum_all()?
        .backward()?;
    let r = conv2d_slow(x.as_tensor(), &w, None, &p)?
        .sqr()?
        .sum_all()?
        .backward()?;
    assert_close("dx", g.get(&x).unwrap(), r.get(&x).unwrap(), Tol::F32);
    Ok(())
}

#[test]
fn non_contiguous_inputs_and_empty_batch() -> Result<()> {
    let x = randn(&[2, 4, 6, 5], 1.0)?;
    let w = randn(&[3, 4, 3, 3], 0.3)?;
    let p = Conv2dParams {
        padding: 1,
        ..Default::default()
    };
    let xt = x.transpose(2, 3)?; // (2, 4, 5, 6), strided
    let got = conv2d(&xt, &w, None, &p)?;
    let want = conv2d_slow(&xt.contiguous()?, &w, None, &p)?;
    assert_close("transposed x", &got, &want, Tol::new(1e-5, 1e-5));
    let empty = conv2d(
        &Tensor::zeros((0, 4, 6, 5), DType::F32, &DEV)?,
        &w,
        None,
        &p,
    )?;
    assert_eq!(empty.dims(), &[0, 3, 6, 5]);
    Ok(())
}

#[test]
fn bad_configs_are_clear_errors() -> Result<()> {
    let x = randn(&[1, 6, 5, 5], 1.0)?;
    let err =
        |x: &Tensor, w: &Tensor, p: Conv2dParams| conv2d(x, w, None, &p).unwrap_err().to_string();
    let e = err(
        &x,
        &randn(&[4, 2, 3, 3], 1.0)?,
        Conv2dParams {
            groups: 4,
            ..Default::default()
        },
    );
    assert!(
        e.contains("conv2d")
            && e.contains("groups (4)")
            && e.contains("(6)")
            && e.contains("divide"),
        "{e}"
    );
    let e = err(
        &x,
        &randn(&[4, 6, 7, 7], 1.0)?,
        Conv2dParams {
            padding: 0,
            ..Default::default()
        },
    );
    assert!(
        e.contains("conv2d")
            && e.contains("kernel height 7")
            && e.contains("padded input height 5")
            && e.contains("more padding"),
        "{e}"
    );
    let e = err(
        &x,
        &randn(&[4, 6, 3, 9], 1.0)?,
        Conv2dParams {
            padding: 1,
            ..Default::default()
        },
    );
    assert!(
        e.contains("kernel width 9") && e.contains("padded input width 7"),
        "{e}"
    );
    let e = err(
        &x,
        &randn(&[4, 6, 2, 2], 1.0)?,
        Conv2dParams {
            dilation: 5,
            ..Default::default()
        },
    );
    assert!(
        e.contains("kernel height 6") && e.contains("dilation 5"),
        "{e}"
    );
    let e = err(&x, &randn(&[4, 3, 3, 3], 1.0)?, Conv2dParams::default());
    assert!(
        e.contains("6 channels") && e.contains("C_in / groups"),
        "{e}"
    );
    let e = err(
        &x,
        &randn(&[4, 6, 3, 3], 1.0)?,
        Conv2dParams {
            stride: 0,
            ..Default::default()
        },
    );
    assert!(e.contains("stride (0)"), "{e}");
    let e = err(
        &x.to_dtype(DType::F16)?,
        &randn(&[4, 6, 3, 3], 1.0)?,
        Conv2dParams::default(),
    );
    assert!(e.contains("dtype") && e.contains("to_dtype"), "{e}");
    let e = conv2d(
        &x,
        &randn(&[4, 6, 3, 3], 1.0)?,
        Some(&randn(&[5], 1.0)?),
        &Conv2dParams::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("bias") && e.contains("(4,)"), "{e}");
    let e = err(
        &randn(&[6, 5, 5], 1.0)?,
        &randn(&[4, 6, 3, 3], 1.0)?,
        Conv2dParams::default(),
    );
    assert!(e.contains("(N, C_in, H, W)"), "{e}");
    Ok(())
}

#[test]
fn layer_is_a_drop_in_for_candle_nn() -> Result<()> {
    use candle::Module;
    use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
    let cfg = Conv2dConfig {
        padding: 1,
        stride: 2,
        groups: 2,
        ..Default::default()
    };
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &DEV);
    let ours = keel_kernels::nn::conv2d(4, 6, 3, cfg, vb.pp("c"))?;
    let keys: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    let mut keys = keys;
    keys.sort();
    assert_eq!(keys, ["c.bias", "c.weight"]);
    let theirs = candle_nn::Conv2d::new(ours.weight().clone(), ours.bias().cloned(), cfg);
    let x = randn(&[2, 4, 9, 9], 1.0)?;
    assert_close("layer", &ours.forward(&x)?, &theirs.forward(&x)?, Tol::F32);
    let from: keel_kernels::nn::Conv2d = theirs.into();
    assert_close("from", &from.forward(&x)?, &ours.forward(&x)?, Tol::EXACT);
    let nb = keel_kernels::nn::conv2d_no_bias(4, 6, 3, cfg, vb.pp("d"))?;
    assert!(nb.bias().is_none());
    assert!(keel_kernels::nn::Conv2d::new(
        randn(&[6, 2, 3, 3], 1.0)?,
        Some(randn(&[5], 1.0)?),
        cfg
    )
    .is_err());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn fast_matches_reference(
        n in 1usize..3, cg in 1usize..4, og in 1usize..4, groups in 1usize..3,
        h in 1usize..10, w in 1usize..10, kh in 1usize..4, kw in 1usize..4,
        stride in 1usize..4, padding in 0usize..3, dilation in 1usize..3,
    ) {
        let p = Conv2dParams { stride, padding, dilation, groups };
        let fits = |s: usize, k: usize| s + 2 * padding > dilation * (k - 1);
        prop_assume!(fits(h, kh) && fits(w, kw));
        let x = randn(&[n, cg * groups, h, w], 1.0).unwrap();
        let wt = randn(&[og * groups, cg, kh, kw], 0.5).unwrap();
        let b = randn(&[og * groups], 1.0).unwrap();
        let y = conv2d_slow(&x, &wt, Some(&b), &p).unwrap();
        let dy = randn(y.dims(), 1.0).unwrap();
        let got = run(conv2d, &x, &wt, &b, &dy, &p).unwrap();
        let want = run(conv2d_slow, &x, &wt, &b, &dy, &p).unwrap();
        for (name, (g, r)) in NAMES.iter().zip(got.iter().zip(&want)) {
            if let Err(e) = check_close(name, g, r, Tol::F32) {
                return Err(TestCaseError::fail(format!("{p:?} x {:?}: {e}", x.dims())));
            }
        }
    }
}
