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
