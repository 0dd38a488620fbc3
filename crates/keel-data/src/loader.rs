//! The training batch stream (deterministic per `(seed, position)`, made on background
//! threads) and the evaluation batches.
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{mix, HostBatch, Source};

/// The dataset index and augmentation seed of the `g`-th training sample drawn from a set
/// of `len` samples: epoch `g / len` visits the set in a permutation seeded by
/// `(seed, epoch)`, and the augmentation seed is `mix(seed, g, 2)`. `perm_cache` keeps the
/// last epoch's permutation between calls.
pub fn draw(
    seed: u64,
    len: usize,
    g: usize,
    perm_cache: &mut Option<(usize, Vec<usize>)>,
) -> (usize, u64) {
    let epoch = g / len;
    if perm_cache.as_ref().map(|(e, _)| *e) != Some(epoch) {
        let mut perm: Vec<usize> = (0..len).collect();
        perm.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(seed, epoch as u64, 1)));
        *perm_cache = Some((epoch, perm));
    }
    let perm = &perm_cache.as_ref().expect("just set").1;
    (perm[g % len], mix(seed, g as u64, 2))
}

/// Training batches `start..end` (micro-batch indices) of `batch` samples each, made by
/// `workers` background threads into bounded queues of `prefetch` batches per worker.
/// Batch `m` is identical whatever `start`, `workers` and `prefetch` are.
pub struct Loader {
    queues: Vec<Receiver<candle::Result<HostBatch>>>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
    end: usize,
}

/// What a [`Loader`] streams: micro-batches `start..end` of `batch` samples of `size`,
/// drawn from `seed`'s sample order, made by `workers` threads with `prefetch` batches
/// queued each.
#[derive(Clone, Copy, Debug)]
pub struct LoaderConfig {
    /// Samples per micro-batch.
    pub batch: usize,
    /// Side of every (square) sample.
    pub size: usize,
    /// The seed of the sample order and the augmentation.
    pub seed: u64,
    /// The first micro-batch (a resumed run starts past 0).
    pub start: usize,
    /// One past the last micro-batch.
    pub end: usize,
    /// Background threads (0 counts as 1).
    pub workers: usize,
    /// Batches each worker may queue ahead (0 counts as 1).
    pub prefetch: usize,
}

impl Loader {
    /// Starts the workers. Errors while loading arrive as the stream's items; a worker stops
    /// after its first error.
    pub fn new(source: Arc<dyn Source>, cfg: LoaderConfig) -> Self {
        let LoaderConfig {
            batch,
            size,
            seed,
            start,
            end,
            ..
        } = cfg;
        let workers = cfg.workers.max(1);
        let mut queues = Vec::new();
        let mut handles = Vec::new();
        for k in 0..workers {
            let (tx, rx) = sync_channel(cfg.prefetch.max(1));
            let source = source.clone();
            handles.push(std::thread::spawn(move || {
                let mut cache = None;
                let mut m = start + (k + workers - start % workers) % workers;
                while m < end {
                    let res = (0..batch)
                        .map(|i| {
                            let (idx, aug_seed) =
                                draw(seed, source.len(), m * batch + i, &mut cache);
                            source.load(idx, size, Some(&mut ChaCha8Rng::seed_from_u64(aug_seed)))
                        })
                        .collect::<candle::Result<Vec<_>>>()
                        .map(|s| HostBatch::from_samples(&s, size));
                    let failed = res.is_err();
                    if tx.send(res).is_err() || failed {
                        return; // the consumer is gone, or the error is delivered
                    }
                    m += workers;
                }
            }));
            queues.push(rx);
        }
        Self {
            queues,
            handles,
            next: start,
            end,
        }
    }
}

impl Iterator for Loader {
    type Item = candle::Result<HostBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let q = &self.queues[self.next % self.queues.len()];
        self.next += 1;
        Some(
            q.recv()
                .map_err(|_| candle::Error::Msg("Loader: a data loader thread died".into()))
                .and_then(|r| r),
        )
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.queues.clear(); // unblocks the workers' sends
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The evaluation batches of `source` (no augmentation), in order.
pub fn eval_batches(
    source: &dyn Source,
    batch: usize,
    size: usize,
) -> impl Iterator<Item = candle::Result<HostBatch>> + '_ {
    (0..source.len().div_ceil(batch)).map(move |b| {
        let samples = (b * batch..((b + 1) * batch).min(source.len()))
            .map(|i| source.load(i, size, None))
            .collect::<candle::Result<Vec<_>>>()?;
        Ok(HostBatch::from_samples(&samples, size))
    })
}
