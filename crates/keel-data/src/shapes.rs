//! The synthetic shapes set: generated in memory, deterministic per seed.
use image::{GrayImage, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{mix, Sample, Source};

/// The synthetic shapes set: `n` images of `size x size`, generated in memory from
/// `seed`: noisy gradient backgrounds with unlabeled clutter strokes, 1-3 overlapping
/// circles, rectangles, triangles and rings of random size, position, rotation, colour and
/// texture (solid, stripes, checker, speckle), with exact masks (a pixel belongs to the
/// last shape that covers its centre).
pub struct Shapes {
    samples: Vec<Sample>,
}

/// Class names of the synthetic set (index = class id).
pub const SHAPE_CLASSES: [&str; 5] = ["background", "circle", "rectangle", "triangle", "ring"];

/// The seed of the synthetic training set. Train and val seeds are fixed: every run (and
/// every training seed) sees the same data, so seeds compare training, not data sets.
pub const SHAPES_TRAIN_SEED: u64 = 0x5eed_7a1a;
/// The seed of the synthetic validation set (see [`SHAPES_TRAIN_SEED`]).
pub const SHAPES_VAL_SEED: u64 = 0x5eed_0fa1;

/// How [`Shapes::generate_with`] renders an image: how many shapes and how large. The
/// default is the segmentation set's (1-3 shapes of radius 0.10-0.25 of the side), so
/// `generate_with(.., ShapesConfig::default())` is [`Shapes::generate`], image for image.
///
/// ```
/// use keel_data::{Shapes, ShapesConfig};
/// // One large shape per image (an easy classification signal).
/// let cfg = ShapesConfig { max_shapes: 1, min_radius: 0.25, max_radius: 0.4, ..Default::default() };
/// let set = Shapes::generate_with(4, 32, 7, cfg)?;
/// assert_eq!(set.samples().len(), 4);
/// assert!(ShapesConfig { min_shapes: 0, ..cfg }.validate().is_err());
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShapesConfig {
    /// The fewest shapes in an image (>= 1).
    pub min_shapes: usize,
    /// The most shapes in an image (>= `min_shapes`); the count is uniform in between.
    pub max_shapes: usize,
    /// The smallest shape radius, as a fraction of the image side (> 0).
    pub min_radius: f32,
    /// The largest radius (> `min_radius`, <= 0.5); radii are uniform in between.
    pub max_radius: f32,
    /// Whether shapes get random textures (solid, stripes, checker, speckle); `false`
    /// paints every shape in one solid colour.
    pub textured: bool,
}

impl Default for ShapesConfig {
    fn default() -> Self {
        Self {
            min_shapes: 1,
            max_shapes: 3,
            min_radius: 0.10,
            max_radius: 0.25,
            textured: true,
        }
    }
}

impl ShapesConfig {
    /// Checks the ranges; errors name the field, the value and the fix.
    pub fn validate(&self) -> candle::Result<()> {
        if self.min_shapes == 0 || self.max_shapes < self.min_shapes || self.max_shapes > 16 {
            candle::bail!(
                "ShapesConfig: shapes per image {}..={} is not a range within 1..=16; the \
                 segmentation set uses 1..=3",
                self.min_shapes,
                self.max_shapes
            )
        }
        let (lo, hi) = (self.min_radius, self.max_radius);
        if !(lo > 0.0 && lo < hi && hi <= 0.5) {
            candle::bail!(
                "ShapesConfig: radius {lo}..{hi} (fractions of the side) must satisfy \
                 0 < min_radius < max_radius <= 0.5; the segmentation set uses 0.10..0.25"
            )
        }
        Ok(())
    }
}

impl Shapes {
    /// Renders `n` samples of `size x size` with the default [`ShapesConfig`]; sample `i`
    /// depends only on `(seed, i)`.
    pub fn generate(n: usize, size: usize, seed: u64) -> Self {
        Self::render(n, size, seed, &ShapesConfig::default())
    }

    /// [`Shapes::generate`] with `cfg`'s shape count and radius range (checked first).
    pub fn generate_with(
        n: usize,
        size: usize,
        seed: u64,
        cfg: ShapesConfig,
    ) -> candle::Result<Self> {
        cfg.validate()?;
        Ok(Self::render(n, size, seed, &cfg))
    }

    fn render(n: usize, size: usize, seed: u64, cfg: &ShapesConfig) -> Self {
        let samples = (0..n)
            .map(|i| {
                let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, i as u64, 0));
                render_shapes(size, cfg, &mut rng)
            })
            .collect();
        Self { samples }
    }

    /// The samples at their generated size, in order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }
}

impl Source for Shapes {
    fn len(&self) -> usize {
        self.samples.len()
    }

    /// Rendered once up front: loading is a copy (and a flip).
    fn in_memory(&self) -> bool {
        true
    }

