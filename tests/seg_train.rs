//! Tests of the seg_train example (examples/seg_train/).
//!
//! Cargo builds no binary for examples that tests could run (`CARGO_BIN_EXE_*` exists only
//! for `[[bin]]` targets), so this test crate compiles the example's modules itself
//! (`#[path]` on its main.rs, whose `mod` items resolve next to it) and calls
//! `cli::run(args)`, the same entry point as the binary. Where a real process is needed
//! (SIGKILL mid-training, the exit code), the test binary re-executes itself with
//! `--exact child_process` and the arguments in `SEG_TRAIN_CHILD_ARGS`: the `child_process`
//! test then runs seg_train's entry point in that process and exits like the binary.
use std::path::Path;
use std::time::{Duration, Instant};

mod common;

#[allow(dead_code)] // reason: the binary's `main` and items only the binary uses
#[path = "../examples/seg_train/main.rs"]
mod seg_train;

use common::seg_cli::{
    assert_same_losses, child, child_main, resume, run_cli, step_losses, tiny, tmp,
};
use seg_train::{cli, compare, data, train};

/// Entry point of the re-executed test binary (a no-op in a normal test run).
#[test]
fn child_process() {
    child_main();
}

#[test]
fn train_checkpoint_resume_exactly_after_sigkill() -> anyhow::Result<()> {
    let steps = 40;
    // Uninterrupted reference run.
    let a = tmp("ref");
    run_cli(&tiny(&a, steps))?;
    let la = step_losses(&a);
    assert_eq!(la.len(), steps);
    let first = la[..4].iter().map(|x| x.1).sum::<f64>() / 4.0;
    let last = la[steps - 4..].iter().map(|x| x.1).sum::<f64>() / 4.0;
    assert!(
        last < first * 0.9,
        "loss did not fall: first {first}, last {last}"
    );
    let ckpt = a.join("checkpoints/ckpt-00000040.safetensors");
    assert!(ckpt.is_file(), "no final checkpoint");
    let ck = keel::train::load_checkpoint(&ckpt, &candle::Device::Cpu)?;
    assert_eq!(ck.step, 40);
    assert!(ck.tensors.contains_key("stem.0.weight") && ck.tensors.contains_key("head.bias"));
    assert!(ck.tensors.keys().any(|k| k.starts_with("optim.")));
    assert!(a.join("health.json").is_file());

    // The same run in a child process, killed with SIGKILL after its first checkpoint.
    let b = tmp("killed");
    let mut slow = tiny(&b, steps);
    slow.extend(["--step-delay-ms".to_string(), "40".to_string()]);
    let mut proc = child(&slow).spawn()?;
    let t0 = Instant::now();
    let first_ckpt = b.join("checkpoints/ckpt-00000010.safetensors");
    while !first_ckpt.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "child wrote no checkpoint"
        );
        assert!(proc.try_wait()?.is_none(), "child exited early");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(150)); // a few steps past the checkpoint
    proc.kill()?; // SIGKILL
    let status = proc.wait()?;
    assert!(!status.success(), "the child finished before it was killed");
    let logged = step_losses(&b).len();
    assert!(
        logged < steps,
        "the kill came too late ({logged} steps logged)"
    );

    // Resume: the losses after the checkpoint equal the uninterrupted run's, bit for bit.
    resume(&b)?;
    assert_same_losses(&la, &step_losses(&b), steps);
    let cb = keel::train::load_checkpoint(
        b.join("checkpoints/ckpt-00000040.safetensors"),
        &candle::Device::Cpu,
    )?;
    for (k, t) in &ck.tensors {
        let diff = (t - &cb.tensors[k])?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(candle::DType::F64)?
            .to_scalar::<f64>()?;
        assert_eq!(diff, 0.0, "{k} differs after resume");
    }

    // --workers defaults to auto, recorded as such (it resolves per machine and data).
    let saved = std::fs::read_to_string(b.join("config.json"))?;
    assert!(saved.contains(r#""workers": "auto""#), "{saved}");

    // A truncated checkpoint is a clear error, and a fresh run refuses to overwrite a run.
    let c = tmp("corrupt");
    std::fs::create_dir_all(&c)?;
    for f in ["config.json", "log.jsonl"] {
        std::fs::copy(b.join(f), c.join(f))?;
    }
    std::fs::create_dir_all(c.join("checkpoints"))?;
    let bytes = std::fs::read(b.join("checkpoints/ckpt-00000040.safetensors"))?;
    std::fs::write(
        c.join("checkpoints/ckpt-00000040.safetensors"),
        &bytes[..bytes.len() / 2],
    )?;
    let err = run_cli(&[
        "seg_train".into(),
        "--quiet".into(),
        "--resume".into(),
        c.display().to_string(),
    ])
    .unwrap_err();
    assert!(format!("{err:#}").contains("ckpt-00000040"), "{err:#}");
    let err = run_cli(&tiny(&b, steps)).unwrap_err();
    assert!(
        format!("{err:#}").contains("already holds a run"),
        "{err:#}"
    );
    for d in [a, b, c] {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(())
}

#[test]
fn bad_input_is_a_clear_error_and_writes_nothing() -> anyhow::Result<()> {
    let out = tmp("bad");
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("--norm", "layernorm")], "unknown norm"),
        (vec![("--norm", "gn:3")], "groups do not divide"),
        (vec![("--batch-size", "0")], "--batch-size"),
        (
            vec![("--data-dir", "/nonexistent/voc")],
            "no such directory",
        ),
        (vec![("--amp", "f8")], "--amp"),
        (vec![("--optimizer", "lion")], "--optimizer"),
        (
            vec![("--norm", "bn"), ("--batch-size", "1")],
            "one value per channel",
        ),
    ];
    for (flags, want) in cases {
        let mut args = tiny(&out, 2);
        for (k, v) in flags {
            let i = args.iter().position(|a| a == k);
            match i {
                Some(i) => args[i + 1] = v.to_string(),
                None => args.extend([k.to_string(), v.to_string()]),
            }
        }
        let err = run_cli(&args).unwrap_err();
        assert!(format!("{err:#}").contains(want), "{args:?}: {err:#}");
        assert!(!out.exists(), "{args:?} left {} behind", out.display());
    }
    // --out under a regular file cannot be created.
    let file = tmp("a-file");
    std::fs::write(&file, b"x")?;
    let err = run_cli(&tiny(&file.join("sub"), 2)).unwrap_err();
    assert!(format!("{err:#}").contains("--out"), "{err:#}");
    // The binary's exit code.
    let mut args = tiny(&out, 2);
    let i = args.iter().position(|a| a == "--norm").unwrap();
    args[i + 1] = "bogus".into();
    let status = child(&args).output()?;
    assert_eq!(
        status.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(String::from_utf8_lossy(&status.stderr).contains("unknown norm"));
    assert!(!out.exists());
    let _ = std::fs::remove_file(file);
    Ok(())
}

