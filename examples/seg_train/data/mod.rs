//! Data: the built-in synthetic shapes set (default, [`shapes`]), Pascal VOC layout on disk
//! (`--data-dir`, [`voc`]), and a deterministic batch loader on background threads with a
//! bounded prefetch queue ([`loader`]).
//!
//! Everything random is derived from `(seed, position)`, never from a running RNG: the
//! sample order of epoch `e` is a permutation seeded by `(seed, e)` and the augmentation of
//! the `g`-th sample drawn is seeded by `(seed, g)`. A resumed run therefore needs only the
//! step to draw exactly the batches an uninterrupted run would.
use image::{GrayImage, RgbImage};
use rand_chacha::ChaCha8Rng;

mod loader;
mod shapes;
mod voc;

pub use loader::{eval_batches, Loader, LoaderConfig};
pub use shapes::{Shapes, SHAPES_TRAIN_SEED, SHAPES_VAL_SEED};
pub use voc::Voc;

/// The label of pixels that the loss and the metrics skip.
pub const IGNORE: u8 = 255;

/// Class names of the synthetic set (index = class id).
pub const SHAPE_CLASSES: [&str; 5] = ["background", "circle", "rectangle", "triangle", "ring"];

/// Per-channel normalization applied to images in [0, 1] (ImageNet statistics).
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// One image (RGB, row-major HWC) and its mask (class ids, 255 = ignore).
#[derive(Clone, Debug)]
pub struct Sample {
    pub image: RgbImage,
    pub mask: GrayImage,
}

/// A set of samples that can be loaded by index, possibly with augmentation.
pub trait Source: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Sample `idx` as `size x size`; `aug` = the augmentation RNG (training) or `None`
    /// (evaluation: deterministic resize and padding).
    fn load(&self, idx: usize, size: usize, aug: Option<&mut ChaCha8Rng>)
        -> anyhow::Result<Sample>;
}

/// Splitmix64 finalizer: decorrelates seeds derived from `(seed, a, b)`.
pub fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed
        .wrapping_add(a.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(b.wrapping_mul(0xD1B5_4A32_D192_ED03))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A batch on the host: normalized images `(n, 3, size, size)` CHW and targets
/// `(n, size, size)` (class ids, 255 = ignore).
pub struct HostBatch {
    pub n: usize,
    pub size: usize,
    pub images: Vec<f32>,
    pub targets: Vec<u32>,
}

impl HostBatch {
    pub fn from_samples(samples: &[Sample], size: usize) -> Self {
        let hw = size * size;
        let mut images = Vec::with_capacity(samples.len() * 3 * hw);
        let mut targets = Vec::with_capacity(samples.len() * hw);
        for s in samples {
            for c in 0..3 {
                images.extend(
                    s.image
                        .pixels()
                        .map(|p| (p.0[c] as f32 / 255.0 - MEAN[c]) / STD[c]),
                );
            }
            targets.extend(s.mask.as_raw().iter().map(|&v| v as u32));
        }
        Self {
            n: samples.len(),
            size,
            images,
            targets,
        }
    }

    /// `(images (n, 3, s, s) f32, targets (n, s, s) u32)` on `dev`.
    pub fn to_tensors(
        &self,
        dev: &candle::Device,
    ) -> candle::Result<(candle::Tensor, candle::Tensor)> {
        let x = candle::Tensor::from_slice(&self.images, (self.n, 3, self.size, self.size), dev)?;
        let t = candle::Tensor::from_slice(&self.targets, (self.n, self.size, self.size), dev)?;
        Ok((x, t))
    }
}
