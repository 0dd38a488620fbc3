//! The segmentation sample, the [`Source`] trait every segmentation set implements, the
//! host-side batch and the seed mixer all randomness derives from.
use image::imageops::{self, FilterType};
use image::{GrayImage, RgbImage};
use rand_chacha::ChaCha8Rng;

/// The label of pixels that the loss and the metrics skip.
pub const IGNORE: u8 = 255;

/// Per-channel normalization applied to images in [0, 1] (ImageNet statistics).
pub(crate) const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub(crate) const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// One image (RGB, row-major HWC) and its mask (class ids, 255 = ignore).
#[derive(Clone, Debug)]
pub struct Sample {
    /// The image.
    pub image: RgbImage,
    /// The class id of every pixel of `image` ([`IGNORE`] = no label).
    pub mask: GrayImage,
}

impl Sample {
    /// The sample at `w x h`: the image resized bilinearly (triangle filter), the mask by
    /// nearest neighbour (class ids stay class ids).
    pub fn resized(&self, w: u32, h: u32) -> Sample {
        Sample {
            image: imageops::resize(&self.image, w, h, FilterType::Triangle),
            mask: imageops::resize(&self.mask, w, h, FilterType::Nearest),
        }
    }

    /// Mirrors image and mask left-right.
    pub fn flip_horizontal(&mut self) {
        imageops::flip_horizontal_in_place(&mut self.image);
        imageops::flip_horizontal_in_place(&mut self.mask);
    }
}

/// A segmentation set that can be loaded by index, possibly with augmentation. (Detection
/// sets, with boxes instead of masks, get a source trait of their own.)
pub trait Source: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether the set has no sample.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `idx` as `size x size`; `aug` = the augmentation RNG (training) or `None`
    /// (evaluation: deterministic resize and padding).
    fn load(&self, idx: usize, size: usize, aug: Option<&mut ChaCha8Rng>)
        -> candle::Result<Sample>;
    /// Whether [`Source::load`] only copies from memory (no decoding), so that one loader
    /// thread keeps ahead of any step ([`crate::Workers::Auto`] then uses one). `false`
    /// unless the source says so.
    fn in_memory(&self) -> bool {
        false
    }
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
    /// Number of samples.
    pub n: usize,
    /// Side of every (square) image.
    pub size: usize,
    /// `n * 3 * size * size` values: `(pixel / 255 - mean) / std` per channel, ImageNet
    /// statistics, CHW per sample.
    pub images: Vec<f32>,
    /// `n * size * size` class ids.
    pub targets: Vec<u32>,
}

impl HostBatch {
    /// Normalizes and stacks `samples`, each `size x size`.
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
