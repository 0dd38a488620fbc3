//! The synthetic detection set: the segmentation set's shapes (see [`crate::Shapes`]) with
//! boxes, more objects per image and small ones. Deterministic per `(seed, index)`.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::shapes::{random_shape, Canvas};
use crate::{mix, DetSample, DetSource};

/// Class names of the synthetic detection set (index = class id; no background class).
pub const DET_SHAPE_CLASSES: [&str; 4] = ["circle", "rectangle", "triangle", "ring"];

/// The synthetic detection set: `n` images of `size x size` on the segmentation set's
/// backgrounds (noisy gradients with unlabeled clutter strokes), each with 1-6 circles,
/// rectangles, triangles and rings (classes [`DET_SHAPE_CLASSES`], equally likely) that
/// may overlap.
///
/// Sizes: an object's radius is `U(0.03, 0.08) * size` with probability 1/3 (small
/// objects: 8-20 px wide at 128x128) and `U(0.08, 0.22) * size` otherwise. An object's
/// box is the extent of its visible pixels (those no later object covers); an object with
/// fewer than 4 visible pixels, or less than a quarter of its own area visible, is left
/// unlabeled (it stays in the image as clutter).
pub struct DetShapes {
    samples: Vec<DetSample>,
    names: Vec<String>,
}

impl DetShapes {
    /// Renders `n` samples of `size x size`; sample `i` is [`DetShapes::render`]`(size,
    /// seed, i)`.
    pub fn generate(n: usize, size: usize, seed: u64) -> Self {
        Self {
            samples: (0..n).map(|i| Self::render(size, seed, i)).collect(),
            names: DET_SHAPE_CLASSES.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Sample `idx` of the set seeded by `seed`, at `size x size`.
    pub fn render(size: usize, seed: u64, idx: usize) -> DetSample {
        let rng = &mut ChaCha8Rng::seed_from_u64(mix(seed, idx as u64, 1));
        let s = size as f32;
        let mut canvas = Canvas::background(size, rng);
        let count = rng.random_range(1..=6usize);
        let mut owner = vec![usize::MAX; size * size];
        let mut area = vec![0usize; count];
        let mut classes = Vec::with_capacity(count);
        for (k, a) in area.iter_mut().enumerate() {
            let radius = if rng.random_bool(1.0 / 3.0) {
                0.03..0.08
            } else {
                0.08..0.22
            };
            let shape = random_shape(rng, s, radius);
            classes.push(shape.class() as u32 - 1);
            canvas.paint(&shape, rng, |i| {
                owner[i] = k;
                *a += 1;
            });
        }
        // Visible extent of each object: (x0, y0, x1, y1, pixels).
        let mut ext = vec![(usize::MAX, usize::MAX, 0, 0, 0usize); count];
        for (i, &k) in owner.iter().enumerate() {
            if k != usize::MAX {
                let (x, y) = (i % size, i / size);
                let e = &mut ext[k];
                *e = (
                    e.0.min(x),
                    e.1.min(y),
                    e.2.max(x + 1),
                    e.3.max(y + 1),
                    e.4 + 1,
                );
            }
        }
        let mut out = DetSample {
            image: canvas.finish(rng),
            boxes: Vec::new(),
            classes: Vec::new(),
            ignore: Vec::new(),
        };
        for ((&(x0, y0, x1, y1, vis), &a), &class) in ext.iter().zip(&area).zip(&classes) {
            if vis >= 4 && vis * 4 >= a {
                out.boxes.push([x0 as f32, y0 as f32, x1 as f32, y1 as f32]);
                out.classes.push(class);
                out.ignore.push(false);
            }
        }
        out
    }

    /// The samples at their generated size, in order.
    pub fn samples(&self) -> &[DetSample] {
        &self.samples
    }
}

impl DetSource for DetShapes {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn class_names(&self) -> &[String] {
        &self.names
    }

    fn decode(&self, idx: usize) -> candle::Result<DetSample> {
        match self.samples.get(idx) {
            Some(s) => Ok(s.clone()),
            None => candle::bail!(
                "DetShapes::decode: sample {idx} is out of range (the set has {})",
                self.samples.len()
            ),
        }
    }

    fn read(&self, idx: usize) -> (Option<DetSample>, Vec<String>) {
        match self.decode(idx) {
            Ok(s) => (Some(s), vec![]),
            Err(e) => (None, vec![e.to_string()]),
        }
    }
}
