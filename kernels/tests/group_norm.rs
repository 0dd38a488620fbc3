//! Fused GroupNorm(+SiLU) vs the composed `*_slow` references vs PyTorch fixtures.
//!
//! The fixtures come from `kernels/tests/fixtures/gen_group_norm.py` (run it from the repo
//! root to regenerate `group_norm.safetensors`); its core is:
//! ```python
//! x, w, b = (t.to(dtype).double().requires_grad_() for t in (x, w, b))
//! y = F.group_norm(x, groups, w, b, eps)
//! if silu: y = F.silu(y)
//! (y * dy.to(dtype).double()).sum().backward()   # -> y, x.grad, w.grad, b.grad as f32
//! ```
//! Tolerance everywhere: `|got - want| <= max(rtol * |want|, atol)`; NaN must match NaN.

use anyhow::{bail, Result};
use candle::{DType, Device, Tensor, Var};
use keel_kernels::{group_norm, group_norm_silu, group_norm_silu_slow, group_norm_slow};
use keel_test_support::{assert_close, check_close, Tol};
use std::collections::BTreeSet;

type GnFn = fn(&Tensor, &Tensor, &Tensor, usize, f64) -> candle::Result<Tensor>;

fn fused(silu: bool) -> GnFn {
    if silu {
        group_norm_silu
    } else {
        group_norm
    }
}

fn slow(silu: bool) -> GnFn {
    if silu {
        group_norm_silu_slow
    } else {
        group_norm_slow
    }
}

/// y, dx, dweight, dbias of `f` with loss `sum(y * dy)`.
fn run(
    f: GnFn,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<[Tensor; 4]> {
    let (xv, wv, bv) = (
        Var::from_tensor(x)?,
        Var::from_tensor(w)?,
        Var::from_tensor(b)?,
    );
    let y = f(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), groups, eps)?;
    let loss = y
        .to_dtype(DType::F32)?
        .mul(&dy.to_dtype(DType::F32)?)?
        .sum_all()?;
    let grads = loss.backward()?;
    let grad = |v: &Var, name: &str| -> Result<Tensor> {
        match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => bail!("no gradient for {name}"),
        }
    };
    Ok([y, grad(&xv, "x")?, grad(&wv, "weight")?, grad(&bv, "bias")?])
}

/// GroupNorm composed from candle ops in f64 (x: [N, C, *]), the reference of the property test.
fn gn_f64(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f64) -> candle::Result<Tensor> {
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    let g = x.reshape((n, groups, ()))?;
    let mean = g.mean_keepdim(2)?;
    let centered = g.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(2)?;
    let xhat = centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape(x.dims())?;
    let mut shape = vec![1, c];
    shape.resize(x.rank(), 1);
    xhat.broadcast_mul(&w.reshape(shape.as_slice())?)?
        .broadcast_add(&b.reshape(shape.as_slice())?)
}

/// The worst `(|mean| + std) / std` over the groups of `x` ([N, C, *]), in f64.
fn group_condition(x: &Tensor, groups: usize) -> candle::Result<f64> {
    let g = x.to_dtype(DType::F64)?.reshape((x.dim(0)?, groups, ()))?;
    let mean = g.mean_keepdim(2)?;
    let std = g.broadcast_sub(&mean)?.sqr()?.mean_keepdim(2)?.sqrt()?;
    let cond = ((mean.abs()? + &std)? / (std + 1e-12)?)?;
    cond.flatten_all()?.max(0)?.to_scalar::<f64>()
}

/// [`gn_f64`] followed by SiLU.
fn gn_silu_f64(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    groups: usize,
    eps: f64,
) -> candle::Result<Tensor> {
    gn_f64(x, w, b, groups, eps)?.silu()
}

const OUTS: [&str; 4] = ["y", "dx", "dweight", "dbias"];

/// Deterministic pseudo-random values in `offset ± scale`.
fn data(len: usize, seed: u64, scale: f32, offset: f32) -> Vec<f32> {
    keel_test_support::xorshift_data(len, seed, scale, offset)
}

fn tensor(dims: &[usize], seed: u64, scale: f32, offset: f32) -> Result<Tensor> {
    let len = dims.iter().product();
    Ok(Tensor::from_vec(
        data(len, seed, scale, offset),
        dims,
        &Device::Cpu,
    )?)
}

