//! Fused cross-entropy vs the composed `cross_entropy_slow` vs PyTorch fixtures, plus
//! errors.
//!
//! The fixtures come from `kernels/tests/fixtures/gen_cross_entropy.py` (run it from the
//! repo root to regenerate `cross_entropy.safetensors`); its core is:
//! ```python
//! x = logits.to(dtype).double().requires_grad_(True)
//! loss = F.cross_entropy(x, target, weight=w, ignore_index=ignore)   # mean reduction
//! (loss * dloss).backward()                                           # -> loss, x.grad as f32
//! ```
//! Tolerance everywhere: `|got - want| <= max(rtol * |want|, atol)`; NaN must match NaN.

use anyhow::{bail, Result};
use candle::{DType, Device, Tensor, Var};
use keel_kernels::{cross_entropy, cross_entropy_slow, CrossEntropyConfig};
use keel_test_support::{assert_close, Tol};
use proptest::prelude::*;
use std::collections::HashMap;

type CeFn = fn(&Tensor, &Tensor, &CrossEntropyConfig) -> candle::Result<Tensor>;

/// Loss and dlogits of `f` for the upstream gradient `dloss`.
fn run(
    f: CeFn,
    logits: &Tensor,
    t: &Tensor,
    cfg: &CrossEntropyConfig,
    dloss: f32,
) -> Result<(Tensor, Tensor)> {
    let x = Var::from_tensor(logits)?;
    let loss = f(x.as_tensor(), t, cfg)?;
    if loss.dtype() != DType::F32 || !loss.dims().is_empty() {
        bail!(
            "loss must be an f32 scalar, got {:?} {:?}",
            loss.dtype(),
            loss.dims()
        );
    }
    let grads = (&loss * dloss as f64)?.backward()?;
    let Some(g) = grads.get(&x) else {
        bail!("no gradient for the logits")
    };
    if g.dtype() != logits.dtype() {
        bail!(
            "gradient dtype {:?} != logits dtype {:?}",
            g.dtype(),
            logits.dtype()
        );
    }
    Ok((loss, g.clone()))
}

fn fixtures() -> Result<HashMap<String, Tensor>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/cross_entropy.safetensors"
    );
    Ok(candle::safetensors::load(path, &Device::Cpu)?)
}

/// (case, target dtype used for it)
const CASES: [(&str, DType); 8] = [
    ("c1", DType::U32),
    ("c21_odd_ignore", DType::U8),
    ("hw1", DType::I64),
    ("rank2_weighted", DType::U32),
    ("weighted_ignore", DType::U8),
    ("all_ignored", DType::U8),
    ("rank3_neg_ignore", DType::I64),
    ("large_logits", DType::U32),
];

#[test]
fn fused_and_slow_match_pytorch_in_f32_f16_bf16() -> Result<()> {
    let fx = fixtures()?;
    for (case, tdtype) in CASES {
        let get = |k: &str| fx.get(&format!("{case}.{k}")).cloned();
        let Some(logits) = get("logits") else {
            bail!("fixture {case} missing")
        };
        let t = get("target").unwrap().to_dtype(tdtype)?;
        let cfg = CrossEntropyConfig {
            ignore_index: get("ignore").map(|i| i.to_scalar::<i64>()).transpose()?,
            weight: get("weight"),
        };
        let dloss = get("dloss").unwrap().to_scalar::<f32>()?;
        for (dn, dtype, rtol, atol) in [
            ("f32", DType::F32, 1e-5, 1e-6),
            ("f16", DType::F16, 2e-3, 1e-4),
            ("bf16", DType::BF16, 1e-2, 1e-3),
        ] {
            let x = logits.to_dtype(dtype)?;
            let want_loss = get(&format!("{dn}.loss")).unwrap();
            let want_g = get(&format!("{dn}.dlogits")).unwrap();
            for (name, f) in [
                ("fused", cross_entropy as CeFn),
                ("slow", cross_entropy_slow),
            ] {
                let (loss, g) = run(f, &x, &t, &cfg, dloss)?;
                // The loss is f32 arithmetic on exactly rounded inputs in every dtype.
                assert_close(
                    &format!("{case} {dn} {name} loss"),
                    &loss,
                    &want_loss,
                    Tol::new(1e-5, 1e-6),
                );
                assert_close(
                    &format!("{case} {dn} {name} dlogits"),
                    &g,
                    &want_g,
                    Tol::new(rtol, atol),
                );
            }
        }
    }
    Ok(())
}

#[test]
fn all_ignored_is_nan_with_zero_gradient_like_pytorch() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 2, 2), &dev)?;
    let t = Tensor::full(255u8, (2, 2, 2), &dev)?;
    let cfg = CrossEntropyConfig {
        ignore_index: Some(255),
        weight: None,
    };
    for f in [cross_entropy as CeFn, cross_entropy_slow] {
        let (loss, g) = run(f, &x, &t, &cfg, 1.0)?;
        assert!(loss.to_scalar::<f32>()?.is_nan());
        assert_eq!(g.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    }
    Ok(())
}

