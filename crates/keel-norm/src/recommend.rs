//! keel's decision table as code: which norm to use for a given batch size and starting point.
//!
//! The evidence behind it:
//! - BatchNorm's error grows quickly below ~16 images per GPU, because it normalizes with the
//!   statistics of the batch; at batch 1-2 they are noise and train/eval disagree
//!   (Wu & He 2018, Group Normalization, Fig. 1; Ioffe 2017, Batch Renormalization).
//! - GroupNorm does not look at the batch, so its accuracy is flat across batch sizes
//!   (Wu & He 2018).
//! - Weight Standardization + GroupNorm closes most of the remaining gap to large-batch BN in
//!   micro-batch training, 1-2 images per GPU, on ImageNet and COCO schedules (Qiao et al.
//!   2019). keel's own experiment (`seg_train compare`, synthetic shapes, 1500 SGD steps,
//!   3 seeds; README "Results") did not reproduce that: WS+GN ended below plain GN at batch
//!   1, 2 and 8. So keel recommends plain GN and leaves WS+GN as an option to try.
//! - A pretrained backbone carries good BN statistics: detection fine-tuning freezes them
//!   (FrozenBatchNorm: Detectron, Detectron2, torchvision detection models) instead of
//!   re-estimating them from tiny batches.
use crate::NormKind;

/// The batch size from which trainable BatchNorm is a sound choice (per device).
pub const BN_MIN_BATCH: usize = 16;

/// Recommends a [`NormKind`] for training at `batch_size` images per device.
///
/// | starting point | batch 1-15 | batch >= 16 |
/// |---|---|---|
/// | from scratch | `gn` (`ws-gn` is an option to try) | `bn` |
/// | pretrained backbone (BN checkpoint) | `frozen-bn` | `bn` |
///
/// For a model with a separate new head (a pretrained backbone + a decoder), see
/// [`recommend_plan`]: `frozen-bn` backbone + `gn` head below batch 16.
///
/// Trainable BatchNorm is never recommended below [`BN_MIN_BATCH`] (and at batch 1 it cannot
/// train at all when the spatial size is 1). For a pretrained backbone, `gn` (converted with
/// [`crate::convert`]) is the alternative when the backbone must adapt its normalization, at
/// the price of losing the pretrained statistics. A `batch_size` of 0 is treated as 1.
///
/// ```
/// use keel_norm::{recommend, NormKind};
/// assert_eq!(recommend(1, false), NormKind::GroupNorm { groups: None });
/// assert_eq!(recommend(8, false), NormKind::GroupNorm { groups: None });
/// assert_eq!(recommend(2, true), NormKind::FrozenBatchNorm);
/// assert_eq!(recommend(64, false), NormKind::BatchNorm);
/// ```
pub fn recommend(batch_size: usize, pretrained_backbone: bool) -> NormKind {
    let batch = batch_size.max(1);
    match (pretrained_backbone, batch) {
        (_, b) if b >= BN_MIN_BATCH => NormKind::BatchNorm,
        (true, _) => NormKind::FrozenBatchNorm,
        (false, _) => NormKind::GroupNorm { groups: None },
    }
}

/// The norms of a model made of a backbone and a new head (a decoder, a classifier), as
/// [`recommend_plan`] picks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormPlan {
    /// The backbone's norm.
    pub backbone: NormKind,
    /// The new head's norm (the head always trains from scratch).
    pub head: NormKind,
}

/// [`recommend`] for a backbone + head model: the backbone by its starting point, the head
/// (new, so from scratch) by the batch size alone.
///
/// | starting point | batch 1-15 | batch >= 16 |
/// |---|---|---|
/// | from scratch | backbone `gn`, head `gn` | `bn`, `bn` |
/// | pretrained backbone (BN checkpoint) | backbone `frozen-bn`, head `gn` | `bn`, `bn` |
///
/// The pretrained row is the fine-tuning practice of Detectron/detectron2 and torchvision's
/// detection models: keep the pretrained BatchNorm statistics frozen rather than
/// re-estimating them from 1-15 images, and normalize the new head with GroupNorm, which
/// does not depend on the batch (Wu & He 2018, Sec. 6). Converting the backbone to `gn`
/// ([`crate::convert`]) is the alternative when the backbone must adapt its normalization.
///
/// ```
/// use keel_norm::{recommend_plan, NormKind, NormPlan};
/// let gn = NormKind::GroupNorm { groups: None };
/// assert_eq!(recommend_plan(2, true), NormPlan { backbone: NormKind::FrozenBatchNorm, head: gn });
/// assert_eq!(recommend_plan(2, false), NormPlan { backbone: gn, head: gn });
/// assert_eq!(recommend_plan(32, true).backbone, NormKind::BatchNorm);
/// ```
pub fn recommend_plan(batch_size: usize, pretrained_backbone: bool) -> NormPlan {
    NormPlan {
        backbone: recommend(batch_size, pretrained_backbone),
        head: recommend(batch_size, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pretrained_backbone_at_small_batch_gets_frozen_bn_and_a_gn_head() {
        let gn = NormKind::GroupNorm { groups: None };
        for b in [0, 1, 2, 8, 15] {
            let want = NormPlan {
                backbone: NormKind::FrozenBatchNorm,
                head: gn,
            };
            assert_eq!(recommend_plan(b, true), want, "batch {b}");
            assert_eq!(
                recommend_plan(b, false),
                NormPlan {
                    backbone: gn,
                    head: gn
                }
            );
        }
        for b in [16, 64] {
            let bn = NormPlan {
                backbone: NormKind::BatchNorm,
                head: NormKind::BatchNorm,
            };
            assert_eq!(recommend_plan(b, true), bn, "batch {b}");
            assert_eq!(recommend_plan(b, false), bn, "batch {b}");
        }
    }
}