    fn load(
        &self,
        idx: usize,
        size: usize,
        aug: Option<&mut ChaCha8Rng>,
    ) -> candle::Result<Sample> {
        let Some(s) = self.samples.get(idx) else {
            candle::bail!(
                "Shapes::load: sample {idx} is out of range (the set has {})",
                self.samples.len()
            )
        };
        let mut out = if s.image.width() as usize == size {
            s.clone()
        } else {
            s.resized(size as u32, size as u32)
        };
        if let Some(rng) = aug {
            if rng.random_bool(0.5) {
                out.flip_horizontal();
            }
        }
        Ok(out)
    }
}

/// One geometric shape (shared with the detection set in `det_shapes`).
#[derive(Clone, Copy)]
pub(crate) enum Shape {
    Circle {
        cx: f32,
        cy: f32,
        r: f32,
    },
    Rect {
        cx: f32,
        cy: f32,
        hw: f32,
        hh: f32,
        cos: f32,
        sin: f32,
    },
    Triangle {
        p: [(f32, f32); 3],
    },
    Ring {
        cx: f32,
        cy: f32,
        r: f32,
        r_in: f32,
    },
}

impl Shape {
    /// The segmentation class id (1-4; 0 is background).
    pub(crate) fn class(&self) -> u8 {
        match self {
            Shape::Circle { .. } => 1,
            Shape::Rect { .. } => 2,
            Shape::Triangle { .. } => 3,
            Shape::Ring { .. } => 4,
        }
    }

