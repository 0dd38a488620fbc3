//! The data of a segmentation run in one value: the train and val [`Source`]s and the class
//! names, either the synthetic [`Shapes`] (train and val generated from their fixed seeds)
//! or a Pascal VOC folder's `train` and `val` splits, validated in full before training.
use std::path::Path;
use std::sync::Arc;

use crate::{validate, Shapes, Source, Voc, SHAPES_TRAIN_SEED, SHAPES_VAL_SEED, SHAPE_CLASSES};

/// A run's train and val sets and the names of their classes.
#[derive(Clone)]
pub struct Sources {
    /// The training set.
    pub train: Arc<dyn Source>,
    /// The validation set.
    pub val: Arc<dyn Source>,
    /// One name per class id.
    pub classes: Vec<String>,
}

impl Sources {
    /// The synthetic shapes: `train_size` and `val_size` images of `image_size` pixels,
    /// from [`SHAPES_TRAIN_SEED`] and [`SHAPES_VAL_SEED`]; the classes of [`SHAPE_CLASSES`].
    ///
    /// ```
    /// let s = keel_data::Sources::shapes(4, 2, 32);
    /// assert_eq!((s.train.len(), s.val.len(), s.classes.len()), (4, 2, 5));
    /// ```
    pub fn shapes(train_size: usize, val_size: usize, image_size: usize) -> Self {
        Self {
            train: Arc::new(Shapes::generate(train_size, image_size, SHAPES_TRAIN_SEED)),
            val: Arc::new(Shapes::generate(val_size, image_size, SHAPES_VAL_SEED)),
            classes: SHAPE_CLASSES.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The `train` and `val` splits of the Pascal VOC folder `root` with `num_classes`
    /// classes (named `class0`, `class1`, ...), every image/mask pair decoded first (see
    /// [`validate`]): the error lists all bad files at once. `progress` is called once per
    /// pair checked, with the number of pairs to check.
    pub fn voc(
        root: &Path,
        num_classes: usize,
        progress: Option<&(dyn Fn(usize) + Sync)>,
    ) -> candle::Result<Self> {
        let (train, val) = (
            Voc::open(root, "train", num_classes)?,
            Voc::open(root, "val", num_classes)?,
        );
        let total = train.len() + val.len();
        let tick = || {
            if let Some(p) = progress {
                p(total)
            }
        };
        validate(&[&train, &val], Some(&tick))?;
        Ok(Self {
            train: Arc::new(train),
            val: Arc::new(val),
            classes: (0..num_classes).map(|i| format!("class{i}")).collect(),
        })
    }
}
