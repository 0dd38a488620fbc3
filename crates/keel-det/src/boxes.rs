//! Box geometry on xyxy boxes: areas, pairwise IoU and generalized IoU (Rezatofighi et al.,
//! "Generalized Intersection over Union", CVPR 2019), with the semantics of
//! `torchvision.ops.box_area`, `box_iou` and `generalized_box_iou`.
//!
//! # Contract
//! - Boxes are `(N, 4)` tensors `(x1, y1, x2, y2)` in f16, bf16, f32 or f64. f16/bf16 are
//!   computed and returned in f32 (torchvision upcasts them too); f64 stays f64.
//! - Composed from candle ops, so they run on every device and are differentiable. The
//!   gradients are PyTorch's, ties included: an elementwise max/min whose two inputs are
//!   equal sends half the gradient to each, and the `clamp(min=0)` of an intersection
//!   width blocks the gradient where the width is exactly 0 (touching boxes get none).
//! - Degenerate boxes are not rejected, as in torchvision: a zero-width box has area 0; an
//!   inverted box (x2 < x1) a negative area; the IoU of two zero-area boxes is 0/0 = NaN.
//!   [`generalized_box_iou`] is NaN when the enclosing box has zero area.
//! - Empty inputs give fresh empty results (`(0,)`, `(0, M)`, `(N, 0)`): candle's narrowed
//!   views of an empty tensor carry offsets past their storage, on which `to_vec2` and the
//!   reductions panic, so no such view is returned.

use candle::{bail, DType, Result, Tensor};

/// Checks that `boxes` is a float `(N, 4)` tensor and returns N.
pub(crate) fn check_boxes(op: &str, name: &str, boxes: &Tensor) -> Result<usize> {
    if !boxes.dtype().is_float() {
        bail!(
            "{op}: {name} must be a float tensor, got {:?}; convert with {name}.to_dtype(DType::F32)",
            boxes.dtype()
        )
    }
    match boxes.dims() {
        &[n, 4] => Ok(n),
        dims => bail!(
            "{op}: {name} must have shape (N, 4) with (x1, y1, x2, y2) rows, got {dims:?}; \
             reshape a flat list with {name}.reshape(((), 4))"
        ),
    }
}

/// The dtype the ops compute in: f64 for f64 inputs, f32 for every other float dtype.
pub(crate) fn compute_dtype(tensors: &[&Tensor]) -> DType {
    if tensors.iter().any(|t| t.dtype() == DType::F64) {
        DType::F64
    } else {
        DType::F32
    }
}

/// Checks that `b` is on `a`'s device.
pub(crate) fn check_same_device(op: &str, a: (&str, &Tensor), b: (&str, &Tensor)) -> Result<()> {
    if !a.1.device().same_device(b.1.device()) {
        bail!(
            "{op}: {} is on {:?} but {} is on {:?}; move it with {}.to_device({}.device())",
            b.0,
            b.1.device().location(),
            a.0,
            a.1.device().location(),
            b.0,
            a.0
        )
    }
    Ok(())
}

/// Column `i` of a `(.., 4)` tensor, without the last dim.
pub(crate) fn col(t: &Tensor, i: usize) -> Result<Tensor> {
    let last = t.rank() - 1;
    t.narrow(last, i, 1)?.squeeze(last)
}

/// `max(x, 0)` with PyTorch's `clamp(min=0)` gradient: 1 where `x > 0`, 0 at and below 0
/// (candle's `relu` passes the gradient at 0; PyTorch's clamp does not). The mask is a
/// constant, so the gradient is exactly `grad * (x > 0)`.
fn clamp_min0(x: &Tensor) -> Result<Tensor> {
    x.mul(&x.gt(0.0)?.to_dtype(x.dtype())?)
}

/// Areas `(x2 - x1) * (y2 - y1)` of `(N, 4)` xyxy boxes, shape `(N,)`.
///
/// `torchvision.ops.box_area`. Differentiable; see the [module docs](self) for dtypes and
/// degenerate boxes.
///
/// ```
/// use candle::{Device, Tensor};
/// let boxes = Tensor::new(&[[0f32, 0., 2., 3.], [1., 1., 1., 5.]], &Device::Cpu)?;
/// assert_eq!(keel_det::boxes::box_area(&boxes)?.to_vec1::<f32>()?, [6., 0.]);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn box_area(boxes: &Tensor) -> Result<Tensor> {
    let n = check_boxes("box_area", "boxes", boxes)?;
    let dtype = compute_dtype(&[boxes]);
    if n == 0 {
        return Tensor::zeros(0, dtype, boxes.device());
    }
    area(&boxes.to_dtype(dtype)?)
}

fn area(b: &Tensor) -> Result<Tensor> {
    (col(b, 2)? - col(b, 0)?)?.mul(&(col(b, 3)? - col(b, 1)?)?)
}

/// `None` when one set is empty: the `(N, M)` result is then a fresh empty tensor.
fn empty_pair(op: &str, a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let n = check_boxes(op, "boxes1", a)?;
    let m = check_boxes(op, "boxes2", b)?;
    check_same_device(op, ("boxes1", a), ("boxes2", b))?;
    if n == 0 || m == 0 {
        return Ok(Some(Tensor::zeros(
            (n, m),
            compute_dtype(&[a, b]),
            a.device(),
        )?));
    }
    Ok(None)
}