    fn contains(&self, x: f32, y: f32) -> bool {
        match *self {
            Shape::Circle { cx, cy, r } => (x - cx).powi(2) + (y - cy).powi(2) <= r * r,
            Shape::Ring { cx, cy, r, r_in } => {
                let d = (x - cx).powi(2) + (y - cy).powi(2);
                d <= r * r && d >= r_in * r_in
            }
            Shape::Rect {
                cx,
                cy,
                hw,
                hh,
                cos,
                sin,
            } => {
                let (dx, dy) = (x - cx, y - cy);
                (dx * cos + dy * sin).abs() <= hw && (-dx * sin + dy * cos).abs() <= hh
            }
            Shape::Triangle { p } => {
                let cross = |a: (f32, f32), b: (f32, f32)| {
                    (b.0 - a.0) * (y - a.1) - (b.1 - a.1) * (x - a.0)
                };
                let (d1, d2, d3) = (cross(p[0], p[1]), cross(p[1], p[2]), cross(p[2], p[0]));
                let neg = d1 < 0.0 || d2 < 0.0 || d3 < 0.0;
                let pos = d1 > 0.0 || d2 > 0.0 || d3 > 0.0;
                !(neg && pos)
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Texture {
    Solid,
    Stripes { cos: f32, sin: f32, period: f32 },
    Checker { period: f32 },
    Speckle { amount: f32 },
}

fn random_colour(rng: &mut ChaCha8Rng) -> [f32; 3] {
    [rng.random(), rng.random(), rng.random()]
}

/// One random shape (centre, size, kind, orientation) in an image of side `s`, with a
/// radius drawn uniformly from `radius` (a fraction of `s`).
pub(crate) fn random_shape(rng: &mut ChaCha8Rng, s: f32, radius: std::ops::Range<f32>) -> Shape {
    let r = rng.random_range(radius) * s;
    let (cx, cy) = (
        rng.random_range(0.1..0.9) * s,
        rng.random_range(0.1..0.9) * s,
    );
    match rng.random_range(0..4) {
        0 => Shape::Circle { cx, cy, r },
        1 => {
            let a: f32 = rng.random_range(0.0..std::f32::consts::PI);
            Shape::Rect {
                cx,
                cy,
                hw: r * rng.random_range(0.6..1.0),
                hh: r * rng.random_range(0.5..1.0),
                cos: a.cos(),
                sin: a.sin(),
            }
        }
        2 => {
            let a0: f32 = rng.random_range(0.0..std::f32::consts::TAU);
            let mut p = [(0f32, 0f32); 3];
            for (k, pk) in p.iter_mut().enumerate() {
                let a = a0 + k as f32 * std::f32::consts::TAU / 3.0 + rng.random_range(-0.2..0.2);
                let rr = r * rng.random_range(0.85..1.2);
                *pk = (cx + rr * a.cos(), cy + rr * a.sin());
            }
            Shape::Triangle { p }
        }
        _ => Shape::Ring {
            cx,
            cy,
            r,
            r_in: r * rng.random_range(0.45..0.7),
        },
    }
}

fn render_shapes(size: usize, cfg: &ShapesConfig, rng: &mut ChaCha8Rng) -> Sample {
    let s = size as f32;
    let mut canvas = Canvas::background(size, rng);
    canvas.textured = cfg.textured;
    let mut mask = vec![0u8; size * size];
    // Drawn as i32, as the first version did: the default config renders the same images.
    let count = rng.random_range(cfg.min_shapes as i32..=cfg.max_shapes as i32);
    for _ in 0..count {
        let shape = random_shape(rng, s, cfg.min_radius..cfg.max_radius);
        canvas.paint(&shape, rng, |i| mask[i] = shape.class());
    }
    Sample {
        image: canvas.finish(rng),
        mask: GrayImage::from_raw(size as u32, size as u32, mask).expect("size x size mask"),
    }
}

/// An image being rendered: linear RGB in [0, 1], row-major, `size x size`.
pub(crate) struct Canvas {
    size: usize,
    img: Vec<[f32; 3]>,
    /// The background's mean colour (shape colours keep away from it).
    bg: [f32; 3],
    /// Whether shapes get random textures (else solid; the texture is still drawn, so the
    /// random stream up to the texture's pixels stays the same).
    pub(crate) textured: bool,
}

impl Canvas {
    /// A two-colour linear gradient in a random direction, plus 0-3 unlabeled clutter
    /// strokes.
    pub(crate) fn background(size: usize, rng: &mut ChaCha8Rng) -> Self {
        let s = size as f32;
        let (c0, c1) = (random_colour(rng), random_colour(rng));
        let ang: f32 = rng.random_range(0.0..std::f32::consts::TAU);
        let (gc, gs) = (ang.cos(), ang.sin());
        let mut img = vec![[0f32; 3]; size * size];
        for y in 0..size {
            for x in 0..size {
                let t = (((x as f32 / s - 0.5) * gc + (y as f32 / s - 0.5) * gs) + 0.7) / 1.4;
                let t = t.clamp(0.0, 1.0);
                for c in 0..3 {
                    img[y * size + x][c] = c0[c] * (1.0 - t) + c1[c] * t;
                }
            }
        }
        for _ in 0..rng.random_range(0..4) {
            // A thin unlabeled stroke: an edge that is background.
            let col = random_colour(rng);
            let (x0, y0) = (rng.random_range(0.0..s), rng.random_range(0.0..s));
            let a: f32 = rng.random_range(0.0..std::f32::consts::PI);
            let half = rng.random_range(0.5..1.2) * s / 96.0;
            let (nx, ny) = (-a.sin(), a.cos());
            for y in 0..size {
                for x in 0..size {
                    if ((x as f32 + 0.5 - x0) * nx + (y as f32 + 0.5 - y0) * ny).abs() <= half {
                        img[y * size + x] = col;
                    }
                }
            }
        }
        let bg = std::array::from_fn(|c| (c0[c] + c1[c]) / 2.0);
        Self {
            size,
            img,
            bg,
            textured: true,
        }
    }

    /// Paints `shape` with random colours and texture over every pixel whose centre it
    /// contains, calling `covered(pixel index)` for each.
    pub(crate) fn paint(
        &mut self,
        shape: &Shape,
        rng: &mut ChaCha8Rng,
        mut covered: impl FnMut(usize),
    ) {
        let (size, s) = (self.size, self.size as f32);
        // Shape colours differ from the background's mean colour by at least 0.3 (L1 over
        // RGB in [0, 1]): a shape may be faint, never invisible.
        let bg = self.bg;
        let far = |rng: &mut ChaCha8Rng| loop {
            let c = random_colour(rng);
            if c.iter().zip(&bg).map(|(a, b)| (a - b).abs()).sum::<f32>() >= 0.3 {
                break c;
            }
        };
        let (fa, fb) = (far(rng), far(rng));
        let texture = match rng.random_range(0..4) {
            0 => Texture::Solid,
            1 => {
                let a: f32 = rng.random_range(0.0..std::f32::consts::PI);
                Texture::Stripes {
                    cos: a.cos(),
                    sin: a.sin(),
                    period: rng.random_range(3.0..9.0) * s / 96.0,
                }
            }
            2 => Texture::Checker {
                period: rng.random_range(3.0..8.0) * s / 96.0,
            },
            _ => Texture::Speckle {
                amount: rng.random_range(0.1..0.2),
            },
        };
        let texture = if self.textured {
            texture
        } else {
            Texture::Solid
        };
        for y in 0..size {
            for x in 0..size {
                let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                if !shape.contains(px, py) {
                    continue;
                }
                let second = match texture {
                    Texture::Solid => false,
                    Texture::Stripes { cos, sin, period } => {
                        ((px * cos + py * sin) / period).floor() as i64 % 2 == 0
                    }
                    Texture::Checker { period } => {
                        ((px / period).floor() as i64 + (py / period).floor() as i64) % 2 == 0
                    }
                    Texture::Speckle { amount } => rng.random::<f32>() < amount,
                };
                self.img[y * size + x] = if second { fb } else { fa };
                covered(y * size + x);
            }
        }
    }

    /// Adds sensor noise over everything and quantizes to 8-bit RGB.
    pub(crate) fn finish(self, rng: &mut ChaCha8Rng) -> RgbImage {
        let sigma: f32 = rng.random_range(0.02..0.08);
        let mut image = RgbImage::new(self.size as u32, self.size as u32);
        for (i, px) in image.pixels_mut().enumerate() {
            for (v, &base) in px.0.iter_mut().zip(self.img[i].iter()) {
                // Sum of 3 uniforms: roughly Gaussian with std sigma.
                let n = (rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>() - 1.5)
                    * 2.0
                    * sigma;
                *v = ((base + n).clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
        image
    }
}
