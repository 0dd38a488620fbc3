//! Gradient clipping with PyTorch semantics: `torch.nn.utils.clip_grad_norm_` (ONE
//! global L2 norm over all parameters, Pascanu et al. 2013) and `clip_grad_value_`.
//!
//! burn clips each tensor by its own norm; keel does not, so recipes carry over.

use candle::backprop::GradStore;
use candle::{DType, Tensor, Var};

/// Clips the gradients of `vars` in `grads` to a global L2 norm of at most `max_norm`,
/// like `torch.nn.utils.clip_grad_norm_`, and returns the norm before clipping.
///
/// The norm is computed in f32 whatever the gradient dtype, over all the vars' gradients
/// together (vars without a gradient are ignored). When `max_norm / (norm + 1e-6) < 1`
/// every gradient is multiplied by that coefficient (computed in f32 as torch does).
///
/// A non-finite norm (an inf or NaN gradient) leaves the gradients untouched and is
/// returned as is, so the caller can skip the step. (torch would multiply the gradients
/// by the NaN or zero coefficient.) Errors when `max_norm` is not finite and positive.
///
/// ```
/// use candle::{Device, Tensor, Var};
/// use keel_optim::clip_grad_norm;
/// let w = Var::new(&[1f32, 2.0], &Device::Cpu)?;
/// let b = Var::new(&[0f32], &Device::Cpu)?;
/// let loss = (w.as_tensor().sum_all()? * 3.0)?.add(&(b.as_tensor().sum_all()? * 4.0)?)?;
/// let mut grads = loss.backward()?; // grads: [3, 3] and [4], global norm sqrt(34)
/// let norm = clip_grad_norm(&mut grads, &[w.clone(), b.clone()], 1.0)?;
/// assert!((norm - 34f64.sqrt()).abs() < 1e-5);
/// let gw = grads.get(&w).unwrap().to_vec1::<f32>()?;
/// assert!((gw[0] as f64 - 3.0 / 34f64.sqrt()).abs() < 1e-5);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> candle::Result<f64> {
    if !max_norm.is_finite() || max_norm <= 0.0 {
        candle::bail!("clip_grad_norm: max_norm ({max_norm}) must be finite and positive; recipes use 1.0 to 35.0")
    }
    let mut sums = Vec::with_capacity(vars.len());
    for var in vars {
        if let Some(g) = grads.get(var) {
            sums.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
        }
    }
    if sums.is_empty() {
        return Ok(0.0);
    }
    let total = sum_to_host(sums)?.sqrt();
    if !total.is_finite() {
        return Ok(total as f64);
    }
    // torch: clip_coef = max_norm / (total + 1e-6) in f32, i.e. reciprocal then multiply.
    let coef = (1.0f32 / (total + 1e-6f32)) * max_norm as f32;
    if coef < 1.0 {
        for var in vars {
            if let Some(g) = grads.get(var) {
                let clipped = g.affine(coef as f64, 0.0)?;
                grads.insert(var.as_tensor(), clipped);
            }
        }
    }
    Ok(total as f64)
}

