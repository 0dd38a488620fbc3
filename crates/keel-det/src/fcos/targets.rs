//! FCOS locations and training targets: `compute_locations` of
//! `fcos_core/modeling/rpn/fcos/fcos.py` and `prepare_targets`,
//! `compute_targets_for_locations`, `get_sample_region` and `compute_centerness_targets` of
//! `fcos_core/modeling/rpn/fcos/loss.py` (tianzhi0549/FCOS), mirrored on the host: target
//! assignment has no gradient, so it runs on plain `Vec<f32>`s and returns tensors.
//!
//! # Contract
//! - Locations of a level of stride `s` and size `(H, W)` are `(x * s + s / 2, y * s + s / 2)`
//!   (integer `s / 2`, as `stride // 2`), row-major (y outer, x inner).
//! - A location is a positive of a box when it lies strictly inside the box's center region
//!   (`center +- radius * stride`, clipped to the box; the whole box when the radius is 0),
//!   and the box's largest regression distance `max(l, t, r, b)` lies in the level's size of
//!   interest `[lo, hi]` (both inclusive). Among several such boxes the smallest area wins
//!   (the first on ties, as `torch.min`), the area being the reference's `BoxList.area()`
//!   `(x2 - x1 + 1) * (y2 - y1 + 1)` (`bounding_box.py`, `TO_REMOVE = 1`): a 20x1 box
//!   (area 42) loses to a 5x5 one (area 36), though `20 * 1 < 5 * 5`.
//! - Outputs are flattened level-first, then image, then row-major location, exactly as the
//!   reference's `labels_flatten`: index `offset(level) + image * H_l * W_l + y * W_l + x`.
//! - Labels follow FCOS: `0` is background, `k + 1` is class `k`.
//! - Negative locations carry the regression target of the image's first box (the
//!   reference's `argmin` over all-INF rows), or zeros in an image without boxes; their
//!   centerness target is 0. Only positives are used by the loss.
//! - The reference's degenerate early return of `get_sample_region` (when the first box's
//!   center x is 0) is not mirrored: such a box is sampled like any other.
use candle::{bail, Device, Result, Tensor};

/// The reference's `INF` (`100000000`), the upper size of interest of the last level.
pub const INF: f32 = 100_000_000.0;

/// The ground truth of one image: xyxy boxes in input-image pixels and 0-based class ids.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GtBoxes {
    /// `(x1, y1, x2, y2)` per box, `x1 <= x2`, `y1 <= y2`.
    pub boxes: Vec<[f32; 4]>,
    /// The class id of each box, `0..num_classes`.
    pub classes: Vec<u32>,
}

/// How [`prepare_targets`] assigns locations to boxes.
#[derive(Clone, Debug, PartialEq)]
pub struct FcosTargetConfig {
    /// The stride of each level (P3-P7: 8, 16, 32, 64, 128).
    pub strides: Vec<usize>,
    /// The `[lo, hi]` range of `max(l, t, r, b)` each level is responsible for.
    pub sizes_of_interest: Vec<(f32, f32)>,
    /// `center_sampling_radius` in strides; 0 samples the whole box. The reference's default
    /// (`CENTER_SAMPLING_RADIUS = 0.0`, the ICCV paper) is 0; 1.5 comes from FCOS_PLUS and
    /// the reference's "imprv" configs.
    pub center_sampling_radius: f32,
    /// Divide each level's regression targets by its stride (`norm_reg_targets`).
    pub norm_reg_targets: bool,
}

impl FcosTargetConfig {
    /// The paper's sizes of interest for `strides` (from [`sizes_of_interest`] with
    /// `base = 64`), targets in pixels, and center sampling radius 1.5: the "imprv" /
    /// FCOS_PLUS improvement, not the ICCV paper's (nor the reference default's) 0.
    pub fn new(strides: &[usize]) -> Self {
        Self::with_base(strides, 64.0)
    }

    /// As [`FcosTargetConfig::new`] with the first level's upper size `base`; for small
    /// images use a smaller base (e.g. `8 * strides[0]` is the paper's; 16 for 64-pixel
    /// images with strides 8, 16, 32 spreads objects over all levels).
    pub fn with_base(strides: &[usize], base: f32) -> Self {
        Self {
            strides: strides.to_vec(),
            sizes_of_interest: sizes_of_interest(strides.len(), base),
            center_sampling_radius: 1.5,
            norm_reg_targets: false,
        }
    }

