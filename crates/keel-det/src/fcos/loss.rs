//! The FCOS loss: `FCOSLossComputation.__call__` of `fcos_core/modeling/rpn/fcos/loss.py`
//! (tianzhi0549/FCOS), single process (`num_gpus = 1`), built from keel-det's losses.
//!
//! - classification: [`sigmoid_focal_loss`] (alpha, gamma) summed over every location and
//!   class against one-hot labels, divided by `max(num_pos, 1)`;
//! - regression: the GIoU loss of the positives' predicted `(l, t, r, b)` against their
//!   targets, weighted by the centerness targets and divided by their sum;
//! - centerness: BCE-with-logits (summed) of the positives' centerness logits against the
//!   centerness targets, divided by `max(num_pos, 1)`.
//!
//! One deviation, documented: the reference's `IOULoss` smooths the IoU as
//! `(inter + 1) / (union + 1)`, which depends on the pixel scale (and on
//! `norm_reg_targets`); keel uses torchvision's [`generalized_box_iou_loss`] (eps 1e-7) on
//! the boxes `(-l, -t, r, b)` around each location, which is the same GIoU without the
//! smoothing. Without positives the regression and centerness losses are `sum(pred) * 0`,
//! zero with zero gradients (the reference returns `sum(pred[empty])`). The reference's
//! default box loss is `IOU_LOSS_TYPE = "iou"` (`-log(IoU)`); GIoU is its "imprv" configs'.
//!
//! Units: `out.bbox_reg` must be in the units of `targets.reg_targets`. [`FcosHead`]
//! always outputs pixels (`exp(scale * x)`; the reference's `NORM_REG_TARGETS` head branch,
//! `relu(scale * x)` in strides, is not implemented), so with
//! [`FcosTargetConfig::norm_reg_targets`] `= true` divide each level's `bbox_reg` by its
//! stride before calling [`fcos_loss`].
//!
//! [`FcosHead`]: super::FcosHead
//! [`FcosTargetConfig::norm_reg_targets`]: super::FcosTargetConfig::norm_reg_targets
use candle::{bail, DType, Result, Tensor};

use super::head::FcosOutputs;
use super::targets::FcosTargets;
use crate::losses::{generalized_box_iou_loss, sigmoid_focal_loss, Reduction};

/// The loss hyper-parameters (FCOS: alpha 0.25, gamma 2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FcosLossConfig {
    /// Focal loss alpha.
    pub focal_alpha: f64,
    /// Focal loss gamma.
    pub focal_gamma: f64,
}

impl Default for FcosLossConfig {
    fn default() -> Self {
        Self {
            focal_alpha: 0.25,
            focal_gamma: 2.0,
        }
    }
}

/// The three FCOS losses, f32 scalars attached to the head outputs' graph.
#[derive(Clone, Debug)]
pub struct FcosLosses {
    /// Focal classification loss.
    pub cls: Tensor,
    /// Centerness-weighted GIoU regression loss.
    pub reg: Tensor,
    /// Centerness BCE loss.
    pub centerness: Tensor,
}

impl FcosLosses {
    /// `cls + reg + centerness`, what the detector minimizes.
    pub fn total(&self) -> Result<Tensor> {
        (&self.cls + &self.reg)? + &self.centerness
    }
}

