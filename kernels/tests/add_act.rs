//! `add_silu` / `add_relu` against candle's composition `(a + b).silu()` / `.relu()`:
//! values and both gradients, f32 (small and chunked-parallel sizes, non-contiguous
//! inputs), f16/bf16 against f32 on the rounded inputs, ReLU's gradient 0 at exactly 0
//! (PyTorch's; candle's composition gives 1 there), bad inputs.
use anyhow::Result;
use candle::{DType, Device, Tensor, Var};
use keel_kernels::{add_relu, add_silu};

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}

type Fused = fn(&Tensor, &Tensor) -> candle::Result<Tensor>;

fn composed(z: Tensor, silu: bool) -> candle::Result<Tensor> {
    if silu {
        z.silu()
    } else {
        z.relu()
    }
}

/// `[y, da, db]` of the fused op or the composition for the loss `sum(y * w)`.
fn run(
    a: &Tensor,
    b: &Tensor,
    w: &Tensor,
    fused: Option<Fused>,
    silu: bool,
) -> Result<[Tensor; 3]> {
    let (va, vb) = (Var::from_tensor(a)?, Var::from_tensor(b)?);
    let y = match fused {
        Some(f) => f(va.as_tensor(), vb.as_tensor())?,
        None => composed((va.as_tensor() + vb.as_tensor())?, silu)?,
    };
    let g = (&y * w)?.sum_all()?.backward()?;
    Ok([y, g.get(&va).unwrap().clone(), g.get(&vb).unwrap().clone()])
}

#[test]
fn matches_the_candle_composition() -> Result<()> {
    let dev = Device::Cpu;
    // 2 x 8 x 64 x 96 = 98304 values: over the 65536 from which the kernels run chunked.
    for shape in [vec![3usize, 5, 7], vec![2, 8, 64, 96], vec![1]] {
        let a = Tensor::randn(0f32, 2.0, shape.as_slice(), &dev)?;
        let b = Tensor::randn(0f32, 2.0, shape.as_slice(), &dev)?;
        let w = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)?;
        for (f, silu) in [(add_silu as Fused, true), (add_relu as Fused, false)] {
            let got = run(&a, &b, &w, Some(f), silu)?;
            let want = run(&a, &b, &w, None, silu)?;
            for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                let d = max_diff(g, r)?;
                assert!(d < 1e-5, "{shape:?} silu {silu}: output {i} differs by {d}");
            }
        }
    }
    Ok(())
}

#[test]
fn non_contiguous_and_half_inputs() -> Result<()> {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.5, (6, 9), &dev)?.t()?;
    let b = Tensor::randn(0f32, 1.5, (9, 6), &dev)?;
    let want = (&a + &b)?.silu()?;
    assert!(max_diff(&add_silu(&a, &b)?, &want)? < 1e-6);
    for (dt, tol) in [(DType::F16, 1e-2), (DType::BF16, 5e-2)] {
        let (ah, bh) = (a.to_dtype(dt)?, b.to_dtype(dt)?);
        let want = (ah.to_dtype(DType::F32)? + bh.to_dtype(DType::F32)?)?.silu()?;
        let got = add_silu(&ah, &bh)?;
        assert_eq!(got.dtype(), dt);
        let d = max_diff(&got, &want)?;
        assert!(d < tol, "{dt:?}: {d}");
    }
    Ok(())
}

#[test]
fn relu_gradient_is_zero_at_zero() -> Result<()> {
    let dev = Device::Cpu;
    let a = Var::from_tensor(&Tensor::new(&[1f32, -1.0, 0.5, -0.25], &dev)?)?;
    let b = Tensor::new(&[-1f32, 1.0, 0.5, 0.0], &dev)?;
    let y = add_relu(&a, &b)?;
    assert_eq!(y.to_vec1::<f32>()?, [0.0, 0.0, 1.0, 0.0]);
    let g = y.sum_all()?.backward()?;
    assert_eq!(g.get(&a).unwrap().to_vec1::<f32>()?, [0.0, 0.0, 1.0, 0.0]);
    Ok(())
}

#[test]
fn bad_inputs_are_clear_errors() -> Result<()> {
    let dev = Device::Cpu;
    let a = Tensor::zeros((2, 3), DType::F32, &dev)?;
    let e = add_silu(&a, &Tensor::zeros((3, 2), DType::F32, &dev)?).unwrap_err();
    assert!(
        e.to_string().contains("add_silu") && e.to_string().contains("[3, 2]"),
        "{e}"
    );
    let e = add_relu(&a, &Tensor::zeros((2, 3), DType::F16, &dev)?).unwrap_err();
    assert!(
        e.to_string().contains("add_relu") && e.to_string().contains("F16"),
        "{e}"
    );
    let e = add_silu(&a.to_dtype(DType::F64)?, &a.to_dtype(DType::F64)?).unwrap_err();
    assert!(
        e.to_string().contains("add_silu") && e.to_string().contains("F64"),
        "{e}"
    );
    Ok(())
}