#[test]
fn fused_and_slow_match_pytorch_fixtures() -> Result<()> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/group_norm.safetensors"
    );
    let fx = candle::safetensors::load(path, &Device::Cpu)?;
    let get = |k: &str| -> Result<&Tensor> {
        match fx.get(k) {
            Some(t) => Ok(t),
            None => bail!("fixture {k} missing"),
        }
    };
    let cases: BTreeSet<&str> = fx.keys().filter_map(|k| k.strip_suffix(".x")).collect();
    assert!(cases.len() >= 8, "fixture cases: {cases:?}");
    let mut report = Vec::new();
    for case in cases {
        let groups = get(&format!("{case}.groups"))?.to_scalar::<i64>()? as usize;
        let eps = get(&format!("{case}.eps"))?.to_scalar::<f64>()?;
        for (dname, dtype) in [
            ("f32", DType::F32),
            ("f16", DType::F16),
            ("bf16", DType::BF16),
        ] {
            let inp =
                |k: &str| -> Result<Tensor> { Ok(get(&format!("{case}.{k}"))?.to_dtype(dtype)?) };
            let (x, w, b, dy) = (inp("x")?, inp("weight")?, inp("bias")?, inp("dy")?);
            for (act, silu) in [("gn", false), ("gns", true)] {
                let fused_out = run(fused(silu), &x, &w, &b, &dy, groups, eps)?;
                let slow_out = run(slow(silu), &x, &w, &b, &dy, groups, eps)?;
                // Tol::for_dtype: f32 1e-4/1e-4, f16 4e-3/4e-3, bf16 2e-2/2e-2.
                let base = Tol::for_dtype(dtype);
                for (k, (f, s)) in OUTS.iter().zip(fused_out.iter().zip(&slow_out)) {
                    let want = get(&format!("{case}.{dname}.{act}.{k}"))?;
                    // dweight/dbias sum over N*HW terms: scale atol with the magnitude.
                    let tol = if k.starts_with('d') {
                        base.scale_atol(4.0)
                    } else {
                        base
                    };
                    let what = format!("{case} {dname} {act} {k}");
                    let ef = assert_close(&format!("fused vs torch: {what}"), f, want, tol);
                    // The composed reference sums in f32 without a shift, so a mean of 1e3
                    // costs it ~1e-3 absolute; the fused kernel does not have that loss.
                    let slow_tol = if case == "large_mean" {
                        tol.with_atol(tol.atol.max(5e-3))
                    } else {
                        tol
                    };
                    let es = assert_close(&format!("slow vs torch: {what}"), s, want, slow_tol);
                    report.push(format!("{what}: fused {ef:.2e} slow {es:.2e}"));
                }
            }
        }
    }
    println!("max abs error vs PyTorch float64:\n{}", report.join("\n"));
    Ok(())
}

/// Awkward shapes: C not a multiple of 32, H*W = 1, rank 2 and 3, odd sizes, large mean,
/// and a (1, 4, 96, 96) single group that the CPU kernel splits across threads.
const SHAPES: [(&[usize], usize, f32, f32); 9] = [
    (&[2, 6, 5, 3], 3, 1.0, 0.0),
    (&[1, 48, 7, 5], 6, 2.0, 0.5),
    (&[3, 10, 1, 1], 5, 1.0, 0.0),
    (&[5, 12], 4, 1.0, 0.0),
    (&[2, 9, 11], 3, 1.0, -2.0),
    (&[2, 8, 6, 6], 8, 1.0, 0.0),
    (&[2, 16, 9, 7], 4, 1.0, 1e3),
    (&[1, 4, 96, 96], 1, 1.0, 0.0),
    (&[1, 40, 3, 3, 3], 5, 3.0, 0.0),
];

