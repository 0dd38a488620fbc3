//! Data: the built-in synthetic shapes set (default), Pascal VOC layout on disk
//! (`--data-dir`), and a deterministic batch loader on background threads with a bounded
//! prefetch queue.
//!
//! Everything random is derived from `(seed, position)`, never from a running RNG: the
//! sample order of epoch `e` is a permutation seeded by `(seed, e)` and the augmentation of
//! the `g`-th sample drawn is seeded by `(seed, g)`. A resumed run therefore needs only the
//! step to draw exactly the batches an uninterrupted run would.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context};
use image::imageops::FilterType;
use image::{GrayImage, RgbImage};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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

// ---------------------------------------------------------------------------------------
// Synthetic shapes
// ---------------------------------------------------------------------------------------

/// The synthetic shapes set: `n` images of `size x size`, generated in memory from
/// `seed`: noisy gradient backgrounds with unlabeled clutter strokes, 1-3 overlapping
/// circles, rectangles, triangles and rings of random size, position, rotation, colour and
/// texture (solid, stripes, checker, speckle), with exact masks (a pixel belongs to the
/// last shape that covers its centre).
pub struct Shapes {
    samples: Vec<Sample>,
}

/// Train and val seeds of the synthetic set are fixed: every run (and every `--seed`) sees
/// the same data, so seeds compare training, not data sets.
pub const SHAPES_TRAIN_SEED: u64 = 0x5eed_7a1a;
pub const SHAPES_VAL_SEED: u64 = 0x5eed_0fa1;

impl Shapes {
    pub fn generate(n: usize, size: usize, seed: u64) -> Self {
        let samples = (0..n)
            .map(|i| render_shapes(size, &mut ChaCha8Rng::seed_from_u64(mix(seed, i as u64, 0))))
            .collect();
        Self { samples }
    }

    #[allow(dead_code)] // reason: used by tests/seg_train.rs, not by the binary
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }
}

impl Source for Shapes {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn load(
        &self,
        idx: usize,
        size: usize,
        aug: Option<&mut ChaCha8Rng>,
    ) -> anyhow::Result<Sample> {
        let s = &self.samples[idx];
        let mut out = if s.image.width() as usize == size {
            s.clone()
        } else {
            Sample {
                image: image::imageops::resize(
                    &s.image,
                    size as u32,
                    size as u32,
                    FilterType::Triangle,
                ),
                mask: image::imageops::resize(
                    &s.mask,
                    size as u32,
                    size as u32,
                    FilterType::Nearest,
                ),
            }
        };
        if let Some(rng) = aug {
            if rng.random_bool(0.5) {
                image::imageops::flip_horizontal_in_place(&mut out.image);
                image::imageops::flip_horizontal_in_place(&mut out.mask);
            }
        }
        Ok(out)
    }
}

