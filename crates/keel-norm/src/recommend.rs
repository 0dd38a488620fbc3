//! keel's decision table as code: which norm to use for a given batch size and starting point.
//!
//! The evidence behind it:
//! - BatchNorm's error grows quickly below ~16 images per GPU, because it normalizes with the
//!   statistics of the batch; at batch 1-2 they are noise and train/eval disagree
//!   (Wu & He 2018, Group Normalization, Fig. 1; Ioffe 2017, Batch Renormalization).
//! - GroupNorm does not look at the batch, so its accuracy is flat across batch sizes
//!   (Wu & He 2018).
//! - Weight Standardization + GroupNorm closes most of the remaining gap to large-batch BN in
//!   micro-batch training, 1-2 images per GPU (Qiao et al. 2019).
//! - A pretrained backbone carries good BN statistics: detection fine-tuning freezes them
//!   (FrozenBatchNorm: Detectron, Detectron2, torchvision detection models) instead of
//!   re-estimating them from tiny batches.
use crate::NormKind;

/// The batch size from which trainable BatchNorm is a sound choice (per device).
pub const BN_MIN_BATCH: usize = 16;

/// The largest batch at which keel recommends Weight Standardization on top of GroupNorm for
/// a model trained from scratch.
pub const WS_MAX_BATCH: usize = 2;

/// Recommends a [`NormKind`] for training at `batch_size` images per device.
///
/// | starting point | batch 1-2 | batch 3-15 | batch >= 16 |
/// |---|---|---|---|
/// | from scratch | `ws-gn` | `gn` | `bn` |
/// | pretrained backbone (BN checkpoint) | `frozen-bn` | `frozen-bn` | `bn` |
///
/// Trainable BatchNorm is never recommended below [`BN_MIN_BATCH`] (and at batch 1 it cannot
/// train at all when the spatial size is 1). For a pretrained backbone, `gn` (converted with
/// [`crate::convert`]) is the alternative when the backbone must adapt its normalization, at
/// the price of losing the pretrained statistics. A `batch_size` of 0 is treated as 1.
///
/// ```
/// use keel_norm::{recommend, NormKind};
/// assert_eq!(recommend(1, false), NormKind::WsGroupNorm { groups: None });
/// assert_eq!(recommend(8, false), NormKind::GroupNorm { groups: None });
/// assert_eq!(recommend(2, true), NormKind::FrozenBatchNorm);
/// assert_eq!(recommend(64, false), NormKind::BatchNorm);
/// ```
pub fn recommend(batch_size: usize, pretrained_backbone: bool) -> NormKind {
    let batch = batch_size.max(1);
    match (pretrained_backbone, batch) {
        (_, b) if b >= BN_MIN_BATCH => NormKind::BatchNorm,
        (true, _) => NormKind::FrozenBatchNorm,
        (false, b) if b <= WS_MAX_BATCH => NormKind::WsGroupNorm { groups: None },
        (false, _) => NormKind::GroupNorm { groups: None },
    }
}
