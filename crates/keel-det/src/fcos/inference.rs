//! FCOS inference: `FCOSPostProcessor` of `fcos_core/modeling/rpn/fcos/inference.py`
//! (tianzhi0549/FCOS). Per level: candidates with `sigmoid(cls) > score_threshold`, at most
//! `pre_nms_top_n` of them by `sigmoid(cls) * sigmoid(centerness)`, boxes
//! `(x - l, y - t, x + r, y + b)` clipped to the image, score `sqrt(cls * centerness)`;
//! then class-aware NMS over all levels ([`batched_nms`], IoU 0.6) and the
//! `max_detections` best scores.
//!
//! Clipping is to `[0, W] x [0, H]` (torchvision's `clip_boxes_to_image`), not the
//! reference's `W - 1`, since keel's boxes are continuous coordinates. The reference's
//! `min_size` is 0, so no box is removed for its size. Classes are 0-based here.
//!
//! NMS computes IoU on continuous coordinates, areas `(x2 - x1) * (y2 - y1)`
//! (torchvision's `batched_nms`), without the `+ 1` pixel convention of the reference's
//! `ml_nms` (`fcos_core/csrc/cuda/ml_nms.cu`); small boxes overlap slightly less here.
//!
//! Units: `out.bbox_reg` must be `(l, t, r, b)` in input pixels, what [`FcosHead`]
//! outputs. A head trained with [`FcosTargetConfig::norm_reg_targets`] `= true` on
//! stride-divided outputs must be multiplied back by each level's stride (the reference's
//! test-time `bbox_pred * stride`) before decoding.
//!
//! [`FcosHead`]: super::FcosHead
//! [`FcosTargetConfig::norm_reg_targets`]: super::FcosTargetConfig::norm_reg_targets
use candle::{bail, DType, Result, Tensor};

use super::head::FcosOutputs;
use super::targets::level_locations;
use crate::nms::batched_nms;

/// Post-processing settings (FCOS's test defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FcosInferenceConfig {
    /// Minimum class probability of a candidate (`INFERENCE_TH`, 0.05).
    pub score_threshold: f32,
    /// Candidates kept per level and image (`PRE_NMS_TOP_N`, 1000).
    pub pre_nms_top_n: usize,
    /// Class-aware NMS IoU threshold (`NMS_TH`, 0.6).
    pub nms_threshold: f64,
    /// Detections kept per image (`DETECTIONS_PER_IMG`, 100).
    pub max_detections: usize,
}

impl Default for FcosInferenceConfig {
    fn default() -> Self {
        Self {
            score_threshold: 0.05,
            pre_nms_top_n: 1000,
            nms_threshold: 0.6,
            max_detections: 100,
        }
    }
}

/// The detections of one image, by decreasing score.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Detections {
    /// xyxy boxes in input pixels.
    pub boxes: Vec<[f32; 4]>,
    /// `sqrt(sigmoid(cls) * sigmoid(centerness))`.
    pub scores: Vec<f32>,
    /// 0-based class ids.
    pub classes: Vec<u32>,
}

/// A candidate before NMS.
struct Candidate {
    rank_score: f32,
    bbox: [f32; 4],
    class: u32,
}

fn level_candidates(
    out: &FcosOutputs,
    level: usize,
    image: usize,
    stride: usize,
    size: (f32, f32),
    cfg: &FcosInferenceConfig,
) -> Result<Vec<Candidate>> {
    let cls = candle_nn::ops::sigmoid(&out.cls_logits[level].get(image)?.to_dtype(DType::F32)?)?
        .flatten_from(1)?
        .to_vec2::<f32>()?;
    let ctr = candle_nn::ops::sigmoid(&out.centerness[level].get(image)?.to_dtype(DType::F32)?)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let reg = out.bbox_reg[level]
        .get(image)?
        .to_dtype(DType::F32)?
        .flatten_from(1)?
        .to_vec2::<f32>()?;
    let (h, w) = (out.cls_logits[level].dim(2)?, out.cls_logits[level].dim(3)?);
    let locs = level_locations(h, w, stride);
    let (img_w, img_h) = size;
    let mut cands = vec![];
    for (k, row) in cls.iter().enumerate() {
        for (i, &p) in row.iter().enumerate() {
            if p > cfg.score_threshold {
                let [x, y] = locs[i];
                let bbox = [
                    (x - reg[0][i]).clamp(0.0, img_w),
                    (y - reg[1][i]).clamp(0.0, img_h),
                    (x + reg[2][i]).clamp(0.0, img_w),
                    (y + reg[3][i]).clamp(0.0, img_h),
                ];
                cands.push(Candidate {
                    rank_score: p * ctr[i],
                    bbox,
                    class: k as u32,
                });
            }
        }
    }
    // Stable sort by decreasing score, so equal scores keep location order.
    cands.sort_by(|a, b| b.rank_score.total_cmp(&a.rank_score));
    cands.truncate(cfg.pre_nms_top_n);
    Ok(cands)
}