/// `(N, K, H, W)` per level -> `(P, K)` level-first, image, row-major (the reference's
/// `permute(0, 2, 3, 1).reshape(-1, K)` and `cat`).
pub(crate) fn flatten_levels(xs: &[Tensor]) -> Result<Tensor> {
    let flat = xs
        .iter()
        .map(|x| {
            let k = x.dim(1)?;
            x.permute((0, 2, 3, 1))?.reshape(((), k))
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&flat, 0)
}

fn check_outputs(op: &str, out: &FcosOutputs, t: &FcosTargets) -> Result<()> {
    let levels = t.feature_sizes.len();
    for (name, xs, k) in [
        ("cls_logits", &out.cls_logits, None),
        ("bbox_reg", &out.bbox_reg, Some(4)),
        ("centerness", &out.centerness, Some(1)),
    ] {
        if xs.len() != levels {
            bail!("{op}: {name} has {} levels but the targets {levels}; build targets from the head's feature sizes", xs.len())
        }
        for (l, x) in xs.iter().enumerate() {
            let (n, c, h, w) = x.dims4()?;
            if n != t.num_images || (h, w) != t.feature_sizes[l] || k.is_some_and(|k| k != c) {
                bail!(
                    "{op}: {name}[{l}] has shape {:?}, expected ({}, {}, {}, {}) from the targets",
                    x.dims(),
                    t.num_images,
                    k.map_or("C".into(), |k| k.to_string()),
                    t.feature_sizes[l].0,
                    t.feature_sizes[l].1
                )
            }
        }
    }
    Ok(())
}

/// One-hot classification targets `(P, C)` from FCOS labels (0 background, `k + 1`).
fn one_hot(labels: &Tensor, num_classes: usize) -> Result<Tensor> {
    let labels = labels.to_vec1::<u32>()?;
    let mut t = vec![0f32; labels.len() * num_classes];
    for (i, &l) in labels.iter().enumerate() {
        if l as usize > num_classes {
            bail!("fcos_loss: label {l} at location {i} is beyond {num_classes} classes; class ids must be < num_classes")
        }
        if l > 0 {
            t[i * num_classes + l as usize - 1] = 1.0;
        }
    }
    Tensor::from_vec(t, (labels.len(), num_classes), &candle::Device::Cpu)
}

/// `(l, t, r, b)` -> the xyxy box `(-l, -t, r, b)` around its location.
fn ltrb_to_boxes(r: &Tensor) -> Result<Tensor> {
    let sign = Tensor::new(&[-1f32, -1., 1., 1.], r.device())?.to_dtype(r.dtype())?;
    r.broadcast_mul(&sign)
}

/// The FCOS losses of head outputs against targets from
/// [`prepare_targets`](super::prepare_targets) built for the same feature sizes.
///
/// # Errors
/// Level counts or shapes that disagree with the targets, labels beyond the class count.
pub fn fcos_loss(
    out: &FcosOutputs,
    targets: &FcosTargets,
    cfg: &FcosLossConfig,
) -> Result<FcosLosses> {
    const OP: &str = "fcos_loss";
    check_outputs(OP, out, targets)?;
    let f32c = |x: Tensor| x.to_dtype(DType::F32);
    let cls = f32c(flatten_levels(&out.cls_logits)?)?;
    let reg = f32c(flatten_levels(&out.bbox_reg)?)?;
    let ctr = f32c(flatten_levels(&out.centerness)?)?.flatten_all()?;
    let dev = cls.device().clone();
    let cls_t = one_hot(&targets.labels, cls.dim(1)?)?.to_device(&dev)?;
    let num_pos = targets.pos_inds.len();
    let norm = num_pos.max(1) as f64;
    let cls_loss = (sigmoid_focal_loss(
        &cls,
        &cls_t,
        cfg.focal_alpha,
        cfg.focal_gamma,
        Reduction::Sum,
    )? / norm)?;
    if num_pos == 0 {
        // A zero tensor, not `* 0.0`: candle prunes affine(0) from the graph, and the
        // reference gives these outputs zero gradients, not none.
        let zero = Tensor::zeros((), DType::F32, &dev)?;
        return Ok(FcosLosses {
            cls: cls_loss,
            reg: reg.sum_all()?.mul(&zero)?,
            centerness: ctr.sum_all()?.mul(&zero)?,
        });
    }
    let pos = Tensor::new(targets.pos_inds.as_slice(), &dev)?;
    let reg_p = reg.index_select(&pos, 0)?;
    let ctr_p = ctr.index_select(&pos, 0)?;
    let reg_t = targets.reg_targets.to_device(&dev)?.index_select(&pos, 0)?;
    let ctr_t = targets.centerness.to_device(&dev)?.index_select(&pos, 0)?;
    let ctr_sum = ctr_t.sum_all()?.to_scalar::<f32>()? as f64;
    let giou = generalized_box_iou_loss(
        &ltrb_to_boxes(&reg_p)?,
        &ltrb_to_boxes(&reg_t)?,
        Reduction::None,
        1e-7,
    )?;
    let reg_loss = if ctr_sum > 0.0 {
        (giou.mul(&ctr_t)?.sum_all()? / ctr_sum)?
    } else {
        giou.sum_all()?
    };
    // BCE with logits is the focal loss with gamma 0 and no alpha weighting.
    let ctr_loss = (sigmoid_focal_loss(&ctr_p, &ctr_t, -1.0, 0.0, Reduction::Sum)? / norm)?;
    Ok(FcosLosses {
        cls: cls_loss,
        reg: reg_loss,
        centerness: ctr_loss,
    })
}
