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

/// Sums f32 scalars on their device (one transfer to the host when they all share a
/// device; scalars on other devices are moved to the first one's).
pub(crate) fn sum_to_host(parts: Vec<Tensor>) -> candle::Result<f32> {
    let Some(first) = parts.first() else {
        return Ok(0.0);
    };
    let dev = first.device().clone();
    let parts = parts
        .into_iter()
        .map(|t| match t.device().same_device(&dev) {
            true => Ok(t),
            false => t.to_device(&dev),
        })
        .collect::<candle::Result<Vec<_>>>()?;
    Tensor::stack(&parts, 0)?.sum_all()?.to_scalar::<f32>()
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