/// Validated, upcast pair of box sets with their corner tensors broadcast to `(N, M, 2)`.
struct Pair {
    a: Tensor,
    b: Tensor,
    /// `a`'s `(x1, y1)` as `(N, 1, 2)`, `(x2, y2)` likewise.
    a_lt: Tensor,
    a_rb: Tensor,
    /// `b`'s corners as `(1, M, 2)`.
    b_lt: Tensor,
    b_rb: Tensor,
}

impl Pair {
    fn new(op: &str, a: &Tensor, b: &Tensor) -> Result<Pair> {
        check_boxes(op, "boxes1", a)?;
        check_boxes(op, "boxes2", b)?;
        check_same_device(op, ("boxes1", a), ("boxes2", b))?;
        let dtype = compute_dtype(&[a, b]);
        let (a, b) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
        Ok(Pair {
            a_lt: a.narrow(1, 0, 2)?.unsqueeze(1)?,
            a_rb: a.narrow(1, 2, 2)?.unsqueeze(1)?,
            b_lt: b.narrow(1, 0, 2)?.unsqueeze(0)?,
            b_rb: b.narrow(1, 2, 2)?.unsqueeze(0)?,
            a,
            b,
        })
    }

    /// Intersection and union areas, `(N, M)` each (torchvision's `_box_inter_union`).
    fn inter_union(&self) -> Result<(Tensor, Tensor)> {
        let lt = self.a_lt.broadcast_maximum(&self.b_lt)?;
        let rb = self.a_rb.broadcast_minimum(&self.b_rb)?;
        let inter = prod_wh(&clamp_min0(&(rb - lt)?)?)?;
        let area1 = area(&self.a)?.unsqueeze(1)?;
        let area2 = area(&self.b)?.unsqueeze(0)?;
        let union = area1.broadcast_add(&area2)?.broadcast_sub(&inter)?;
        Ok((inter, union))
    }
}

/// `wh[.., 0] * wh[.., 1]` of an `(N, M, 2)` tensor.
fn prod_wh(wh: &Tensor) -> Result<Tensor> {
    col(wh, 0)?.mul(&col(wh, 1)?)
}

/// Pairwise IoU of `boxes1 (N, 4)` and `boxes2 (M, 4)`, shape `(N, M)`.
///
/// `torchvision.ops.box_iou`: `inter / (area1 + area2 - inter)`. Differentiable; see the
/// [module docs](self) for dtypes, gradients at ties and degenerate boxes.
///
/// ```
/// use candle::{Device, Tensor};
/// let a = Tensor::new(&[[0f32, 0., 2., 2.]], &Device::Cpu)?;
/// let b = Tensor::new(&[[1f32, 0., 3., 2.], [5., 5., 6., 6.]], &Device::Cpu)?;
/// let iou = keel_det::boxes::box_iou(&a, &b)?;
/// assert_eq!(iou.to_vec2::<f32>()?, [[2. / 6., 0.]]);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn box_iou(boxes1: &Tensor, boxes2: &Tensor) -> Result<Tensor> {
    if let Some(empty) = empty_pair("box_iou", boxes1, boxes2)? {
        return Ok(empty);
    }
    let (inter, union) = Pair::new("box_iou", boxes1, boxes2)?.inter_union()?;
    inter.div(&union)
}

/// Pairwise generalized IoU of `boxes1 (N, 4)` and `boxes2 (M, 4)`, shape `(N, M)`, in
/// `[-1, 1]` for valid boxes.
///
/// `torchvision.ops.generalized_box_iou`: `iou - (enclosing - union) / enclosing`, with
/// `enclosing` the area of the smallest box holding both. Differentiable; see the
/// [module docs](self).
///
/// ```
/// use candle::{Device, Tensor};
/// let a = Tensor::new(&[[0f32, 0., 1., 1.]], &Device::Cpu)?;
/// let b = Tensor::new(&[[2f32, 0., 3., 1.]], &Device::Cpu)?;
/// // Disjoint: IoU 0, enclosing box 3, union 2.
/// let giou = keel_det::boxes::generalized_box_iou(&a, &b)?;
/// assert!((giou.to_vec2::<f32>()?[0][0] - (-1. / 3.)).abs() < 1e-6);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn generalized_box_iou(boxes1: &Tensor, boxes2: &Tensor) -> Result<Tensor> {
    if let Some(empty) = empty_pair("generalized_box_iou", boxes1, boxes2)? {
        return Ok(empty);
    }
    let pair = Pair::new("generalized_box_iou", boxes1, boxes2)?;
    let (inter, union) = pair.inter_union()?;
    let iou = inter.div(&union)?;
    let lti = pair.a_lt.broadcast_minimum(&pair.b_lt)?;
    let rbi = pair.a_rb.broadcast_maximum(&pair.b_rb)?;
    let enclosing = prod_wh(&clamp_min0(&(rbi - lti)?)?)?;
    iou - (enclosing.sub(&union)?).div(&enclosing)?
}
