//! Up-front validation of a VOC folder: each kind of bad file is caught and named, all bad
//! files are reported in one error (capped list), good data passes with one progress tick
//! per sample.
mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use keel_data::{validate, Voc, MAX_LISTED};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keel-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn open(root: &Path, split: &str) -> Voc {
    Voc::open(root, split, 3).unwrap()
}

#[test]
fn good_data_passes_with_one_progress_tick_per_sample() -> anyhow::Result<()> {
    let root = tmp("good");
    write_voc(&root, 5, 3)?;
    let (train, val) = (open(&root, "train"), open(&root, "val"));
    let ticks = AtomicUsize::new(0);
    validate(
        &[&train, &val],
        Some(&|| {
            ticks.fetch_add(1, Ordering::Relaxed);
        }),
    )?;
    assert_eq!(ticks.into_inner(), 8);
    assert!(train.check(None).is_empty());
    std::fs::remove_dir_all(root)?;
    Ok(())
}

/// One bad sample of each kind: the check names its file and says what is wrong.
#[test]
fn each_kind_of_bad_file_is_named() -> anyhow::Result<()> {
    type Break = fn(&Path, usize) -> anyhow::Result<()>;
    let cases: [(&str, Break, &str, &str); 6] = [
        (
            "truncated-jpeg",
            truncate_image,
            "img1.jpg",
            "cannot decode the image",
        ),
        (
            // Only the end-of-image marker is gone: the header still reads.
            "jpeg-without-eoi",
            |r, k| {
                let bytes = std::fs::read(image_path(r, k))?;
                Ok(std::fs::write(image_path(r, k), &bytes[..bytes.len() - 2])?)
            },
            "img1.jpg",
            "cannot decode the image",
        ),
        (
            "mask-size",
            resize_mask,
            "img1.png",
            "mask is 20x30 but its image",
        ),
        (
            "class-id",
            |r, k| poke_mask(r, k, 7),
            "img1.png",
            "class id 7 >= num_classes 3",
        ),
        ("16-bit", mask_16bit, "img1.png", "unsupported mask format"),
        (
            "not-a-png",
            |r, k| Ok(std::fs::write(mask_path(r, k), b"GIF89a")?),
            "img1.png",
            "not a PNG mask",
        ),
    ];
    for (name, break_it, file, why) in cases {
        let root = tmp(name);
        write_voc(&root, 3, 0)?;
        break_it(&root, 1)?;
        let bad = open(&root, "train").check(None);
        assert_eq!(bad.len(), 1, "{name}: {bad:?}");
        assert_eq!(bad[0].image, image_path(&root, 1), "{name}");
        assert!(bad[0].reason.contains(file), "{name}: {}", bad[0].reason);
        assert!(bad[0].reason.contains(why), "{name}: {}", bad[0].reason);
        // The good samples (with 255 = ignore in their masks) are not listed.
        assert!(!bad[0].reason.contains("img0") && !bad[0].reason.contains("img2"));
        std::fs::remove_dir_all(root)?;
    }
    Ok(())
}

#[test]
fn every_bad_file_is_reported_at_once() -> anyhow::Result<()> {
    let root = tmp("all");
    write_voc(&root, 4, 3)?;
    truncate_image(&root, 0)?;
    poke_mask(&root, 2, 3)?;
    resize_mask(&root, 4)?; // val
    mask_16bit(&root, 6)?; // val
    let (train, val) = (open(&root, "train"), open(&root, "val"));
    let e = validate(&[&train, &val], None).unwrap_err().to_string();
    assert!(e.contains("4 of 7 samples are bad"), "{e}");
    for f in ["img0.jpg", "img2.png", "img4.png", "img6.png"] {
        assert!(e.contains(f), "{f} missing from: {e}");
    }
    for f in ["img1", "img3", "img5"] {
        assert!(!e.contains(f), "{f} is good but listed: {e}");
    }
    assert_eq!(e.lines().count(), 5, "one line per bad file: {e}");
    std::fs::remove_dir_all(root)?;
    Ok(())
}

#[test]
fn a_long_list_of_bad_files_is_capped_with_a_count() -> anyhow::Result<()> {
    let root = tmp("cap");
    let n = MAX_LISTED + 5;
    write_voc(&root, n, 0)?;
    for k in 0..n {
        poke_mask(&root, k, 9)?;
    }
    let e = validate(&[&open(&root, "train")], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("{n} of {n} samples are bad")), "{e}");
    assert_eq!(e.lines().count(), 1 + MAX_LISTED + 1, "{e}");
    assert!(e.ends_with("... and 5 more"), "{e}");
    std::fs::remove_dir_all(root)?;
    Ok(())
}