/// [`clip_grad_norm`] without a host read, for a step that must not wait for the device:
/// returns the global L2 norm as an f32 scalar tensor on the gradients' device (`None` when
/// no var has a gradient) and, with `max_norm`, scales every gradient by
/// `min(1, max_norm / (norm + 1e-6))` computed on the device. `None` for `max_norm`
/// measures only.
///
/// Values: the norm and the coefficient are bit for bit those of [`clip_grad_norm`] (the
/// same f32 sum of the same per-tensor sums of squares, the same f32 reciprocal and
/// product), so clipped gradients are equal; a gradient of `-0.0` may come back `+0.0`
/// from [`clip_grad_norm`] (its `affine` adds 0) and `-0.0` from here. A non-finite norm
/// follows PyTorch's `clip_grad_norm_` here (not the host version, which leaves the
/// gradients untouched): an infinite norm gives the coefficient 0, a NaN norm makes every
/// gradient NaN. Callers skip such a step (keel-train's windowed step replaces its
/// gradients by zeros on the device).
///
/// Kernels: a square and a sum per gradient, one stack, one sum and a square root (candle
/// has no fused multi-tensor reduction; a fused CUDA kernel is not written), then four on
/// the scalar and one product per gradient when clipping.
///
/// ```
/// use candle::{Device, Var};
/// use keel_optim::{clip_grad_norm, clip_grad_norm_device, host_read};
/// let w = Var::new(&[1f32, 2.0], &Device::Cpu)?;
/// let b = Var::new(&[0f32], &Device::Cpu)?;
/// let loss = (w.as_tensor().sum_all()? * 3.0)?.add(&(b.as_tensor().sum_all()? * 4.0)?)?;
/// let (mut host, mut dev) = (loss.backward()?, loss.backward()?);
/// let vars = [w.clone(), b.clone()];
/// let before = host_read::count();
/// let norm = clip_grad_norm_device(&mut dev, &vars, Some(1.0))?.unwrap();
/// assert_eq!(host_read::count(), before); // nothing was read
/// let host_norm = clip_grad_norm(&mut host, &vars, 1.0)?;
/// assert_eq!(norm.to_scalar::<f32>()? as f64, host_norm);
/// assert_eq!(dev.get(&w).unwrap().to_vec1::<f32>()?, host.get(&w).unwrap().to_vec1::<f32>()?);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn clip_grad_norm_device(
    grads: &mut GradStore,
    vars: &[Var],
    max_norm: Option<f64>,
) -> candle::Result<Option<Tensor>> {
    if let Some(m) = max_norm.filter(|m| !m.is_finite() || *m <= 0.0) {
        candle::bail!("clip_grad_norm_device: max_norm ({m}) must be finite and positive; recipes use 1.0 to 35.0, or None to measure only")
    }
    let mut sums = Vec::with_capacity(vars.len());
    for var in vars {
        if let Some(g) = grads.get(var) {
            sums.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
        }
    }
    let Some(total) = stacked_sum(sums)? else {
        return Ok(None);
    };
    let norm = total.sqrt()?;
    let Some(max_norm) = max_norm else {
        return Ok(Some(norm));
    };
    // torch: clip_coef = max_norm / (total + 1e-6), clamped to 1, all in f32 on the device.
    let one = Tensor::ones((), DType::F32, norm.device())?;
    let coef = norm
        .affine(1.0, 1e-6)?
        .recip()?
        .affine(max_norm, 0.0)?
        .minimum(&one)?;
    for var in vars {
        if let Some(g) = grads.get(var) {
            let clipped = g.broadcast_mul(&coef.to_dtype(g.dtype())?)?;
            grads.insert(var.as_tensor(), clipped);
        }
    }
    Ok(Some(norm))
}

/// The sum of f32 scalars on the first one's device (scalars on other devices are moved
/// there); `None` for no scalars.
pub(crate) fn stacked_sum(parts: Vec<Tensor>) -> candle::Result<Option<Tensor>> {
    let Some(first) = parts.first() else {
        return Ok(None);
    };
    let dev = first.device().clone();
    let parts = parts
        .into_iter()
        .map(|t| match t.device().same_device(&dev) {
            true => Ok(t),
            false => t.to_device(&dev),
        })
        .collect::<candle::Result<Vec<_>>>()?;
    Ok(Some(Tensor::stack(&parts, 0)?.sum_all()?))
}

/// Sums f32 scalars on their device (one transfer to the host when they all share a
/// device; scalars on other devices are moved to the first one's).
pub(crate) fn sum_to_host(parts: Vec<Tensor>) -> candle::Result<f32> {
    match stacked_sum(parts)? {
        Some(t) => {
            crate::host_read::note();
            t.to_scalar::<f32>()
        }
        None => Ok(0.0),
    }
}

/// Clamps every gradient of `vars` in `grads` to `[-clip_value, clip_value]`, like
/// `torch.nn.utils.clip_grad_value_`. Errors when `clip_value` is not finite and positive.
///
/// ```
/// use candle::{Device, Var};
/// use keel_optim::clip_grad_value;
/// let w = Var::new(&[1f32, 2.0], &Device::Cpu)?;
/// let loss = (w.as_tensor() * 5.0)?.sum_all()?;
/// let mut grads = loss.backward()?;
/// clip_grad_value(&mut grads, std::slice::from_ref(&w), 0.5)?;
/// assert_eq!(grads.get(&w).unwrap().to_vec1::<f32>()?, vec![0.5, 0.5]);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn clip_grad_value(grads: &mut GradStore, vars: &[Var], clip_value: f64) -> candle::Result<()> {
    if !clip_value.is_finite() || clip_value <= 0.0 {
        candle::bail!(
            "clip_grad_value: clip_value ({clip_value}) must be finite and positive; try 1.0"
        )
    }
    for var in vars {
        if let Some(g) = grads.get(var) {
            let clipped = g.clamp(-clip_value, clip_value)?;
            grads.insert(var.as_tensor(), clipped);
        }
    }
    Ok(())
}