#[test]
fn fused_matches_slow_on_awkward_shapes() -> Result<()> {
    for (i, &(dims, groups, scale, offset)) in SHAPES.iter().enumerate() {
        let c = dims[1];
        let seed = 10 * i as u64;
        let x = tensor(dims, seed, scale, offset)?;
        let w = tensor(&[c], seed + 1, 0.5, 1.0)?;
        let b = tensor(&[c], seed + 2, 0.5, 0.0)?;
        let dy = tensor(dims, seed + 3, 1.0, 0.0)?;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            if offset.abs() >= 1e3 && dtype != DType::F32 {
                // f16/bf16 cannot hold std-1 data at 1e3 (ulp 0.5 / 4): the group becomes
                // nearly constant and the composed reference's rounded mean (sum * 1/n)
                // times rstd ~ 316 dominates. The fixture test covers this case against
                // PyTorch float64 instead.
                continue;
            }
            let (x, w, b, dy) = (
                x.to_dtype(dtype)?,
                w.to_dtype(dtype)?,
                b.to_dtype(dtype)?,
                dy.to_dtype(dtype)?,
            );
            for silu in [false, true] {
                let f = run(fused(silu), &x, &w, &b, &dy, groups, 1e-5)?;
                let s = run(slow(silu), &x, &w, &b, &dy, groups, 1e-5)?;
                let mut base = Tol::for_dtype(dtype);
                if offset.abs() >= 1e3 && dtype == DType::F32 {
                    base.atol = 5e-3; // the composed reference's unshifted f32 sums, see above
                }
                for (k, (f, s)) in OUTS.iter().zip(f.iter().zip(&s)) {
                    assert_eq!(f.dtype(), dtype, "{k} dtype");
                    let tol = if k.starts_with('d') {
                        base.scale_atol(4.0)
                    } else {
                        base
                    };
                    assert_close(
                        &format!("{dims:?} g={groups} {dtype:?} silu={silu} {k}"),
                        f,
                        s,
                        tol,
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn constant_input_uses_rstd_of_eps() -> Result<()> {
    // var = 0 -> rstd = 1/sqrt(eps): y = bias and dx = rstd * (w*dy - mean_group(w*dy)).
    let eps = 1e-2;
    let x = Tensor::full(3.0f32, (1, 2, 2, 2), &Device::Cpu)?;
    let w = Tensor::new(&[2f32, -1.0], &Device::Cpu)?;
    let b = Tensor::new(&[0.5f32, 0.25], &Device::Cpu)?;
    let dy = tensor(&[1, 2, 2, 2], 7, 1.0, 0.0)?;
    let [y, dx, _, _] = run(group_norm, &x, &w, &b, &dy, 1, eps)?;
    let want_y = b.reshape((1, 2, 1, 1))?.broadcast_as((1, 2, 2, 2))?;
    assert_close("constant y", &y, &want_y, Tol::new(0.0, 1e-6));
    let wdy = dy.broadcast_mul(&w.reshape((1, 2, 1, 1))?)?;
    let want_dx = (wdy.broadcast_sub(&wdy.mean_all()?)? * (1.0 / eps.sqrt()))?;
    assert_close("constant dx", &dx, &want_dx, Tol::new(1e-5, 1e-5));
    Ok(())
}

#[test]
fn nan_propagates_to_its_group_only() -> Result<()> {
    let mut v = data(2 * 4 * 3, 3, 1.0, 0.0);
    v[1] = f32::NAN; // sample 0, channel 0 -> group 0 of sample 0
    let x = Tensor::from_vec(v, (2, 4, 3), &Device::Cpu)?;
    let w = Tensor::ones(4, DType::F32, &Device::Cpu)?;
    let b = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
    let dy = tensor(&[2, 4, 3], 4, 1.0, 0.0)?;
    for silu in [false, true] {
        let [y, dx, dw, _] = run(fused(silu), &x, &w, &b, &dy, 2, 1e-5)?;
        for (name, t) in [("y", &y), ("dx", &dx)] {
            let t = t.to_vec3::<f32>()?;
            for (n, sample) in t.iter().enumerate() {
                for (c, row) in sample.iter().enumerate() {
                    let in_nan_group = n == 0 && c < 2;
                    for &e in row {
                        assert_eq!(
                            e.is_nan(),
                            in_nan_group,
                            "{name} silu={silu} n={n} c={c}: {e}"
                        );
                    }
                }
            }
        }
        let dw = dw.to_vec1::<f32>()?;
        assert!(
            dw[0].is_nan() && dw[1].is_nan() && dw[2].is_finite() && dw[3].is_finite(),
            "{dw:?}"
        );
    }
    Ok(())
}

#[test]
fn non_contiguous_input_is_made_contiguous() -> Result<()> {
    let base = tensor(&[2, 5, 6, 3], 5, 1.0, 0.0)?; // (N, H, C, W) -> transpose to (N, C, H, W)
    let x = base.transpose(1, 2)?;
    assert!(!x.is_contiguous());
    let w = tensor(&[6], 6, 0.5, 1.0)?;
    let b = tensor(&[6], 7, 0.5, 0.0)?;
    let dy = tensor(&[2, 6, 5, 3], 8, 1.0, 0.0)?;
    let got = run(group_norm_silu, &x, &w, &b, &dy, 3, 1e-5)?;
    let want = run(group_norm_silu, &x.contiguous()?, &w, &b, &dy, 3, 1e-5)?;
    for (k, (g, w)) in OUTS.iter().zip(got.iter().zip(&want)) {
        assert_close(k, g, w, Tol::EXACT);
    }
    Ok(())
}

#[test]
fn empty_batch_gives_empty_output() -> Result<()> {
    let x = Tensor::zeros((0, 4, 3), DType::F32, &Device::Cpu)?;
    let w = Tensor::ones(4, DType::F32, &Device::Cpu)?;
    let b = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
    let [y, dx, dw, db] = run(group_norm_silu, &x, &w, &b, &x, 2, 1e-5)?;
    assert_eq!(y.dims(), &[0, 4, 3]);
    assert_eq!(dx.dims(), &[0, 4, 3]);
    assert_eq!(dw.to_vec1::<f32>()?, vec![0.0; 4]);
    assert_eq!(db.to_vec1::<f32>()?, vec![0.0; 4]);
    Ok(())
}

fn err_msg(r: candle::Result<Tensor>) -> String {
    match r {
        Ok(t) => format!("unexpected Ok with shape {:?}", t.dims()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_inputs_are_errors_with_a_fix() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 48, 3, 3), DType::F32, &dev)?;
    let w = Tensor::ones(48, DType::F32, &dev)?;
    let b = Tensor::zeros(48, DType::F32, &dev)?;
    for f in [
        group_norm,
        group_norm_silu,
        group_norm_slow,
        group_norm_silu_slow,
    ] {
        let m = err_msg(f(&x, &w, &b, 5, 1e-5));
        assert!(
            m.contains("num_groups (5) must divide num_channels (48)")
                && m.contains("num_groups = 24"),
            "{m}"
        );
        let m = err_msg(f(&x, &w, &b, 0, 1e-5));
        assert!(m.contains("num_groups (0)"), "{m}");
        let w40 = Tensor::ones(40, DType::F32, &dev)?;
        let m = err_msg(f(&x, &w40, &b, 6, 1e-5));
        assert!(
            m.contains("weight must have shape (48,)") && m.contains("[40]"),
            "{m}"
        );
        let m = err_msg(f(&x, &w, &w40, 6, 1e-5));
        assert!(m.contains("bias must have shape (48,)"), "{m}");
        let m = err_msg(f(&x, &w.to_dtype(DType::F16)?, &b, 6, 1e-5));
        assert!(
            m.contains("weight dtype F16 must match x dtype F32") && m.contains("to_dtype"),
            "{m}"
        );
        for eps in [-1e-5, f64::NAN, f64::INFINITY] {
            let m = err_msg(f(&x, &w, &b, 6, eps));
            assert!(m.contains("eps must be finite and >= 0"), "{m}");
        }
        let x64 = x.to_dtype(DType::F64)?;
        let m = err_msg(f(
            &x64,
            &w.to_dtype(DType::F64)?,
            &b.to_dtype(DType::F64)?,
            6,
            1e-5,
        ));
        assert!(
            m.contains("unsupported dtype F64") && m.contains("f32, f16, bf16"),
            "{m}"
        );
        let m = err_msg(f(&w, &w, &b, 6, 1e-5));
        assert!(m.contains("rank >= 2"), "{m}");
    }
    Ok(())
}

/// conv -> GN+SiLU -> conv: every parameter's gradient through the fused op equals the
/// composed path's.
#[test]
fn gradients_flow_through_a_conv_gn_silu_conv_model() -> Result<()> {
    let x = tensor(&[2, 3, 9, 7], 1, 1.0, 0.0)?;
    let k1 = Var::from_tensor(&tensor(&[12, 3, 3, 3], 2, 0.3, 0.0)?)?;
    let gw = Var::from_tensor(&tensor(&[12], 3, 0.5, 1.0)?)?;
    let gb = Var::from_tensor(&tensor(&[12], 4, 0.5, 0.0)?)?;
    let k2 = Var::from_tensor(&tensor(&[5, 12, 3, 3], 5, 0.3, 0.0)?)?;
    let target = tensor(&[2, 5, 9, 7], 6, 1.0, 0.0)?;
    let grads = |f: GnFn| -> Result<Vec<Tensor>> {
        let h = x.conv2d(k1.as_tensor(), 1, 1, 1, 1)?;
        let h = f(&h, gw.as_tensor(), gb.as_tensor(), 4, 1e-5)?;
        let out = h.conv2d(k2.as_tensor(), 1, 1, 1, 1)?;
        let loss = (out - &target)?.sqr()?.mean_all()?;
        let g = loss.backward()?;
        [&k1, &gw, &gb, &k2]
            .iter()
            .map(|v| match g.get(v.as_tensor()) {
                Some(t) => Ok(t.clone()),
                None => bail!("missing gradient"),
            })
            .collect()
    };
    let f = grads(group_norm_silu)?;
    let s = grads(group_norm_silu_slow)?;
    for (name, (f, s)) in ["conv1.weight", "gn.weight", "gn.bias", "conv2.weight"]
        .iter()
        .zip(f.iter().zip(&s))
    {
        let scale = s.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(scale > 0.0, "{name}: zero gradient");
        assert_close(
            name,
            f,
            s,
            Tol::new(1e-4, 1e-5).scale_atol(scale.max(1.0) as f64),
        );
    }
    Ok(())
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn fused_equals_slow(
            n in 1usize..4,
            groups in 1usize..6,
            cpg in 1usize..5,
            spatial in proptest::collection::vec(1usize..8, 0..3),
            silu in any::<bool>(),
            seed in 0u64..1000,
            offset in prop_oneof![Just(0f32), -10f32..10f32],
        ) {
            let mut dims = vec![n, groups * cpg];
            dims.extend(&spatial);
            let c = dims[1];
            let r = (|| -> Result<()> {
                let x = tensor(&dims, seed, 2.0, offset)?;
                let w = tensor(&[c], seed + 1, 1.0, 0.5)?;
                let b = tensor(&[c], seed + 2, 1.0, 0.0)?;
                let dy = tensor(&dims, seed + 3, 1.0, 0.0)?;
                let f = run(fused(silu), &x, &w, &b, &dy, groups, 1e-5)?;
                // The reference is composed in f64: the f32 `*_slow` twin loses the digits
                // that a group of two values with a large offset needs (the fused kernel
                // accumulates in f64), which made this property fail on such draws.
                let f64s = |t: &Tensor| t.to_dtype(DType::F64);
                let reference: GnFn = if silu { gn_silu_f64 } else { gn_f64 };
                // f32 cancellation in x - mean costs ~|mean| / std of the group in relative
                // accuracy (a group of two close values at offset 10 is ill-conditioned):
                // the tolerance grows with that condition number, never below 1e-3 / 1e-4.
                let cond = group_condition(&x, groups)?;
                let c = (cond / 8.0).max(1.0);
                let tol = Tol::new(1e-3 * c, 1e-4 * c);
                let s = run(reference, &f64s(&x)?, &f64s(&w)?, &f64s(&b)?, &f64s(&dy)?, groups, 1e-5)?;
                for (k, (f, s)) in OUTS.iter().zip(f.iter().zip(&s)) {
                    check_close(&format!("{dims:?} g={groups} silu={silu} {k} cond={cond:.1}"), f, s, tol)?;
                }
                Ok(())
            })();
            prop_assert!(r.is_ok(), "{:?}", r.err());
        }
    }
}
