//! Detection losses with torchvision semantics: the sigmoid focal loss (Lin et al., "Focal
//! Loss for Dense Object Detection", ICCV 2017; `torchvision.ops.sigmoid_focal_loss`) and
//! the generalized IoU loss (Rezatofighi et al., CVPR 2019;
//! `torchvision.ops.generalized_box_iou_loss`).
//!
//! # Contract
//! - Composed from candle ops with backward, so both losses train on every device.
//! - f16/bf16 inputs are computed in f32 and the loss is returned in f32 (the loss of a
//!   mixed-precision step is wanted in f32, as keel's `cross_entropy`); the gradient flows
//!   back to the inputs in their own dtype. f64 stays f64.
//! - Gradients match PyTorch's autograd, also at the kinks: the focal loss's BCE is written
//!   with constant sign masks, so its gradient at a logit of exactly 0 is
//!   `sigmoid(0) - target`; the GIoU loss's max/min split the gradient of ties in half.

use std::str::FromStr;

use candle::{bail, Result, Tensor};

use crate::boxes::{check_same_device, col, compute_dtype};

/// How a loss reduces its per-element values (PyTorch's `reduction` argument).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Reduction {
    /// Per-element losses, the input's shape (torchvision's default).
    #[default]
    None,
    /// The mean over all elements, a scalar.
    Mean,
    /// The sum over all elements, a scalar.
    Sum,
}

impl FromStr for Reduction {
    type Err = candle::Error;

    /// `"none"`, `"mean"` or `"sum"`, as PyTorch spells them.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Reduction::None),
            "mean" => Ok(Reduction::Mean),
            "sum" => Ok(Reduction::Sum),
            other => {
                bail!("Reduction: unknown reduction {other:?}; use \"none\", \"mean\" or \"sum\"")
            }
        }
    }
}

/// Numerically stable `binary_cross_entropy_with_logits(x, t, reduction="none")`:
/// `softplus(x) - t * x` with `softplus(x) = max(x, 0) + log(1 + exp(-|x|))`. The sign mask
/// is a constant, so the gradient is exactly `sigmoid(x) - t` also at `x = 0`.
fn bce_with_logits(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    let pos = x.ge(0.0)?.to_dtype(x.dtype())?;
    let sign = ((&pos * 2.0)? - 1.0)?;
    let abs = x.mul(&sign)?;
    let softplus = (x.mul(&pos)? + ((abs.neg()?.exp()? + 1.0)?.log())?)?;
    softplus - t.mul(x)?
}

/// Applies `reduction`; `empty_mean` is the mean of zero elements (NaN for the focal loss,
/// 0 for the GIoU loss, as in torchvision). candle's reductions panic on empty tensors, so
/// an empty loss reduces to a constant (its inputs, being empty, have no gradient entries).
fn reduce(loss: Tensor, reduction: Reduction, empty_mean: f64) -> Result<Tensor> {
    if loss.elem_count() == 0 && reduction != Reduction::None {
        let value = if reduction == Reduction::Mean {
            empty_mean
        } else {
            0.0
        };
        return Tensor::new(value, loss.device())?.to_dtype(loss.dtype());
    }
    match reduction {
        Reduction::None => Ok(loss),
        Reduction::Mean => loss.mean_all(),
        Reduction::Sum => loss.sum_all(),
    }
}

/// The sigmoid focal loss of logits `inputs` against binary (or soft) `targets` of the same
/// shape: `alpha_t * (1 - p_t)^gamma * BCE(inputs, targets)` with `p = sigmoid(inputs)`,
/// `p_t = p * t + (1 - p) * (1 - t)` and `alpha_t = alpha * t + (1 - alpha) * (1 - t)`.
///
/// `torchvision.ops.sigmoid_focal_loss` (RetinaNet and FCOS use `alpha = 0.25`,
/// `gamma = 2`). A negative `alpha` turns the class weighting off (torchvision's `-1`).
/// `Mean` of an empty input is NaN, as PyTorch's.
///
/// # Shapes
/// `inputs` and `targets`: any shape, equal; the result has it for [`Reduction::None`] and is
/// a scalar otherwise.
///
/// # Errors
/// `alpha` above 1 or NaN, `gamma` negative or not finite, non-float tensors, different
/// shapes or devices.
///
/// ```
/// use candle::{Device, Tensor};
/// use keel_det::losses::{sigmoid_focal_loss, Reduction};
/// let logits = Tensor::new(&[2f32, -1., 0.5], &Device::Cpu)?;
/// let targets = Tensor::new(&[1f32, 0., 1.], &Device::Cpu)?;
/// let loss = sigmoid_focal_loss(&logits, &targets, 0.25, 2.0, Reduction::Sum)?;
/// assert!(loss.to_scalar::<f32>()? > 0.0);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn sigmoid_focal_loss(
    inputs: &Tensor,
    targets: &Tensor,
    alpha: f64,
    gamma: f64,
    reduction: Reduction,
) -> Result<Tensor> {
    const OP: &str = "sigmoid_focal_loss";
    if alpha.is_nan() || alpha > 1.0 {
        bail!("{OP}: alpha ({alpha}) must be in [0, 1], or negative for no class weighting (torchvision's -1); RetinaNet uses 0.25")
    }
    if !gamma.is_finite() || gamma < 0.0 {
        bail!("{OP}: gamma ({gamma}) must be finite and >= 0; 0 gives plain BCE, RetinaNet uses 2")
    }
    for (name, t) in [("inputs", inputs), ("targets", targets)] {
        if !t.dtype().is_float() {
            bail!("{OP}: {name} must be a float tensor, got {:?}; convert with {name}.to_dtype(DType::F32)", t.dtype())
        }
    }
    if inputs.dims() != targets.dims() {
        bail!("{OP}: targets shape {:?} must equal inputs shape {:?} (one 0/1 target per logit; one-hot encode class ids first)", targets.dims(), inputs.dims())
    }
    check_same_device(OP, ("inputs", inputs), ("targets", targets))?;
    let dtype = compute_dtype(&[inputs]);
    let x = inputs.to_dtype(dtype)?;
    let t = targets.to_dtype(dtype)?;
    let mut loss = bce_with_logits(&x, &t)?;
    if gamma != 0.0 {
        // (1 - p_t)^0 is the constant 1 (PyTorch's pow backward gives it a zero gradient).
        let p = candle_nn::ops::sigmoid(&x)?;
        let one_minus_t = (1.0 - &t)?;
        let p_t = (p.mul(&t)? + (1.0 - &p)?.mul(&one_minus_t)?)?;
        loss = loss.mul(&(1.0 - p_t)?.powf(gamma)?)?;
    }
    if alpha >= 0.0 {
        let alpha_t = ((&t * alpha)? + ((1.0 - &t)? * (1.0 - alpha))?)?;
        loss = alpha_t.mul(&loss)?;
    }
    reduce(loss, reduction, f64::NAN)
}