#[derive(Clone, Copy)]
enum Shape {
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
    fn class(&self) -> u8 {
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

fn render_shapes(size: usize, rng: &mut ChaCha8Rng) -> Sample {
    let s = size as f32;
    // Background: two-colour linear gradient in a random direction, plus clutter strokes.
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
    let mut mask = vec![0u8; size * size];
    for _ in 0..rng.random_range(1..=3) {
        let r = rng.random_range(0.10..0.25) * s;
        let (cx, cy) = (
            rng.random_range(0.1..0.9) * s,
            rng.random_range(0.1..0.9) * s,
        );
        let shape = match rng.random_range(0..4) {
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
                    let a =
                        a0 + k as f32 * std::f32::consts::TAU / 3.0 + rng.random_range(-0.2..0.2);
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
        };
        // Shape colours differ from the background's mean colour by at least 0.3 (L1 over
        // RGB in [0, 1]): a shape may be faint, never invisible.
        let bg: [f32; 3] = std::array::from_fn(|c| (c0[c] + c1[c]) / 2.0);
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
                img[y * size + x] = if second { fb } else { fa };
                mask[y * size + x] = shape.class();
            }
        }
    }
    // Sensor noise over everything.
    let sigma: f32 = rng.random_range(0.02..0.08);
    let mut image = RgbImage::new(size as u32, size as u32);
    for (i, px) in image.pixels_mut().enumerate() {
        for (v, &base) in px.0.iter_mut().zip(img[i].iter()) {
            // Sum of 3 uniforms: roughly Gaussian with std sigma.
            let n = (rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>() - 1.5)
                * 2.0
                * sigma;
            *v = ((base + n).clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    Sample {
        image,
        mask: GrayImage::from_raw(size as u32, size as u32, mask).expect("size x size mask"),
    }
}

// ---------------------------------------------------------------------------------------
// Pascal VOC layout
// ---------------------------------------------------------------------------------------

/// A Pascal VOC style split: `JPEGImages/<id>.jpg`, `SegmentationClass/<id>.png` (palette
/// PNG whose indices are class ids, or a grayscale class-id PNG, or an RGB PNG in the VOC
/// colour map), ids from `ImageSets/Segmentation/<split>.txt`; 255 = ignore.
pub struct Voc {
    items: Vec<(PathBuf, PathBuf)>,
    num_classes: usize,
}

impl Voc {
    /// Lists `split` under `root` and checks that every image and mask exists.
    pub fn open(root: &Path, split: &str, num_classes: usize) -> anyhow::Result<Self> {
        if !root.is_dir() {
            bail!("--data-dir {}: no such directory (expected a Pascal VOC layout: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)", root.display())
        }
        let list = root
            .join("ImageSets/Segmentation")
            .join(format!("{split}.txt"));
        let text = std::fs::read_to_string(&list)
            .with_context(|| format!("reading the {split} split list {}", list.display()))?;
        let mut items = Vec::new();
        for id in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let img = root.join("JPEGImages").join(format!("{id}.jpg"));
            let mask = root.join("SegmentationClass").join(format!("{id}.png"));
            if !img.is_file() {
                bail!(
                    "{}: image of '{id}' (listed in {}) is missing",
                    img.display(),
                    list.display()
                )
            }
            if !mask.is_file() {
                bail!(
                    "{}: mask of '{id}' (listed in {}) is missing",
                    mask.display(),
                    list.display()
                )
            }
            items.push((img, mask));
        }
        if items.is_empty() {
            bail!("{}: the {split} split is empty", list.display())
        }
        Ok(Self { items, num_classes })
    }

    /// Decodes sample `idx` at its original size, checking the mask.
    pub fn decode(&self, idx: usize) -> anyhow::Result<Sample> {
        let (img_path, mask_path) = &self.items[idx];
        let image = image::open(img_path)
            .with_context(|| format!("{}: cannot decode the image", img_path.display()))?
            .to_rgb8();
        let mask = read_mask(mask_path)?;
        if image.dimensions() != mask.dimensions() {
            bail!(
                "{}: mask is {}x{} but its image {} is {}x{}",
                mask_path.display(),
                mask.width(),
                mask.height(),
                img_path.display(),
                image.width(),
                image.height()
            )
        }
        if let Some(&bad) = mask
            .as_raw()
            .iter()
            .find(|&&v| v != IGNORE && v as usize >= self.num_classes)
        {
            bail!(
                "{}: class id {bad} >= --num-classes {} (and not the ignore index 255)",
                mask_path.display(),
                self.num_classes
            )
        }
        Ok(Sample { image, mask })
    }
}

/// The VOC colour map: class `i`'s colour from the bits of `i` (the devkit's `labelcolormap`).
fn voc_colour(i: u8) -> [u8; 3] {
    let (mut r, mut g, mut b) = (0u8, 0u8, 0u8);
    let mut c = i;
    for j in 0..8 {
        r |= ((c & 1) != 0) as u8 * (1 << (7 - j));
        g |= ((c >> 1 & 1) != 0) as u8 * (1 << (7 - j));
        b |= ((c >> 2 & 1) != 0) as u8 * (1 << (7 - j));
        c >>= 3;
    }
    [r, g, b]
}

/// Reads a mask PNG as class ids: palette indices for indexed PNGs, values for grayscale,
/// the VOC colour map for RGB(A).
fn read_mask(path: &Path) -> anyhow::Result<GrayImage> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("{}: cannot open the mask", path.display()))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec
        .read_info()
        .with_context(|| format!("{}: not a PNG mask", path.display()))?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buf)
        .with_context(|| format!("{}: cannot decode the mask", path.display()))?;
    let (w, h) = (info.width, info.height);
    let buf = &buf[..info.buffer_size()];
    use png::{BitDepth, ColorType};
    let ids: Vec<u8> = match (info.color_type, info.bit_depth) {
        (ColorType::Indexed | ColorType::Grayscale, BitDepth::Eight) => buf.to_vec(),
        (ColorType::Indexed, depth) => {
            let bits = depth as usize;
            let row = (w as usize * bits).div_ceil(8);
            let mut out = Vec::with_capacity((w * h) as usize);
            for y in 0..h as usize {
                for x in 0..w as usize {
                    let bit = x * bits;
                    let byte = buf[y * row + bit / 8];
                    out.push((byte >> (8 - bits - bit % 8)) & ((1u16 << bits) - 1) as u8);
                }
            }
            out
        }
        (ColorType::Rgb | ColorType::Rgba, BitDepth::Eight) => {
            let ch = if info.color_type == ColorType::Rgb { 3 } else { 4 };
            let mut lut: HashMap<[u8; 3], u8> = (0..=255u8).map(|i| (voc_colour(i), i)).collect();
            lut.insert([224, 224, 192], IGNORE); // VOC's boundary colour
            let mut out = Vec::with_capacity((w * h) as usize);
            for (i, px) in buf.chunks_exact(ch).enumerate() {
                let c = [px[0], px[1], px[2]];
                match lut.get(&c) {
                    Some(&id) => out.push(id),
                    None => bail!(
                        "{}: pixel ({}, {}) has colour {c:?}, which is not in the VOC colour map",
                        path.display(),
                        i % w as usize,
                        i / w as usize
                    ),
                }
            }
            out
        }
        (ct, depth) => bail!(
            "{}: unsupported mask format {ct:?} {depth:?}; use an 8-bit palette, grayscale (class ids) or RGB (VOC colours) PNG",
            path.display()
        ),
    };
    Ok(GrayImage::from_raw(w, h, ids).expect("w x h ids"))
}

