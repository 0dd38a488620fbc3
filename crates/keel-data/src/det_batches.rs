//! Detection batches for a training loop, deterministic per `(seed, position)` like
//! [`crate::Loader`]'s: micro-batch `m` holds the samples drawn at positions
//! `m * batch .. (m + 1) * batch` by [`draw`] (an epoch permutation seeded by
//! `(seed, epoch)`, an augmentation seeded by `(seed, position)`), so a resumed run draws
//! exactly the batches an uninterrupted one would. Made on the calling thread.
use std::sync::Arc;

use candle::bail;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{draw, DetAugment, DetHostBatch, DetSource, Pad};

/// The training batches of a detection set: micro-batch `m` holds the samples drawn at
/// positions `m * batch .. (m + 1) * batch` by [`draw`], so batches depend only on
/// `(seed, position)` and a resumed run draws exactly those of an uninterrupted one.
///
/// ```
/// use std::sync::Arc;
/// use keel_data::{DetAugment, DetBatches, DetShapes, Pad, Resize};
/// # fn main() -> candle::Result<()> {
/// let set = Arc::new(DetShapes::generate(10, 32, 1));
/// let aug = DetAugment { resize: Resize::None, flip: true };
/// let mut a = DetBatches::new(set.clone(), aug, Pad::ToMax, 7, 2)?;
/// let mut b = DetBatches::new(set, aug, Pad::ToMax, 7, 2)?;
/// let first = a.batch(0)?;
/// let _ = a.batch(1)?;
/// // Batch 5 (epoch 1) is the same whether batches 0-4 were drawn or not.
/// assert_eq!(a.batch(5)?.boxes, b.batch(5)?.boxes);
/// assert_eq!((first.n, first.height, first.width), (2, 32, 32));
/// # Ok(()) }
/// ```
pub struct DetBatches {
    source: Arc<dyn DetSource>,
    augment: DetAugment,
    pad: Pad,
    seed: u64,
    batch: usize,
    perm: Option<(usize, Vec<usize>)>,
}

impl DetBatches {
    /// Batches of `batch` samples of `source`, transformed by `augment` (flips drawn from
    /// the sample's augmentation seed) and padded by `pad`.
    ///
    /// # Errors
    /// An empty source or `batch` 0.
    pub fn new(
        source: Arc<dyn DetSource>,
        augment: DetAugment,
        pad: Pad,
        seed: u64,
        batch: usize,
    ) -> candle::Result<Self> {
        if source.is_empty() || batch == 0 {
            bail!(
                "DetBatches: need a non-empty set and a batch of at least 1 (the set has {} samples, batch {batch})",
                source.len()
            )
        }
        Ok(Self {
            source,
            augment,
            pad,
            seed,
            batch,
            perm: None,
        })
    }

    /// Micro-batch `m`.
    ///
    /// # Errors
    /// A sample that fails to decode (naming its file and annotation), or a padding the
    /// images do not fit.
    pub fn batch(&mut self, m: usize) -> candle::Result<DetHostBatch> {
        let len = self.source.len();
        let samples = (0..self.batch)
            .map(|i| {
                let (idx, aug_seed) = draw(self.seed, len, m * self.batch + i, &mut self.perm);
                let rng = &mut ChaCha8Rng::seed_from_u64(aug_seed);
                self.source.load(idx, &self.augment, Some(rng))
            })
            .collect::<candle::Result<Vec<_>>>()?;
        DetHostBatch::collate(&samples, self.pad)
    }
}

/// The evaluation batches of `source` in order, `batch` samples each (the last may be
/// smaller), transformed by `augment` without flips: `(first sample index, batch)`.
pub fn det_eval_batches<'a>(
    source: &'a dyn DetSource,
    augment: DetAugment,
    pad: Pad,
    batch: usize,
) -> impl Iterator<Item = candle::Result<(usize, DetHostBatch)>> + 'a {
    let batch = batch.max(1);
    (0..source.len()).step_by(batch).map(move |start| {
        let end = (start + batch).min(source.len());
        let samples = (start..end)
            .map(|i| source.load(i, &augment, None))
            .collect::<candle::Result<Vec<_>>>()?;
        Ok((start, DetHostBatch::collate(&samples, pad)?))
    })
}