/// Writes a tiny Pascal VOC layout: 3 train and 2 val images with masks as palette,
/// grayscale and RGB (VOC colour map) PNGs.
fn write_voc(root: &Path) -> anyhow::Result<()> {
    for d in ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let (w, h) = (40u32, 30u32);
    let ids = |k: u32| -> Vec<u8> {
        (0..w * h)
            .map(|i| {
                let (x, y) = (i % w, i / w);
                if y == 0 {
                    255 // ignore
                } else if x < 10 + k * 5 {
                    0
                } else if y < 15 {
                    1
                } else {
                    2
                }
            })
            .collect()
    };
    for k in 0..5u32 {
        let id = format!("img{k}");
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 8) as u8, (k * 40) as u8])
        });
        img.save(root.join(format!("JPEGImages/{id}.jpg")))?;
        let mask = ids(k);
        let path = root.join(format!("SegmentationClass/{id}.png"));
        let file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let mut enc = png::Encoder::new(file, w, h);
        enc.set_depth(png::BitDepth::Eight);
        match k % 3 {
            0 => {
                // palette PNG: index = class id, colours from the VOC map
                enc.set_color(png::ColorType::Indexed);
                let mut pal = vec![0u8; 256 * 3];
                pal[3..6].copy_from_slice(&[128, 0, 0]);
                pal[6..9].copy_from_slice(&[0, 128, 0]);
                pal[255 * 3..].copy_from_slice(&[224, 224, 192]);
                enc.set_palette(pal);
                enc.write_header()?.write_image_data(&mask)?;
            }
            1 => {
                enc.set_color(png::ColorType::Grayscale);
                enc.write_header()?.write_image_data(&mask)?;
            }
            _ => {
                enc.set_color(png::ColorType::Rgb);
                let colours = |v: u8| match v {
                    0 => [0, 0, 0],
                    1 => [128, 0, 0],
                    2 => [0, 128, 0],
                    _ => [224, 224, 192],
                };
                let rgb: Vec<u8> = mask.iter().flat_map(|&v| colours(v)).collect();
                enc.write_header()?.write_image_data(&rgb)?;
            }
        }
    }
    std::fs::write(
        root.join("ImageSets/Segmentation/train.txt"),
        "img0\nimg1\nimg2\n",
    )?;
    std::fs::write(root.join("ImageSets/Segmentation/val.txt"), "img3\nimg4\n")?;
    Ok(())
}