#[test]
fn errors_name_the_op_the_values_and_the_fix() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 4), DType::F32, &dev)?;
    let ok_t = Tensor::zeros((2, 4), DType::U32, &dev)?;
    let cfg = CrossEntropyConfig::default();
    let err = |r: candle::Result<Tensor>| r.err().map(|e| e.to_string()).unwrap_or_default();
    for f in [cross_entropy as CeFn, cross_entropy_slow] {
        let mut v = vec![0u32; 8];
        v[5] = 3;
        let bad = Tensor::from_vec(v, (2, 4), &dev)?;
        let e = err(f(&x, &bad, &cfg));
        assert!(
            e.contains("target value 3 at flat position 5 is outside [0, 3)")
                && e.contains("ignore_index"),
            "{e}"
        );
        let ign = CrossEntropyConfig {
            ignore_index: Some(255),
            ..Default::default()
        };
        let e = err(f(&x, &Tensor::full(7u8, (2, 4), &dev)?, &ign));
        assert!(
            e.contains("target value 7") && e.contains("ignore_index is 255"),
            "{e}"
        );
        let e = err(f(&x, &Tensor::zeros((2, 5), DType::U32, &dev)?, &cfg));
        assert!(
            e.contains("target shape [2, 5]") && e.contains("[2, 4]"),
            "{e}"
        );
        let w = CrossEntropyConfig {
            weight: Some(Tensor::ones(4, DType::F32, &dev)?),
            ..Default::default()
        };
        let e = err(f(&x, &ok_t, &w));
        assert!(
            e.contains("weight must have shape (3,)") && e.contains("[4]"),
            "{e}"
        );
        let e = err(f(&x.to_dtype(DType::F64)?, &ok_t, &cfg));
        assert!(e.contains("unsupported logits dtype F64"), "{e}");
        let e = err(f(&x, &ok_t.to_dtype(DType::F32)?, &cfg));
        assert!(e.contains("unsupported target dtype F32"), "{e}");
        let e = err(f(&Tensor::zeros(3, DType::F32, &dev)?, &ok_t, &cfg));
        assert!(e.contains("rank >= 2"), "{e}");
    }
    // Negative i64 targets other than the ignore index are rejected too.
    let t = Tensor::new(&[[0i64, -1, 0, 0], [0, 0, 0, 0]], &dev)?;
    let e = err(cross_entropy(&x, &t, &cfg));
    assert!(e.contains("target value -1 at flat position 1"), "{e}");
    Ok(())
}

#[test]
fn non_contiguous_logits_and_targets_work() -> Result<()> {
    let dev = Device::Cpu;
    // (N, H, W, C) permuted to (N, C, H, W): a strided view.
    let x = Tensor::randn(0f32, 2.0, (2, 3, 5, 4), &dev)?.permute((0, 3, 1, 2))?;
    let t = Tensor::new(&[0u32, 1, 2, 3, 1], &dev)?
        .repeat((2, 3))?
        .reshape((2, 5, 3))?
        .transpose(1, 2)?;
    let cfg = CrossEntropyConfig::default();
    let (a, ga) = run(cross_entropy, &x, &t, &cfg, 1.0)?;
    let (b, gb) = run(cross_entropy_slow, &x, &t, &cfg, 1.0)?;
    assert_close("loss", &a, &b, Tol::new(1e-5, 1e-6));
    assert_close("dlogits", &ga, &gb, Tol::new(1e-5, 1e-6));
    Ok(())
}

fn random_case(
    n: usize,
    c: usize,
    hw: (usize, usize),
    ignore: bool,
    weighted: bool,
    seed: u64,
) -> Result<(Tensor, Tensor, CrossEntropyConfig)> {
    let dev = Device::Cpu;
    let x = (Tensor::randn(0f32, 1.0, (n, c, hw.0, hw.1), &dev)? * 3.0)?;
    // A deterministic target pattern from the seed (candle's CPU randn is not seedable).
    let len = n * hw.0 * hw.1;
    let v: Vec<u32> = (0..len as u64)
        .map(|i| {
            let h = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            let h = (h >> 17) as u32;
            if ignore && h.is_multiple_of(5) {
                255
            } else {
                h % c as u32
            }
        })
        .collect();
    let t = Tensor::from_vec(v, (n, hw.0, hw.1), &dev)?;
    let weight = if weighted {
        Some((Tensor::rand(0f32, 2.0, c, &dev)? + 0.1)?)
    } else {
        None
    };
    let cfg = CrossEntropyConfig {
        ignore_index: ignore.then_some(255),
        weight,
    };
    Ok((x, t, cfg))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn fused_matches_slow_on_random_shapes(
        n in 1usize..4, c in 1usize..24, h in 1usize..9, w in 1usize..9,
        ignore: bool, weighted: bool, seed: u64,
    ) {
        let check = || -> Result<()> {
            let (x, t, cfg) = random_case(n, c, (h, w), ignore, weighted, seed)?;
            let (a, ga) = run(cross_entropy, &x, &t, &cfg, 1.3)?;
            let (b, gb) = run(cross_entropy_slow, &x, &t, &cfg, 1.3)?;
            assert_close("loss", &a, &b, Tol::new(1e-5, 1e-6));
            assert_close("dlogits", &ga, &gb, Tol::new(1e-4, 1e-6));
 Ok(())
        };
        check().map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
}
