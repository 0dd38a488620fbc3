//! The run's detection data: the synthetic DetShapes (deterministic by seed) or a
//! `--data-dir` in VOC or COCO layout, validated in full before anything is written.
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use keel::data::{validate_det, CocoDet, DetAugment, DetShapes, DetSource, Pad, Resize, VocDet};
use keel::data::{SHAPES_TRAIN_SEED, SHAPES_VAL_SEED};
use keel::train::progress_bar;

use super::cli::{DataFormat, DetConfig};

/// A run's train and val sets.
pub struct DetData {
    pub train: Arc<dyn DetSource>,
    pub val: Arc<dyn DetSource>,
    pub classes: Vec<String>,
}

/// The resize every image goes through (training adds a horizontal flip): square
/// `image_size`, the batch's padding then does nothing.
pub fn augment(cfg: &DetConfig, train: bool) -> DetAugment {
    let s = cfg.image_size as u32;
    DetAugment {
        resize: Resize::Fixed {
            width: s,
            height: s,
        },
        flip: train,
    }
}

/// The padding of a batch (every image is resized to the square first).
pub const PAD: Pad = Pad::ToMax;

fn open(dir: &Path, format: DataFormat, split: &str) -> candle::Result<Arc<dyn DetSource>> {
    Ok(match format {
        DataFormat::Voc => Arc::new(VocDet::open(dir, split)?),
        DataFormat::Coco => {
            let json = dir
                .join("annotations")
                .join(format!("instances_{split}.json"));
            Arc::new(CocoDet::open(&json, &dir.join(split))?)
        }
    })
}

impl DetData {
    /// The config's sets; a `--data-dir` is checked sample by sample first (every bad file
    /// and annotation named at once).
    pub fn new(cfg: &DetConfig, progress: bool) -> anyhow::Result<Self> {
        let Some(dir) = &cfg.data_dir else {
            let train: Arc<dyn DetSource> = Arc::new(DetShapes::generate(
                cfg.train_size,
                cfg.image_size,
                SHAPES_TRAIN_SEED,
            ));
            let val = Arc::new(DetShapes::generate(
                cfg.val_size,
                cfg.image_size,
                SHAPES_VAL_SEED,
            ));
            let classes = train.class_names().to_vec();
            return Ok(Self {
                train,
                val,
                classes,
            });
        };
        let ctx = || format!("--data-dir {} (--format {:?})", dir.display(), cfg.format);
        let train = open(dir, cfg.format, &cfg.train_split).with_context(ctx)?;
        let val = open(dir, cfg.format, &cfg.val_split).with_context(ctx)?;
        if train.class_names() != val.class_names() {
            anyhow::bail!(
                "{}: the {} and {} splits name different classes ({:?} vs {:?})",
                ctx(),
                cfg.train_split,
                cfg.val_split,
                train.class_names(),
                val.class_names()
            )
        }
        let pb = progress_bar(progress, train.len() + val.len(), 0);
        pb.set_message("checking --data-dir");
        let tick = || pb.inc(1);
        let res = validate_det(&[train.as_ref(), val.as_ref()], Some(&tick));
        pb.finish_and_clear();
        res.with_context(ctx)?;
        let classes = train.class_names().to_vec();
        Ok(Self {
            train,
            val,
            classes,
        })
    }
}