#[test]
fn voc_loader_reads_palette_gray_and_rgb_masks_and_names_bad_files() -> anyhow::Result<()> {
    let root = tmp("voc");
    write_voc(&root)?;
    let voc = data::Voc::open(&root, "train", 3)?;
    for k in 0..3 {
        let s = voc.decode(k)?;
        assert_eq!(s.image.dimensions(), (40, 30));
        let m = s.mask.as_raw();
        assert_eq!(m[0], 255, "mask {k}: row 0 is ignore");
        assert_eq!(m[40], 0);
        assert_eq!(m[40 + 39], 1, "mask {k}");
        assert_eq!(m[29 * 40 + 39], 2, "mask {k}");
    }
    // Augmented loads are deterministic per seed and have the requested size.
    use rand::SeedableRng;
    let src: &dyn data::Source = &voc;
    let a = src.load(1, 32, Some(&mut rand_chacha::ChaCha8Rng::seed_from_u64(3)))?;
    let b = src.load(1, 32, Some(&mut rand_chacha::ChaCha8Rng::seed_from_u64(3)))?;
    assert_eq!(a.mask.dimensions(), (32, 32));
    assert_eq!(a.mask.as_raw(), b.mask.as_raw());
    assert!(a.mask.as_raw().iter().all(|&v| v < 3 || v == 255));

    // Train a few steps on it through the CLI.
    let out = tmp("voc-run");
    let mut args = tiny(&out, 3);
    args.extend(
        [
            "--data-dir",
            root.to_str().unwrap(),
            "--num-classes",
            "3",
            "--workers",
            "2",
        ]
        .map(String::from),
    );
    run_cli(&args)?;
    assert_eq!(step_losses(&out).len(), 3);

    // Bad data: each error names the file.
    let err = |r: candle::Result<data::Voc>| format!("{:#}", r.err().expect("an error"));
    assert!(err(data::Voc::open(&root, "test", 3)).contains("test.txt"));
    std::fs::write(root.join("ImageSets/Segmentation/empty.txt"), "\n")?;
    assert!(err(data::Voc::open(&root, "empty", 3)).contains("empty"));
    std::fs::write(
        root.join("ImageSets/Segmentation/missing.txt"),
        "img0\nnope\n",
    )?;
    assert!(err(data::Voc::open(&root, "missing", 3)).contains("nope.jpg"));
    let e = format!(
        "{:#}",
        data::Voc::open(&root, "train", 2)?.decode(0).unwrap_err()
    );
    assert!(e.contains("img0.png") && e.contains("class id 2"), "{e}");
    image::RgbImage::new(20, 20).save(root.join("JPEGImages/img1.jpg"))?;
    let e = format!(
        "{:#}",
        data::Voc::open(&root, "train", 3)?.decode(1).unwrap_err()
    );
    assert!(e.contains("img1.png") && e.contains("40x30"), "{e}");
    std::fs::remove_file(root.join("SegmentationClass/img2.png"))?;
    assert!(err(data::Voc::open(&root, "train", 3)).contains("img2.png"));
    for d in [root, out] {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(())
}

#[test]
fn resize_ops_match_pytorch() -> anyhow::Result<()> {
    use candle::{Device, Tensor};
    let x = Tensor::new(&[[0f32, 1.], [2., 3.]], &Device::Cpu)?.reshape((1, 1, 2, 2))?;
    // F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)
    let y = keel::kernels::resize_bilinear(&x, (4, 4))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let want = [
        0., 0.25, 0.75, 1., 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2., 2.25, 2.75, 3.,
    ];
    for (a, b) in y.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{y:?}");
    }
    // F.interpolate(x, size=(3, 5), mode="nearest"): rows [0, 0, 1], cols [0, 0, 0, 1, 1]
    let y = keel::kernels::resize_nearest(&x, (3, 5))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(
        y,
        [0., 0., 0., 1., 1., 0., 0., 0., 1., 1., 2., 2., 2., 3., 3.]
    );
    // Both are differentiable.
    let v = candle::Var::from_tensor(&x)?;
    let g = keel::kernels::resize_bilinear(
        &keel::kernels::resize_nearest(v.as_tensor(), (3, 5))?,
        (7, 9),
    )?
    .sum_all()?
    .backward()?;
    assert!(g.get(&v).is_some());
    Ok(())
}

