//! Cross-entropy loss with `ignore_index` and class weights, with PyTorch's mean-reduction
//! semantics (`torch.nn.functional.cross_entropy(logits, target, weight, ignore_index,
//! reduction="mean")`).
//!
//! `loss = sum_i w[t_i] * (logsumexp(x_i) - x_i[t_i]) / sum_i w[t_i]` over the positions `i`
//! whose target is not `ignore_index` (`w = 1` without class weights).
//!
//! # Contract
//! - Forward: `cpu::CrossEntropyOp` is a `CustomOp2` on `(logits, target)`, logits
//!   contiguous `(N, C, *)` in f32/f16/bf16, target contiguous `(N, *)` in u8/u32/i64. It
//!   computes log-softmax and the pick in one pass per position, in `f32` (loss sums in
//!   `f64`), and returns the `f32` scalar loss (also for f16/bf16 logits: the loss of a
//!   mixed-precision step is wanted in f32). Class weights are constants (no gradient),
//!   held by the op as `f32`.
//! - Backward: `cpu::CrossEntropyBwdOp` is a `CustomOp3` on `(logits, target, dloss)` that
//!   writes `dloss * w[t_i] / sum w * (softmax(x_i) - onehot(t_i))` in one pass, with the
//!   logits' dtype; ignored positions get 0. It has no backward of its own (no double
//!   backward: `BackwardNotSupported`).
//!
//! # Devices
//! The fused op has a CPU kernel only. On other devices [`cross_entropy`] runs
//! [`cross_entropy_slow`], composed from candle's `log_softmax`, `gather`, `index_select`
//! and reductions, which candle differentiates; candle's kernels suffice there, so keel
//! ships no CUDA kernel for it.
//!
//! # Edge semantics
//! - Every target is ignored: the loss is NaN (0 / 0), as PyTorch's; the gradient is 0.
//! - Class weights whose picked sum is 0 with some position kept: loss and gradient NaN,
//!   as PyTorch's.
//! - Targets are validated before any arithmetic: a value outside `[0, C)` that is not
//!   `ignore_index` is an error naming the value and its flat position.

mod cpu;

use candle::{bail, DType, Device, Result, Tensor, D};

/// Options of [`cross_entropy`], PyTorch's `F.cross_entropy` arguments.
#[derive(Clone, Debug, Default)]
pub struct CrossEntropyConfig {
    /// Target value that contributes neither to the loss nor to the mean's denominator
    /// (PyTorch's `ignore_index`; segmentation masks usually use 255). `None` ignores
    /// nothing. Negative values only ever match i64 targets.
    pub ignore_index: Option<i64>,
    /// Per-class weights `(C,)` (PyTorch's `weight`), any float dtype, on the logits'
    /// device. The mean divides by the sum of the picked weights. Treated as a constant.
    pub weight: Option<Tensor>,
}

/// The validated geometry: `n * spatial` positions, `c` classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CeDims {
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) spatial: usize,
}

/// Checks shapes, dtypes, devices and the weight; target values are checked by the kernel
/// (CPU) or [`check_targets`] (composed path).
fn check(op: &str, logits: &Tensor, target: &Tensor, cfg: &CrossEntropyConfig) -> Result<CeDims> {
    let dtype = logits.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        bail!("{op}: unsupported logits dtype {dtype:?}; supported: f32, f16, bf16 (convert with logits.to_dtype(DType::F32))")
    }
    if !matches!(target.dtype(), DType::U8 | DType::U32 | DType::I64) {
        bail!("{op}: unsupported target dtype {:?}; supported: u8, u32, i64 (convert with target.to_dtype(DType::U32))", target.dtype())
    }
    let dims = logits.dims();
    if dims.len() < 2 {
        bail!("{op}: logits must have shape (N, C, *) with rank >= 2, got {dims:?}; add a batch dim with logits.unsqueeze(0)")
    }
    let mut want = vec![dims[0]];
    want.extend_from_slice(&dims[2..]);
    if target.dims() != want.as_slice() {
        bail!("{op}: target shape {:?} must be logits shape {dims:?} without the class dim 1, i.e. {want:?}", target.dims())
    }
    if !target.device().same_device(logits.device()) {
        bail!("{op}: target is on {:?} but logits are on {:?}; move it with target.to_device(logits.device())", target.device().location(), logits.device().location())
    }
    let c = dims[1];
    if c == 0 {
        bail!("{op}: logits have 0 classes (shape {dims:?}); dim 1 must hold at least one class")
    }
    if let Some(w) = &cfg.weight {
        if w.dims() != [c] {
            bail!("{op}: weight must have shape ({c},), one weight per class of the logits {dims:?}, got {:?}", w.dims())
        }
        if !w.dtype().is_float() {
            bail!("{op}: weight dtype {:?} must be a float dtype; convert with weight.to_dtype(DType::F32)", w.dtype())
        }
        if !w.device().same_device(logits.device()) {
            bail!("{op}: weight is on {:?} but logits are on {:?}; move it with weight.to_device(logits.device())", w.device().location(), logits.device().location())
        }
    }
    Ok(CeDims {
        n: dims[0],
        c,
        spatial: dims[2..].iter().product(),
    })
}