    fn validate(&self, op: &str) -> Result<()> {
        if self.strides.is_empty() || self.strides.contains(&0) {
            bail!(
                "{op}: strides {:?} must be non-empty and positive, e.g. [8, 16, 32, 64, 128]",
                self.strides
            )
        }
        if self.sizes_of_interest.len() != self.strides.len() {
            bail!("{op}: {} sizes of interest for {} strides; give one [lo, hi] per level (see fcos::sizes_of_interest)", self.sizes_of_interest.len(), self.strides.len())
        }
        if !(self.center_sampling_radius >= 0.0 && self.center_sampling_radius.is_finite()) {
            bail!(
                "{op}: center_sampling_radius ({}) must be finite and >= 0; FCOS uses 0 (ICCV paper) or 1.5 (FCOS_PLUS / imprv)",
                self.center_sampling_radius
            )
        }
        Ok(())
    }
}

/// The sizes of interest of `levels` levels, doubling from `base`: `[-1, base]`,
/// `[base, 2 base]`, ..., the last level's upper bound [`INF`]. `base = 64` with 5 levels is
/// the paper's `[-1,64],[64,128],[128,256],[256,512],[512,INF]`; with 3 levels (P3-P5) it is
/// `[-1,64],[64,128],[128,INF]` (the last level takes everything larger). Scale `base`
/// with the image size for small images.
pub fn sizes_of_interest(levels: usize, base: f32) -> Vec<(f32, f32)> {
    (0..levels)
        .map(|l| {
            let lo = if l == 0 {
                -1.0
            } else {
                base * (1u32 << (l - 1)) as f32
            };
            let hi = if l + 1 == levels {
                INF
            } else {
                base * (1u32 << l) as f32
            };
            (lo, hi)
        })
        .collect()
}

/// The locations of one level on the host, row-major, `(x, y)` each.
pub(crate) fn level_locations(h: usize, w: usize, stride: usize) -> Vec<[f32; 2]> {
    let half = (stride / 2) as f32;
    (0..h)
        .flat_map(|y| (0..w).map(move |x| [(x * stride) as f32 + half, (y * stride) as f32 + half]))
        .collect()
}

/// The anchor points of every level: `(H_l * W_l, 2)` f32 tensors of `(x, y)` in input
/// pixels, for feature sizes `(H_l, W_l)` and `strides` (FCOS's `compute_locations`).
///
/// ```
/// use candle::Device;
/// let locs = keel_det::fcos::compute_locations(&[(2, 3)], &[8], &Device::Cpu)?;
/// assert_eq!(locs[0].to_vec2::<f32>()?[4], [12.0, 12.0]); // x = 1, y = 1
/// # Ok::<(), candle::Error>(())
/// ```
pub fn compute_locations(
    feature_sizes: &[(usize, usize)],
    strides: &[usize],
    device: &Device,
) -> Result<Vec<Tensor>> {
    if feature_sizes.len() != strides.len() {
        bail!(
            "compute_locations: {} feature sizes for {} strides; give one stride per level",
            feature_sizes.len(),
            strides.len()
        )
    }
    feature_sizes
        .iter()
        .zip(strides)
        .map(|(&(h, w), &s)| {
            let flat: Vec<f32> = level_locations(h, w, s).into_iter().flatten().collect();
            Tensor::from_vec(flat, (h * w, 2), device)
        })
        .collect()
}

/// The targets of a batch, flattened level-first (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct FcosTargets {
    /// `(P,)` u32: 0 background, `k + 1` class `k`.
    pub labels: Tensor,
    /// `(P, 4)` f32 `(l, t, r, b)` distances to the assigned box (divided by the stride when
    /// `norm_reg_targets`).
    pub reg_targets: Tensor,
    /// `(P,)` f32 `sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))` at positives, 0 elsewhere.
    pub centerness: Tensor,
    /// The flat indices of the positive locations, increasing.
    pub pos_inds: Vec<u32>,
    /// `(H_l, W_l)` per level.
    pub feature_sizes: Vec<(usize, usize)>,
    /// The batch size.
    pub num_images: usize,
}

/// One location's candidate: the assigned box index and its area.
fn assign(p: [f32; 2], level: usize, gt: &GtBoxes, cfg: &FcosTargetConfig) -> Option<usize> {
    let (lo, hi) = cfg.sizes_of_interest[level];
    let radius = cfg.center_sampling_radius * cfg.strides[level] as f32;
    let mut best: Option<(usize, f32)> = None;
    for (j, b) in gt.boxes.iter().enumerate() {
        let inside = if cfg.center_sampling_radius > 0.0 {
            let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
            let region = [
                (cx - radius).max(b[0]),
                (cy - radius).max(b[1]),
                (cx + radius).min(b[2]),
                (cy + radius).min(b[3]),
            ];
            ltrb(p, &region)
                .iter()
                .copied()
                .fold(f32::INFINITY, f32::min)
                > 0.0
        } else {
            ltrb(p, b).iter().copied().fold(f32::INFINITY, f32::min) > 0.0
        };
        let max_reg = ltrb(p, b).iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !inside || max_reg < lo || max_reg > hi {
            continue;
        }
        // The reference's `BoxList.area()` (`TO_REMOVE = 1`): pixel-inclusive sides.
        let area = (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0);
        if best.is_none_or(|(_, a)| area < a) {
            best = Some((j, area));
        }
    }
    best.map(|(j, _)| j)
}

