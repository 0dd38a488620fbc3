//! # keel-data: deterministic data for keel's training loops
//!
//! Segmentation sources behind one [`Source`] trait, and the batch stream that feeds a
//! loop:
//!
//! - [`Shapes`]: a synthetic set generated in memory (circles, rectangles, triangles and
//!   rings on noisy, cluttered backgrounds; class names in [`SHAPE_CLASSES`]), no download;
//!   [`ShapesConfig`] sets the shapes per image, their radius and their textures.
//! - [`Voc`]: a Pascal VOC style folder (JPEG images, palette / grayscale / RGB masks), and
//!   [`validate`], which decodes every image/mask pair in parallel before training and
//!   reports all bad files at once (truncated images, size mismatches, 16-bit masks, class
//!   ids out of range).
//! - [`Loader`]: micro-batches made on background threads with a bounded prefetch queue,
//!   configured by a [`LoaderConfig`]; [`eval_batches`] for evaluation.
//! - [`Sources`]: a run's train and val sets and class names in one value (the shapes, or a
//!   VOC folder's `train`/`val` splits validated up front).
//!
//! Everything random is derived from `(seed, position)`, never from a running RNG: the
//! sample order of epoch `e` is a permutation seeded by `(seed, e)` and the augmentation of
//! the `g`-th sample drawn is seeded by `(seed, g)` ([`mix`], [`draw`]). A resumed run
//! therefore needs only the step to draw exactly the batches an uninterrupted run would,
//! whatever the number of workers.
//!
//! Masks hold class ids; [`IGNORE`] (255) marks pixels the loss and the metrics skip.
//! Detection sets (boxes instead of masks) implement [`DetSource`]: [`DetShapes`] (synthetic,
//! the default), [`VocDet`] (Pascal VOC XML) and [`CocoDet`] (COCO JSON), checked up front by
//! [`validate_det`], transformed with their boxes by [`DetAugment`] and batched by
//! [`DetHostBatch::collate`]; [`DetBatches`] draws a loop's batches per `(seed, position)`
//! and [`det_eval_batches`] walks a set in order.
//!
//! ```
//! use std::sync::Arc;
//! use candle::Device;
//! use keel_data::{Loader, LoaderConfig, Shapes, SHAPES_TRAIN_SEED};
//! # fn main() -> candle::Result<()> {
//! let train = Arc::new(Shapes::generate(16, 32, SHAPES_TRAIN_SEED));
//! let cfg = LoaderConfig { batch: 2, size: 32, seed: 0, start: 0, end: 4, workers: 2, prefetch: 2 };
//! let first: Vec<Vec<u32>> = Loader::new(train.clone(), cfg)
//!     .map(|b| Ok(b?.targets))
//!     .collect::<candle::Result<_>>()?;
//! // Resuming at micro-batch 2 with one worker draws the same batches 2 and 3.
//! let resumed = Loader::new(train, LoaderConfig { start: 2, workers: 1, ..cfg });
//! for (m, b) in resumed.enumerate() {
//!     let (images, targets) = b?.to_tensors(&Device::Cpu)?;
//!     assert_eq!(images.dims(), &[2, 3, 32, 32]);
//!     assert_eq!(targets.flatten_all()?.to_vec1::<u32>()?, first[m + 2]);
//! }
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod check;
mod coco_det;
mod det;
mod det_batches;
mod det_shapes;
mod loader;
mod sample;
mod shapes;
mod sources;
mod voc;
mod voc_det;
mod workers;

pub use check::{validate, BadSample, MAX_LISTED};
pub use coco_det::CocoDet;
pub use det::{
    validate_det, DetAugment, DetBatch, DetHostBatch, DetSample, DetSource, Pad, Resize,
};
pub use det_batches::{det_eval_batches, DetBatches};
pub use det_shapes::{DetShapes, DET_SHAPE_CLASSES};
pub use loader::{draw, eval_batches, Loader, LoaderConfig};
pub use sample::{mix, HostBatch, Sample, Source, IGNORE};
pub use shapes::{Shapes, ShapesConfig, SHAPES_TRAIN_SEED, SHAPES_VAL_SEED, SHAPE_CLASSES};
pub use sources::Sources;
pub use voc::Voc;
pub use voc_det::{VocDet, VOC_CLASSES};
pub use workers::Workers;