/// The error for a target value outside `[0, C)` that is not the ignore index.
pub(crate) fn bad_target(
    op: &str,
    value: i64,
    pos: usize,
    c: usize,
    ignore: Option<i64>,
) -> candle::Error {
    let ign = match ignore {
        Some(i) => format!("ignore_index is {i}"),
        None => "no ignore_index is set".to_string(),
    };
    candle::Error::Msg(format!(
        "{op}: target value {value} at flat position {pos} is outside [0, {c}) and {ign}; fix the mask or set CrossEntropyConfig::ignore_index = Some({value})"
    ))
}

/// Mean cross-entropy of `logits` against class indices `target`, fused on CPU (one pass
/// for log-softmax and the pick, and a fused backward); on other devices it is
/// [`cross_entropy_slow`]. See the module docs for the contract.
///
/// Differentiable with respect to the logits. The result is an `f32` scalar for every
/// logits dtype; the gradient has the logits' dtype.
///
/// # Shapes
/// - logits: `(N, C)` or `(N, C, d1, ..)`; f32, f16 or bf16.
/// - target: `(N)` or `(N, d1, ..)`; u8, u32 or i64.
/// - output: `()` (scalar), f32.
///
/// # Errors
/// Unsupported dtypes, a target shape that is not the logits' without dim 1, a weight that
/// is not `(C,)`, mismatched devices, and a target value outside `[0, C)` that is not
/// `ignore_index` (the message names the value and its position).
///
/// # Example
/// ```
/// use candle::{Device, Tensor, Var};
/// use keel_kernels::{cross_entropy, CrossEntropyConfig};
/// let dev = Device::Cpu;
/// let logits = Var::from_tensor(&Tensor::new(&[[2f32, 0., 0.], [0., 1., 0.]], &dev)?)?;
/// let target = Tensor::new(&[0u32, 255], &dev)?;
/// let cfg = CrossEntropyConfig { ignore_index: Some(255), ..Default::default() };
/// let loss = cross_entropy(&logits, &target, &cfg)?;
/// // Only row 0 counts: logsumexp([2, 0, 0]) - 2.
/// let want = (2f32.exp() + 2.0).ln() - 2.0;
/// assert!((loss.to_scalar::<f32>()? - want).abs() < 1e-6);
/// let grads = loss.backward()?;
/// let g = grads.get(&logits).unwrap().to_vec2::<f32>()?;
/// assert_eq!(g[1], [0.0, 0.0, 0.0]); // the ignored row gets no gradient
/// # Ok::<(), candle::Error>(())
/// ```
pub fn cross_entropy(logits: &Tensor, target: &Tensor, cfg: &CrossEntropyConfig) -> Result<Tensor> {
    const OP: &str = "cross_entropy";
    let dims = check(OP, logits, target, cfg)?;
    if !matches!(logits.device(), Device::Cpu) {
        return cross_entropy_slow(logits, target, cfg);
    }
    let weight = match &cfg.weight {
        Some(w) => Some(w.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        None => None,
    };
    let op = cpu::CrossEntropyOp {
        dims,
        ignore_index: cfg.ignore_index,
        weight: weight.map(std::sync::Arc::new),
    };
    logits.contiguous()?.apply_op2(&target.contiguous()?, op)
}

/// Checks target values on any device with tensor ops (one small host read): each must be
/// in `[0, C)` or equal to `ignore_index`.
fn check_targets(op: &str, target: &Tensor, c: usize, ignore: Option<i64>) -> Result<()> {
    let t = target.flatten_all()?.to_dtype(DType::I64)?;
    if t.elem_count() == 0 {
        return Ok(());
    }
    let bad = t.lt(0i64)?.maximum(&t.ge(c as i64)?)?;
    let bad = match ignore {
        Some(i) => bad.minimum(&t.ne(i)?)?,
        None => bad,
    };
    let pos = bad.argmax(0)?.to_scalar::<u32>()? as usize;
    if bad.get(pos)?.to_scalar::<u8>()? == 1 {
        let value = t.get(pos)?.to_scalar::<i64>()?;
        return Err(bad_target(op, value, pos, c, ignore));
    }
    Ok(())
}

/// Reference mean cross-entropy composed from candle tensor ops (`log_softmax`, `gather`,
/// `index_select`, sums) in `f32`, differentiable through candle's autograd; the path
/// [`cross_entropy`] takes off the CPU and the reference its tests use.
///
/// Same semantics, shapes and errors as [`cross_entropy`] (the all-ignored case gives a
/// NaN loss and a zero gradient here too). Costs several logits-sized temporaries and one
/// host read for the target check.
///
/// # Example
/// ```
/// use candle::{Device, Tensor};
/// use keel_kernels::{cross_entropy, cross_entropy_slow, CrossEntropyConfig};
/// let dev = Device::Cpu;
/// let logits = Tensor::randn(0f32, 1.0, (2, 5, 3, 4), &dev)?;
/// let target = Tensor::new(&[1u8, 4, 0, 2], &dev)?.repeat(6)?.reshape((2, 3, 4))?;
/// let cfg = CrossEntropyConfig::default();
/// let a = cross_entropy(&logits, &target, &cfg)?.to_scalar::<f32>()?;
/// let b = cross_entropy_slow(&logits, &target, &cfg)?.to_scalar::<f32>()?;
/// assert!((a - b).abs() < 1e-5);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn cross_entropy_slow(
    logits: &Tensor,
    target: &Tensor,
    cfg: &CrossEntropyConfig,
) -> Result<Tensor> {
    const OP: &str = "cross_entropy_slow";
    let CeDims { n, c, spatial } = check(OP, logits, target, cfg)?;
    check_targets(OP, target, c, cfg.ignore_index)?;
    let dev = logits.device();
    // (N, C, S) -> (N * S, C) rows.
    let x = logits
        .to_dtype(DType::F32)?
        .reshape((n, c, spatial))?
        .transpose(1, 2)?
        .reshape((n * spatial, c))?;
    let logp = candle_nn::ops::log_softmax(&x, D::Minus1)?;
    let t = target.flatten_all()?.to_dtype(DType::I64)?;
    let keep = match cfg.ignore_index {
        Some(i) => t.ne(i)?,
        None => t.ones_like()?.to_dtype(DType::U8)?,
    };
    let safe = keep
        .where_cond(&t, &t.zeros_like()?)?
        .to_dtype(DType::U32)?;
    let picked = logp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
    let keep_f = keep.to_dtype(DType::F32)?;
    let w = match &cfg.weight {
        Some(w) => (w.to_dtype(DType::F32)?.index_select(&safe, 0)? * &keep_f)?,
        None => keep_f.clone(),
    };
    let num = (picked * &w)?.sum_all()?.neg()?;
    let den = w.sum_all()?;
    // All ignored: PyTorch's loss is NaN and its gradient 0. Divide by 1 instead of 0 (zero
    // gradient) and add a constant NaN (no gradient) to the loss.
    let none_kept = keep_f.sum_all()?.eq(0f32)?;
    let den = none_kept.where_cond(&Tensor::new(1f32, dev)?, &den)?;
    let nan = none_kept.where_cond(&Tensor::new(f32::NAN, dev)?, &Tensor::new(0f32, dev)?)?;
    (num / den)? + nan.detach()
}