fn ltrb(p: [f32; 2], b: &[f32; 4]) -> [f32; 4] {
    [p[0] - b[0], p[1] - b[1], b[2] - p[0], b[3] - p[1]]
}

/// FCOS's centerness target of `(l, t, r, b)`.
pub(crate) fn centerness_target(r: [f32; 4]) -> f32 {
    let lr = r[0].min(r[2]) / r[0].max(r[2]);
    let tb = r[1].min(r[3]) / r[1].max(r[3]);
    (lr * tb).sqrt()
}

fn check_gt(op: &str, gts: &[GtBoxes]) -> Result<()> {
    for (i, gt) in gts.iter().enumerate() {
        if gt.boxes.len() != gt.classes.len() {
            bail!(
                "{op}: image {i} has {} boxes but {} class ids; give one class per box",
                gt.boxes.len(),
                gt.classes.len()
            )
        }
        if let Some(j) = gt.classes.iter().position(|&c| c == u32::MAX) {
            bail!("{op}: image {i} box {j} has class id u32::MAX; class ids are 0-based (the label is id + 1, 0 = background)")
        }
        for (j, b) in gt.boxes.iter().enumerate() {
            if !b.iter().all(|v| v.is_finite()) || b[2] < b[0] || b[3] < b[1] {
                bail!(
                    "{op}: image {i} box {j} {b:?} must be finite xyxy with x1 <= x2 and y1 <= y2"
                )
            }
        }
    }
    Ok(())
}

/// Assigns every location of a batch to a box or to the background (FCOS's
/// `prepare_targets`). `feature_sizes` are the `(H_l, W_l)` of the head's levels, `gts` one
/// entry per image.
///
/// # Errors
/// Levels that do not match `cfg`, boxes without a class, non-finite or inverted boxes.
///
/// ```
/// use keel_det::fcos::{prepare_targets, FcosTargetConfig, GtBoxes};
/// let gt = GtBoxes { boxes: vec![[0.0, 0.0, 16.0, 16.0]], classes: vec![2] };
/// let t = prepare_targets(&[(2, 2)], &[gt], &FcosTargetConfig::new(&[8]), &candle::Device::Cpu)?;
/// assert_eq!(t.labels.to_vec1::<u32>()?, [3, 3, 3, 3]);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn prepare_targets(
    feature_sizes: &[(usize, usize)],
    gts: &[GtBoxes],
    cfg: &FcosTargetConfig,
    device: &Device,
) -> Result<FcosTargets> {
    const OP: &str = "prepare_targets";
    cfg.validate(OP)?;
    if feature_sizes.len() != cfg.strides.len() {
        bail!(
            "{OP}: {} feature levels but {} strides in the config",
            feature_sizes.len(),
            cfg.strides.len()
        )
    }
    check_gt(OP, gts)?;
    let (mut labels, mut regs, mut ctrs, mut pos) = (vec![], vec![], vec![], vec![]);
    for (level, &(h, w)) in feature_sizes.iter().enumerate() {
        let stride = cfg.strides[level] as f32;
        let locs = level_locations(h, w, cfg.strides[level]);
        for gt in gts {
            for &p in &locs {
                let (label, mut r) = match assign(p, level, gt, cfg) {
                    Some(j) => (gt.classes[j] + 1, ltrb(p, &gt.boxes[j])),
                    None => (0, gt.boxes.first().map_or([0.0; 4], |b| ltrb(p, b))),
                };
                let c = if label > 0 { centerness_target(r) } else { 0.0 };
                if label > 0 {
                    pos.push(labels.len() as u32);
                }
                if cfg.norm_reg_targets {
                    r.iter_mut().for_each(|v| *v /= stride);
                }
                labels.push(label);
                regs.extend_from_slice(&r);
                ctrs.push(c);
            }
        }
    }
    let n = labels.len();
    Ok(FcosTargets {
        labels: Tensor::from_vec(labels, n, device)?,
        reg_targets: Tensor::from_vec(regs, (n, 4), device)?,
        centerness: Tensor::from_vec(ctrs, n, device)?,
        pos_inds: pos,
        feature_sizes: feature_sizes.to_vec(),
        num_images: gts.len(),
    })
}
