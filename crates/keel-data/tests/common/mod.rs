//! A tiny Pascal VOC folder for tests (also used by the workspace's `tests/seg_data.rs`
//! through `#[path]`), and the ways to break one sample of it.
#![allow(dead_code)] // reason: each test binary uses a different subset

use std::path::{Path, PathBuf};

/// Side lengths of every fixture image.
pub const W: u32 = 40;
/// See [`W`].
pub const H: u32 = 30;

/// Writes `root/{JPEGImages,SegmentationClass,ImageSets/Segmentation}` with `n_train`
/// samples `img0..` in `train.txt` and `n_val` more in `val.txt`: noisy JPEG images and
/// 8-bit grayscale masks with class ids 0, 1, 2 and a row of 255 (ignore).
pub fn write_voc(root: &Path, n_train: usize, n_val: usize) -> anyhow::Result<()> {
    for d in ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let mut lists = (String::new(), String::new());
    for k in 0..n_train + n_val {
        let id = format!("img{k}");
        let img = image::RgbImage::from_fn(W, H, |x, y| {
            let n = (x * 7919 + y * 104_729 + k as u32 * 31) % 251;
            image::Rgb([(x * 6) as u8 ^ n as u8, (y * 8) as u8, n as u8])
        });
        img.save(image_path(root, k))?;
        let mask: Vec<u8> = (0..W * H)
            .map(|i| match (i % W, i / W) {
                (_, 0) => 255,
                (x, _) if x < 10 + k as u32 => 0,
                (_, y) if y < 15 => 1,
                _ => 2,
            })
            .collect();
        write_gray_png(&mask_path(root, k), W, H, &mask)?;
        let list = if k < n_train {
            &mut lists.0
        } else {
            &mut lists.1
        };
        list.push_str(&format!("{id}\n"));
    }
    std::fs::write(root.join("ImageSets/Segmentation/train.txt"), lists.0)?;
    std::fs::write(root.join("ImageSets/Segmentation/val.txt"), lists.1)?;
    Ok(())
}

/// The image file of sample `k`.
pub fn image_path(root: &Path, k: usize) -> PathBuf {
    root.join(format!("JPEGImages/img{k}.jpg"))
}

/// The mask file of sample `k`.
pub fn mask_path(root: &Path, k: usize) -> PathBuf {
    root.join(format!("SegmentationClass/img{k}.png"))
}

/// Writes an 8-bit grayscale PNG.
pub fn write_gray_png(path: &Path, w: u32, h: u32, data: &[u8]) -> anyhow::Result<()> {
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(file, w, h);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(data)?;
    Ok(())
}

/// Cuts sample `k`'s JPEG to half its bytes.
pub fn truncate_image(root: &Path, k: usize) -> anyhow::Result<()> {
    let bytes = std::fs::read(image_path(root, k))?;
    std::fs::write(image_path(root, k), &bytes[..bytes.len() / 2])?;
    Ok(())
}

/// Replaces sample `k`'s mask with a (valid) mask of another size.
pub fn resize_mask(root: &Path, k: usize) -> anyhow::Result<()> {
    write_gray_png(
        &mask_path(root, k),
        W / 2,
        H,
        &vec![0; (W / 2 * H) as usize],
    )
}

/// Sets one pixel of sample `k`'s mask to class id `v`.
pub fn poke_mask(root: &Path, k: usize, v: u8) -> anyhow::Result<()> {
    let mut m = vec![0u8; (W * H) as usize];
    m[W as usize * 5 + 7] = v;
    write_gray_png(&mask_path(root, k), W, H, &m)
}

/// Replaces sample `k`'s mask with a 16-bit grayscale PNG of the right size.
pub fn mask_16bit(root: &Path, k: usize) -> anyhow::Result<()> {
    let file = std::io::BufWriter::new(std::fs::File::create(mask_path(root, k))?);
    let mut enc = png::Encoder::new(file, W, H);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Sixteen);
    enc.write_header()?
        .write_image_data(&vec![0; (W * H * 2) as usize])?;
    Ok(())
}