/// The generalized IoU loss `1 - GIoU` of matched box pairs `boxes1[i]`, `boxes2[i]`, with
/// `iou = inter / (union + eps)` and `GIoU = iou - (enclosing - union) / (enclosing + eps)`.
///
/// `torchvision.ops.generalized_box_iou_loss` (symmetric in its two arguments). The
/// intersection counts only where both overlaps are strictly positive. `Mean` of an empty
/// input is 0, as torchvision's. torchvision's default `eps` is
/// `1e-7`.
///
/// # Shapes
/// `boxes1`, `boxes2`: `(.., 4)` xyxy, equal; the result is `(..)` for [`Reduction::None`]
/// and a scalar otherwise.
///
/// # Errors
/// A last dim other than 4, different shapes or devices, non-float tensors, `eps` negative
/// or not finite.
///
/// ```
/// use candle::{Device, Tensor};
/// use keel_det::losses::{generalized_box_iou_loss, Reduction};
/// let pred = Tensor::new(&[[0f32, 0., 2., 2.]], &Device::Cpu)?;
/// let gt = Tensor::new(&[[0f32, 0., 2., 2.]], &Device::Cpu)?;
/// let loss = generalized_box_iou_loss(&pred, &gt, Reduction::Mean, 1e-7)?;
/// assert!(loss.to_scalar::<f32>()?.abs() < 1e-6); // identical boxes: GIoU 1
/// # Ok::<(), candle::Error>(())
/// ```
pub fn generalized_box_iou_loss(
    boxes1: &Tensor,
    boxes2: &Tensor,
    reduction: Reduction,
    eps: f64,
) -> Result<Tensor> {
    const OP: &str = "generalized_box_iou_loss";
    if !eps.is_finite() || eps < 0.0 {
        bail!("{OP}: eps ({eps}) must be finite and >= 0; torchvision's default is 1e-7")
    }
    for (name, t) in [("boxes1", boxes1), ("boxes2", boxes2)] {
        if !t.dtype().is_float() {
            bail!("{OP}: {name} must be a float tensor, got {:?}; convert with {name}.to_dtype(DType::F32)", t.dtype())
        }
        if t.dims().last() != Some(&4) {
            bail!("{OP}: {name} must have shape (.., 4) with (x1, y1, x2, y2) in the last dim, got {:?}", t.dims())
        }
    }
    if boxes1.dims() != boxes2.dims() {
        bail!("{OP}: boxes2 shape {:?} must equal boxes1 shape {:?} (one matched target per prediction)", boxes2.dims(), boxes1.dims())
    }
    check_same_device(OP, ("boxes1", boxes1), ("boxes2", boxes2))?;
    let dtype = compute_dtype(&[boxes1, boxes2]);
    let (a, b) = (boxes1.to_dtype(dtype)?, boxes2.to_dtype(dtype)?);
    let [x1, y1, x2, y2] = corners(&a)?;
    let [x1g, y1g, x2g, y2g] = corners(&b)?;
    let (xk1, yk1) = (x1.maximum(&x1g)?, y1.maximum(&y1g)?);
    let (xk2, yk2) = (x2.minimum(&x2g)?, y2.minimum(&y2g)?);
    let overlap = yk2.gt(&yk1)?.mul(&xk2.gt(&xk1)?)?.to_dtype(dtype)?;
    let inter = (&xk2 - &xk1)?.mul(&(&yk2 - &yk1)?)?.mul(&overlap)?;
    let area1 = (&x2 - &x1)?.mul(&(&y2 - &y1)?)?;
    let area2 = (&x2g - &x1g)?.mul(&(&y2g - &y1g)?)?;
    let union = ((area1 + area2)? - &inter)?;
    let iou = inter.div(&(&union + eps)?)?;
    let (xc1, yc1) = (x1.minimum(&x1g)?, y1.minimum(&y1g)?);
    let (xc2, yc2) = (x2.maximum(&x2g)?, y2.maximum(&y2g)?);
    let enclosing = (xc2 - xc1)?.mul(&(yc2 - yc1)?)?;
    let giou = (iou - (&enclosing - &union)?.div(&(&enclosing + eps)?)?)?;
    let loss = (1.0 - giou)?;
    reduce(loss, reduction, 0.0)
}

fn corners(b: &Tensor) -> Result<[Tensor; 4]> {
    Ok([col(b, 0)?, col(b, 1)?, col(b, 2)?, col(b, 3)?])
}
