//! Pascal VOC layout on disk: image list, JPEG images, palette / grayscale / RGB masks.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle::bail;
use image::{GrayImage, RgbImage};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::{Sample, Source, IGNORE};

/// A Pascal VOC style split: `JPEGImages/<id>.jpg`, `SegmentationClass/<id>.png` (palette
/// PNG whose indices are class ids, or a grayscale class-id PNG, or an RGB PNG in the VOC
/// colour map), ids from `ImageSets/Segmentation/<split>.txt`; 255 = ignore.
pub struct Voc {
    items: Vec<(PathBuf, PathBuf)>,
    num_classes: usize,
}

impl Voc {
    /// Lists `split` under `root` and checks that every image and mask exists; masks hold
    /// class ids below `num_classes` or 255. The contents are checked by
    /// [`Voc::check`] / [`crate::validate`] (all at once) or when a sample is decoded.
    pub fn open(root: &Path, split: &str, num_classes: usize) -> candle::Result<Self> {
        if !root.is_dir() {
            bail!("Voc::open: no such directory {} (expected a Pascal VOC layout: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)", root.display())
        }
        let list = root
            .join("ImageSets/Segmentation")
            .join(format!("{split}.txt"));
        let text = std::fs::read_to_string(&list).map_err(|e| {
            candle::Error::Msg(format!(
                "reading the {split} split list {}: {e}",
                list.display()
            ))
        })?;
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

    /// The class count masks are checked against.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// The `(image, mask)` file pairs, in split order.
    pub fn files(&self) -> &[(PathBuf, PathBuf)] {
        &self.items
    }

    /// Decodes sample `idx` at its original size, checking the mask: the image decodes in
    /// full, the mask has the image's size, and every class id is below `num_classes` or
    /// the ignore index 255. Errors name the file.
    pub fn decode(&self, idx: usize) -> candle::Result<Sample> {
        let Some((img_path, mask_path)) = self.items.get(idx) else {
            bail!(
                "Voc::decode: sample {idx} is out of range (the split has {})",
                self.items.len()
            )
        };
        let image = image::open(img_path)
            .map_err(|e| {
                candle::Error::Msg(format!(
                    "{}: cannot decode the image: {e}",
                    img_path.display()
                ))
            })?
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
                "{}: class id {bad} >= num_classes {} (and not the ignore index 255)",
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
fn read_mask(path: &Path) -> candle::Result<GrayImage> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        candle::Error::Msg(format!("{}: {what}: {e}", path.display()))
    };
    let file = std::fs::File::open(path).map_err(|e| fail("cannot open the mask", &e))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec.read_info().map_err(|e| fail("not a PNG mask", &e))?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| fail("cannot decode the mask", &e))?;
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
    GrayImage::from_raw(w, h, ids).ok_or_else(|| {
        candle::Error::Msg(format!(
            "{}: the decoded mask does not hold {w}x{h} class ids",
            path.display()
        ))
    })
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
    ) -> candle::Result<Sample> {
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
            let r = s.resized(nw, nh);
            let mut out = Sample {
                image: RgbImage::new(sz, sz),
                mask: GrayImage::from_pixel(sz, sz, image::Luma([IGNORE])),
            };
            image::imageops::replace(&mut out.image, &r.image, 0, 0);
            image::imageops::replace(&mut out.mask, &r.mask, 0, 0);
            return Ok(out);
        };
        // Train: random scale (shorter side = size * U(0.75, 1.5)), pad, random crop, flip.
        let f = size as f64 * rng.random_range(0.75..1.5) / w.min(h) as f64;
        let (nw, nh) = (
            ((w as f64 * f).round() as u32).max(1),
            ((h as f64 * f).round() as u32).max(1),
        );
        let r = s.resized(nw, nh);
        let (pw, ph) = (nw.max(sz), nh.max(sz));
        let mut pimg = RgbImage::new(pw, ph);
        let mut pmask = GrayImage::from_pixel(pw, ph, image::Luma([IGNORE]));
        image::imageops::replace(&mut pimg, &r.image, 0, 0);
        image::imageops::replace(&mut pmask, &r.mask, 0, 0);
        let (x0, y0) = (rng.random_range(0..=pw - sz), rng.random_range(0..=ph - sz));
        let mut out = Sample {
            image: image::imageops::crop_imm(&pimg, x0, y0, sz, sz).to_image(),
            mask: image::imageops::crop_imm(&pmask, x0, y0, sz, sz).to_image(),
        };
        if rng.random_bool(0.5) {
            out.flip_horizontal();
        }
        Ok(out)
    }
}