impl Source for Voc {
    fn len(&self) -> usize {
        self.items.len()
    }

    fn load(
        &self,
        idx: usize,
        size: usize,
        aug: Option<&mut ChaCha8Rng>,
    ) -> anyhow::Result<Sample> {
        let s = self.decode(idx)?;
        let (w, h) = s.image.dimensions();
        let sz = size as u32;
        let Some(rng) = aug else {
            // Eval: the whole image, longer side = size, padded to a square with ignore.
            let f = size as f64 / w.max(h) as f64;
            let (nw, nh) = (
                ((w as f64 * f).round() as u32).clamp(1, sz),
                ((h as f64 * f).round() as u32).clamp(1, sz),
            );
            let img = image::imageops::resize(&s.image, nw, nh, FilterType::Triangle);
            let mask = image::imageops::resize(&s.mask, nw, nh, FilterType::Nearest);
            let mut out = Sample {
                image: RgbImage::new(sz, sz),
                mask: GrayImage::from_pixel(sz, sz, image::Luma([IGNORE])),
            };
            image::imageops::replace(&mut out.image, &img, 0, 0);
            image::imageops::replace(&mut out.mask, &mask, 0, 0);
            return Ok(out);
        };
        // Train: random scale (shorter side = size * U(0.75, 1.5)), pad, random crop, flip.
        let f = size as f64 * rng.random_range(0.75..1.5) / w.min(h) as f64;
        let (nw, nh) = (
            ((w as f64 * f).round() as u32).max(1),
            ((h as f64 * f).round() as u32).max(1),
        );
        let img = image::imageops::resize(&s.image, nw, nh, FilterType::Triangle);
        let mask = image::imageops::resize(&s.mask, nw, nh, FilterType::Nearest);
        let (pw, ph) = (nw.max(sz), nh.max(sz));
        let mut pimg = RgbImage::new(pw, ph);
        let mut pmask = GrayImage::from_pixel(pw, ph, image::Luma([IGNORE]));
        image::imageops::replace(&mut pimg, &img, 0, 0);
        image::imageops::replace(&mut pmask, &mask, 0, 0);
        let (x0, y0) = (rng.random_range(0..=pw - sz), rng.random_range(0..=ph - sz));
        let mut out = Sample {
            image: image::imageops::crop_imm(&pimg, x0, y0, sz, sz).to_image(),
            mask: image::imageops::crop_imm(&pmask, x0, y0, sz, sz).to_image(),
        };
        if rng.random_bool(0.5) {
            image::imageops::flip_horizontal_in_place(&mut out.image);
            image::imageops::flip_horizontal_in_place(&mut out.mask);
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// Batches
// ---------------------------------------------------------------------------------------

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

/// The dataset index and augmentation seed of the `g`-th training sample drawn.
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
    queues: Vec<Receiver<anyhow::Result<HostBatch>>>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
    end: usize,
}

impl Loader {
    #[allow(clippy::too_many_arguments)] // reason: a plain description of the stream
    pub fn new(
        source: Arc<dyn Source>,
        batch: usize,
        size: usize,
        seed: u64,
        start: usize,
        end: usize,
        workers: usize,
        prefetch: usize,
    ) -> Self {
        let workers = workers.max(1);
        let mut queues = Vec::new();
        let mut handles = Vec::new();
        for k in 0..workers {
            let (tx, rx) = sync_channel(prefetch.max(1));
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
                        .collect::<anyhow::Result<Vec<_>>>()
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
    type Item = anyhow::Result<HostBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let q = &self.queues[self.next % self.queues.len()];
        self.next += 1;
        Some(
            q.recv()
                .map_err(|_| anyhow::anyhow!("data loader thread died"))
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
) -> impl Iterator<Item = anyhow::Result<HostBatch>> + '_ {
    (0..source.len().div_ceil(batch)).map(move |b| {
        let samples = (b * batch..((b + 1) * batch).min(source.len()))
            .map(|i| source.load(i, size, None))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(HostBatch::from_samples(&samples, size))
    })
}