#[test]
fn synthetic_shapes_are_deterministic_and_varied() {
    let a = data::Shapes::generate(20, 48, 1);
    let b = data::Shapes::generate(20, 48, 1);
    let mut seen = [false; 5];
    for (x, y) in a.samples().iter().zip(b.samples()) {
        assert_eq!(x.image.as_raw(), y.image.as_raw());
        assert_eq!(x.mask.as_raw(), y.mask.as_raw());
        for &v in x.mask.as_raw() {
            seen[v as usize] = true;
        }
    }
    assert!(seen.iter().all(|&s| s), "classes seen: {seen:?}");
    let _ = train::RunSummary::default();
}

#[test]
fn every_norm_optimizer_and_precision_path_trains() -> anyhow::Result<()> {
    let set = |args: &mut Vec<String>, k: &str, v: &str| match args.iter().position(|a| a == k) {
        Some(i) => args[i + 1] = v.to_string(),
        None => args.extend([k.to_string(), v.to_string()]),
    };
    let cases: [&[(&str, &str)]; 4] = [
        &[("--norm", "bn"), ("--accum-steps", "2")],
        &[
            ("--norm", "ws-gn"),
            ("--optimizer", "adamw"),
            ("--clip-grad", "1.0"),
        ],
        &[("--norm", "gn:2"), ("--amp", "f16"), ("--ema-decay", "0.9")],
        &[("--norm", "frozen-bn")],
    ];
    let (mut bn_ckpt, mut runs) = (None, Vec::new());
    for (i, flags) in cases.iter().enumerate() {
        let out = tmp(&format!("path{i}"));
        let mut args = tiny(&out, 3);
        for (k, v) in flags.iter() {
            set(&mut args, k, v);
        }
        run_cli(&args)?;
        let losses = step_losses(&out);
        assert_eq!(losses.len(), 3, "{flags:?}");
        assert!(
            losses.iter().all(|l| l.1.is_finite()),
            "{flags:?}: {losses:?}"
        );
        if i == 0 {
            bn_ckpt = Some(out.join("checkpoints/ckpt-00000003.safetensors"));
        }
        // Kept (not removed) until the --init runs below have read the BatchNorm checkpoint.
        runs.push(out);
    }
    // --init from the BatchNorm run's weights: converted to GroupNorm and to FrozenBatchNorm.
    let ckpt = bn_ckpt.unwrap();
    for norm in ["gn", "frozen-bn"] {
        let out = tmp(&format!("init-{norm}"));
        let mut args = tiny(&out, 2);
        set(&mut args, "--norm", norm);
        set(&mut args, "--init", ckpt.to_str().unwrap());
        run_cli(&args)?;
        assert_eq!(step_losses(&out).len(), 2);
        let _ = std::fs::remove_dir_all(out);
    }
    drop(runs);
    Ok(())
}

#[test]
fn compare_table_and_plot_from_run_summaries() -> anyhow::Result<()> {
    use clap::Parser;
    // The grid's own runs are child processes of the seg_train binary; here the table and
    // the plot are built from summaries of real (tiny) runs.
    let mut cells = Vec::new();
    for (norm, batch) in [("bn", 2), ("gn", 2)] {
        let mut runs = Vec::new();
        for seed in 0..2 {
            let out = tmp(&format!("cmp-{norm}-{seed}"));
            let mut args = tiny(&out, 12);
            let i = args.iter().position(|a| a == "--norm").unwrap();
            args[i + 1] = norm.into();
            args.extend(["--seed".into(), seed.to_string()]);
            let i = args.iter().position(|a| a == "--batch-size").unwrap();
            args[i + 1] = batch.to_string();
            run_cli(&args)?;
            let s: train::RunSummary =
                serde_json::from_str(&std::fs::read_to_string(out.join("summary.json"))?)?;
            assert_eq!(s.losses.len(), 12);
            assert_eq!(s.grad_norms.len(), 12);
            assert!(!s.evals.is_empty() && s.final_miou > 0.0);
            runs.push(s);
            let _ = std::fs::remove_dir_all(out);
        }
        cells.push(compare::Cell {
            norm: norm.into(),
            batch,
            runs,
        });
    }
    let cli = cli::Cli::try_parse_from([
        "seg_train",
        "compare",
        "--norms",
        "bn,gn",
        "--batch-sizes",
        "2",
        "--seeds",
        "2",
        "--steps",
        "12",
    ])?;
    let Some(cli::Command::Compare(args)) = cli.command else {
        panic!("not compare")
    };
    let md = compare::results_md(&args, &cells, 1.0, &candle::Device::Cpu);
    assert!(
        md.contains("| bn | 2 |") && md.contains("| gn | 2 |"),
        "{md}"
    );
    let png = tmp("curves.png");
    compare::plot(&png, &cells, 12)?;
    let bytes = std::fs::read(&png)?;
    assert_eq!(&bytes[1..4], b"PNG");
    let _ = std::fs::remove_file(png);
    Ok(())
}