/// Decodes head outputs into detections, one [`Detections`] per image.
/// `image_sizes[i]` is image `i`'s `(width, height)` in input pixels; `strides` one per level.
///
/// # Errors
/// Level counts that disagree, a batch size other than `image_sizes.len()`, an image size
/// that is negative or not finite, per-level shapes of the three outputs that disagree.
pub fn fcos_detections(
    out: &FcosOutputs,
    strides: &[usize],
    image_sizes: &[(f32, f32)],
    cfg: &FcosInferenceConfig,
) -> Result<Vec<Detections>> {
    let levels = out.cls_logits.len();
    if strides.len() != levels || out.bbox_reg.len() != levels || out.centerness.len() != levels {
        bail!("fcos_detections: {} strides for {levels} cls levels, {} reg, {} centerness; give one stride per head level", strides.len(), out.bbox_reg.len(), out.centerness.len())
    }
    let n = out.cls_logits.first().map_or(Ok(0), |x| x.dim(0))?;
    if n != image_sizes.len() {
        bail!(
            "fcos_detections: batch of {n} images but {} image sizes",
            image_sizes.len()
        )
    }
    for (i, &(w, h)) in image_sizes.iter().enumerate() {
        if !(w.is_finite() && h.is_finite() && w >= 0.0 && h >= 0.0) {
            bail!("fcos_detections: image {i}'s size ({w}, {h}) must be finite and >= 0 (width, height in input pixels)")
        }
    }
    for level in 0..levels {
        let (c, r, t) = (
            &out.cls_logits[level],
            &out.bbox_reg[level],
            &out.centerness[level],
        );
        let &[cn, _, h, w] = c.dims() else {
            bail!(
                "fcos_detections: level {level}'s cls logits must be (N, C, H, W), got {:?}",
                c.dims()
            )
        };
        if r.dims() != [cn, 4, h, w] || t.dims() != [cn, 1, h, w] {
            bail!("fcos_detections: level {level}: cls logits {:?} need bbox_reg ({cn}, 4, {h}, {w}) and centerness ({cn}, 1, {h}, {w}), got {:?} and {:?}", c.dims(), r.dims(), t.dims())
        }
    }
    let mut result = vec![];
    for (image, &size) in image_sizes.iter().enumerate() {
        let mut cands = vec![];
        for (level, &stride) in strides.iter().enumerate() {
            cands.extend(level_candidates(out, level, image, stride, size, cfg)?);
        }
        result.push(select(cands, cfg)?);
    }
    Ok(result)
}

/// Class-aware NMS over all levels, then the best `max_detections`.
fn select(cands: Vec<Candidate>, cfg: &FcosInferenceConfig) -> Result<Detections> {
    if cands.is_empty() {
        return Ok(Detections::default());
    }
    let dev = candle::Device::Cpu;
    let n = cands.len();
    let boxes = Tensor::from_vec(
        cands.iter().flat_map(|c| c.bbox).collect::<Vec<_>>(),
        (n, 4),
        &dev,
    )?;
    let scores: Vec<f32> = cands.iter().map(|c| c.rank_score.sqrt()).collect();
    let classes = Tensor::from_vec(cands.iter().map(|c| c.class).collect::<Vec<_>>(), n, &dev)?;
    let keep = batched_nms(
        &boxes,
        &Tensor::new(scores.as_slice(), &dev)?,
        &classes,
        cfg.nms_threshold,
    )?;
    let mut det = Detections::default();
    for &k in keep.iter().take(cfg.max_detections) {
        let c = &cands[k as usize];
        det.boxes.push(c.bbox);
        det.scores.push(scores[k as usize]);
        det.classes.push(c.class);
    }
    Ok(det)
}
