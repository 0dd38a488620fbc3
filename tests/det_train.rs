//! det_train's CLI tests (issue 15): a tiny run writes its log, report, summary and
//! checkpoints with finite metrics; a run resumed from its middle checkpoint ends with the
//! same weights, bit for bit, as the uninterrupted run; bad VOC / COCO data is named
//! (file and annotation) before anything is written; f16 AMP trains on the CPU; a used
//! `--out` is refused. The example's modules are compiled in (`cli::run` is the binary's
//! entry point), as tests/seg_train.rs does for seg_train.
use std::path::Path;

#[allow(dead_code)] // reason: the binary's `main`
#[path = "../examples/det_train/main.rs"]
mod det_train;

#[path = "common/det_cli.rs"]
mod det_cli;

use det_cli::{assert_same_tensors, ckpt, loss_bits, records, run, tiny, tmp};

#[test]
fn a_tiny_run_writes_log_report_summary_and_checkpoints() -> anyhow::Result<()> {
    let d = tmp("smoke");
    run(&tiny(&d, 8, &[]))?;
    for f in ["config.json", "log.jsonl", "health.json", "summary.json"] {
        assert!(d.join(f).is_file(), "{f} missing");
    }
    assert!(ckpt(&d, 4).is_file() && ckpt(&d, 8).is_file());
    let steps = records(&d, "step");
    assert_eq!(steps.len(), 8);
    assert!(steps
        .iter()
        .all(|s| s["loss"].as_f64().is_some_and(f64::is_finite)));
    let evals = records(&d, "eval");
    assert_eq!(evals.len(), 2);
    for e in &evals {
        for k in ["map", "map50"] {
            let v = e[k].as_f64().unwrap_or(f64::NAN);
            assert!((0.0..=1.0).contains(&v), "{k} = {}", e[k]);
        }
        assert_eq!(e["per_class"].as_array().map(Vec::len), Some(4));
        assert_eq!(e["stats"].as_array().map(Vec::len), Some(12));
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("summary.json"))?)?;
    assert!(summary["final_map50"].as_f64().is_some_and(f64::is_finite));
    let health: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("health.json"))?)?;
    assert!(health["verdict"].is_string());
    // A fresh run into the used directory is refused and leaves it as it was.
    let before = std::fs::read_to_string(d.join("log.jsonl"))?;
    let err = format!("{:#}", run(&tiny(&d, 8, &[])).unwrap_err());
    assert!(
        err.contains("already holds a run") && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(d.join("log.jsonl"))?, before);
    Ok(())
}

#[test]
fn a_run_resumed_from_its_middle_checkpoint_ends_with_identical_weights() -> anyhow::Result<()> {
    let (full, half) = (tmp("full"), tmp("half"));
    let args = ["--ema-decay", "0.9", "--optimizer", "sgd", "--lr", "0.02"];
    run(&tiny(&full, 8, &args))?;
    run(&tiny(&half, 8, &args))?;
    // Lose the second half of one run: resume it from step 4.
    std::fs::remove_file(ckpt(&half, 8))?;
    let resume = format!("det_train --quiet --device cpu --resume {}", half.display());
    run(&resume
        .split_whitespace()
        .map(String::from)
        .collect::<Vec<_>>())?;
    assert_same_tensors(&ckpt(&full, 8), &ckpt(&half, 8))?;
    assert_eq!(loss_bits(&full), loss_bits(&half));
    // A flag that differs from the run's config is named.
    let mut other: Vec<String> = resume.split_whitespace().map(String::from).collect();
    other.extend(["--width".into(), "8".into(), "--steps".into(), "12".into()]);
    let err = format!("{:#}", run(&other).unwrap_err());
    assert!(err.contains("--width 8 (the run has 4)"), "{err}");
    Ok(())
}

/// A VOC folder of three 48x40 images; `bad` = (image index, object XML) added to one.
fn write_voc(root: &Path, bad: Option<(usize, &str)>) -> anyhow::Result<()> {
    for d in ["JPEGImages", "Annotations", "ImageSets/Main"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    for k in 0..3 {
        let img = image::RgbImage::from_fn(48, 40, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 6) as u8, 90])
        });
        img.save(root.join(format!("JPEGImages/im{k}.jpg")))?;
        let extra = bad.filter(|b| b.0 == k).map_or("", |b| b.1);
        let xml = format!(
            "<annotation><size><width>48</width><height>40</height><depth>3</depth></size>\
             <object><name>dog</name><difficult>0</difficult><bndbox><xmin>5</xmin><ymin>6</ymin><xmax>30</xmax><ymax>28</ymax></bndbox></object>{extra}</annotation>"
        );
        std::fs::write(root.join(format!("Annotations/im{k}.xml")), xml)?;
    }
    std::fs::write(root.join("ImageSets/Main/train.txt"), "im0\nim1\n")?;
    std::fs::write(root.join("ImageSets/Main/val.txt"), "im2\n")?;
    Ok(())
}

#[test]
fn bad_voc_and_coco_data_is_named_before_anything_is_written() -> anyhow::Result<()> {
    // A good VOC folder trains.
    let voc = tmp("voc-good");
    write_voc(&voc, None)?;
    let out = tmp("voc-good-out");
    let data = ["--data-dir", voc.to_str().unwrap(), "--format", "voc"];
    run(&tiny(&out, 3, &data))?;
    let per_class = records(&out, "eval")[0]["per_class"]
        .as_array()
        .map(Vec::len);
    assert_eq!(per_class, Some(20));

    // An out-of-range box: the file and the object are named, nothing is written.
    let voc = tmp("voc-box");
    let outside = "<object><name>cat</name><bndbox><xmin>10</xmin><ymin>10</ymin><xmax>60</xmax><ymax>20</ymax></bndbox></object>";
    write_voc(&voc, Some((1, outside)))?;
    let out = tmp("voc-box-out");
    let data = ["--data-dir", voc.to_str().unwrap(), "--format", "voc"];
    let err = format!("{:#}", run(&tiny(&out, 3, &data)).unwrap_err());
    assert!(
        err.contains("im1.xml") && err.contains("object 1 'cat'") && err.contains("outside"),
        "{err}"
    );
    assert!(!out.exists(), "a failed check wrote {}", out.display());

    // A malformed XML file.
    let voc = tmp("voc-xml");
    write_voc(&voc, None)?;
    std::fs::write(voc.join("Annotations/im2.xml"), "<annotation><size>")?;
    let data = ["--data-dir", voc.to_str().unwrap(), "--format", "voc"];
    let err = format!("{:#}", run(&tiny(&out, 3, &data)).unwrap_err());
    assert!(err.contains("im2.xml"), "{err}");
    assert!(!out.exists());

    // COCO: a malformed JSON file, then a zero-area box of a good file.
    let coco = tmp("coco");
    std::fs::create_dir_all(coco.join("annotations"))?;
    std::fs::create_dir_all(coco.join("train"))?;
    std::fs::write(
        coco.join("annotations/instances_train.json"),
        "{\"images\": [",
    )?;
    std::fs::write(
        coco.join("annotations/instances_val.json"),
        "{\"images\": [",
    )?;
    let data = ["--data-dir", coco.to_str().unwrap(), "--format", "coco"];
    let err = format!("{:#}", run(&tiny(&out, 3, &data)).unwrap_err());
    assert!(
        err.contains("instances_train.json") && err.contains("malformed"),
        "{err}"
    );
    image::RgbImage::new(32, 32).save(coco.join("train/a.png"))?;
    let json = r#"{"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [4, 4, 0, 10]}],
        "categories": [{"id": 3, "name": "thing"}]}"#;
    std::fs::write(coco.join("annotations/instances_train.json"), json)?;
    std::fs::write(
        coco.join("annotations/instances_val.json"),
        json.replace("a.png", "../train/a.png"),
    )?;
    let err = format!("{:#}", run(&tiny(&out, 3, &data)).unwrap_err());
    assert!(
        err.contains("annotation id 7") && err.contains("zero or negative area"),
        "{err}"
    );
    assert!(!out.exists());
    Ok(())
}

#[test]
fn f16_amp_trains_on_the_cpu() -> anyhow::Result<()> {
    let d = tmp("f16");
    run(&tiny(&d, 4, &["--amp", "f16"]))?;
    let steps = records(&d, "step");
    assert_eq!(steps.len(), 4);
    assert!(steps.iter().all(|s| s["loss_scale"].as_f64().is_some()));
    assert!(records(&d, "eval")
        .iter()
        .all(|e| e["map50"].as_f64().is_some()));
    // BatchNorm has no f16 path on candle's CPU: a clear error before anything is written.
    let bn = tmp("f16-bn");
    let args: Vec<String> = tiny(&bn, 4, &["--amp", "f16"])
        .into_iter()
        .map(|a| if a == "gn:2" { "bn".into() } else { a })
        .collect();
    let err = format!("{:#}", run(&args).unwrap_err());
    assert!(
        err.contains("--norm bn --amp f16 needs --device cuda"),
        "{err}"
    );
    assert!(!bn.exists());
    Ok(())
}

#[test]
fn bench_times_the_step_on_a_fixed_batch() -> anyhow::Result<()> {
    let args =
        "det_train --device cpu --image-size 64 --width 4 --fpn 8 --head-convs 1 --norm gn:2 \
                --batch-size 2 --bench-warmup 1 --bench-steps 2";
    let argv = args.split_whitespace().map(String::from).collect();
    let b: det_train::bench::BenchArgs = det_train::cli::parse(argv)?;
    let t = det_train::bench::run(&b)?.keel;
    assert!(t.median_ms > 0.0 && t.min_ms <= t.median_ms, "{t:?}");
    // The subcommand through the entry point.
    let cli = format!("det_train bench {}", &args["det_train ".len()..]);
    run(&cli.split_whitespace().map(String::from).collect::<Vec<_>>())?;
    Ok(())
}

#[test]
fn resume_checks_config_json_against_the_checkpoint_and_recovers_a_missing_one(
) -> anyhow::Result<()> {
    let d = tmp("config");
    run(&tiny(&d, 4, &[]))?;
    let resume = |steps: &str| -> Vec<String> {
        let s = format!(
            "det_train --quiet --device cpu --resume {} --steps {steps}",
            d.display()
        );
        s.split_whitespace().map(String::from).collect()
    };
    let config = d.join("config.json");
    let good = std::fs::read_to_string(&config)?;
    std::fs::write(&config, good.replace("\"width\": 4", "\"width\": 6"))?;
    let err = format!("{:#}", run(&resume("6")).unwrap_err());
    assert!(err.contains("width (config.json 6, checkpoint 4)"), "{err}");
    std::fs::remove_file(&config)?;
    run(&resume("6"))?;
    assert_eq!(records(&d, "step").len(), 6);
    assert!(std::fs::read_to_string(&config)?.contains("\"steps\": 6"));
    let err = format!("{:#}", run(&resume("6")).unwrap_err());
    assert!(
        err.contains("the run already finished its 6 steps"),
        "{err}"
    );
    Ok(())
}

/// `--fault lr-burst@12` (LR x1000 for 5 steps): the guard (rollback, the default) rolls
/// the run back visibly and it finishes with finite metrics; with `--guard off` nothing
/// intervenes.
#[test]
fn the_guard_rolls_back_an_injected_lr_burst() -> anyhow::Result<()> {
    let d = tmp("guard");
    run(&tiny(&d, 30, &["--fault", "lr-burst@12"]))?;
    let guard = records(&d, "guard");
    assert!(!guard.is_empty(), "the burst was not caught");
    assert_eq!(guard[0]["action"], "rolled_back", "{}", guard[0]);
    assert!(
        guard[0]["restored_step"].as_u64().unwrap() <= 12,
        "{}",
        guard[0]
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("summary.json"))?)?;
    assert!(summary["final_map50"].as_f64().is_some_and(f64::is_finite));
    let off = tmp("guard-off");
    let args = ["--fault", "lr-burst@12", "--guard", "off"];
    run(&tiny(&off, 30, &args))?;
    assert!(records(&off, "guard").is_empty());
    Ok(())
}

/// Entry point of the re-executed test binary: runs det_train with the arguments in
/// `DET_TRAIN_CHILD_ARGS` and exits like the binary (a no-op in a normal test run).
#[test]
fn child_process() {
    if let Ok(args) = std::env::var("DET_TRAIN_CHILD_ARGS") {
        let args: Vec<String> = serde_json::from_str(&args).unwrap();
        // As the binary's main: the trainer on rayon's pool.
        let code = match keel::train::threads::try_run_on_pool(|| run(&args)) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("det_train: {e:#}");
                keel::train::driver::exit_code(e.as_ref())
            }
        };
        std::process::exit(code);
    }
}

/// SIGINT finishes the current step, writes a checkpoint and health.json and exits 130;
/// `--resume` then finishes the run.
#[test]
fn sigint_checkpoints_and_exits_130_then_resume_finishes() -> anyhow::Result<()> {
    let d = tmp("sigint");
    let args = tiny(&d, 400, &["--ckpt-every", "1000"]);
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["--exact", "child_process", "--nocapture"])
        .env("DET_TRAIN_CHILD_ARGS", serde_json::to_string(&args)?)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let t0 = std::time::Instant::now();
    while records(&d, "step").len() < 3 {
        assert!(t0.elapsed().as_secs() < 120, "the child never stepped");
        assert!(child.try_wait()?.is_none(), "the child exited early");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    assert!(kill.success());
    let status = child.wait()?;
    assert_eq!(status.code(), Some(130));
    let done = records(&d, "step").len();
    assert!(done < 400, "the run did not stop");
    assert!(ckpt(&d, done).is_file(), "no checkpoint at step {done}");
    assert!(d.join("health.json").is_file());
    // The lock went with the process (no stale lock for the resume to take over).
    assert!(!d.join(keel::train::LOCK_FILE).exists());
    let resume = format!(
        "det_train --quiet --device cpu --resume {} --steps {}",
        d.display(),
        done + 2
    );
    run(&resume
        .split_whitespace()
        .map(String::from)
        .collect::<Vec<_>>())?;
    assert_eq!(records(&d, "step").len(), done + 2);
    Ok(())
}

/// The summary a run returns (and prints) and its summary.json hold one wall time, taken
/// once (they were two clock reads apart).
#[test]
fn the_returned_summary_and_summary_json_agree() -> anyhow::Result<()> {
    let d = tmp("one-clock");
    let cli: det_train::cli::Cli = det_train::cli::parse(tiny(&d.join("unused"), 2, &[]))?;
    let out = d.join("run");
    let opts = keel::train::driver::RunOptions {
        progress: false,
        ..keel::train::driver::RunOptions::new("det_train")
    };
    let s = det_train::train::run(&cli.config(), &out, None, &candle::Device::Cpu, opts)?;
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json"))?)?;
    assert_eq!(v["seconds"].as_f64(), Some(s.seconds));
    assert_eq!(v["final_map50"].as_f64(), Some(s.final_map50));
    Ok(())
}

/// `det_train run-config` (compare's child) runs a saved config, and its summary.json reads
/// as the RunSummary the grid tables (final mAP@.5 as the metric); compare refuses per-run
/// flags and its table names the metric.
#[test]
fn compare_children_write_summaries_the_grid_reads() -> anyhow::Result<()> {
    let d = tmp("cmp-child");
    std::fs::create_dir_all(&d)?;
    let cli: det_train::cli::Cli = det_train::cli::parse(tiny(&d.join("unused"), 4, &[]))?;
    let cfg_path = d.join("job.config.json");
    std::fs::write(&cfg_path, serde_json::to_string(&cli.config())?)?;
    let out = d.join("job");
    let argv = format!(
        "det_train run-config --config {} --out {} --device cpu",
        cfg_path.display(),
        out.display()
    );
    run(&argv
        .split_whitespace()
        .map(String::from)
        .collect::<Vec<_>>())?;
    let text = std::fs::read_to_string(out.join("summary.json"))?;
    let s: keel::train::RunSummary = serde_json::from_str(&text)?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    assert_eq!(s.losses.len(), 4);
    assert_eq!(Some(s.final_miou), v["final_map50"].as_f64());
    let e = run(&[
        "det_train".into(),
        "compare".into(),
        "--batch-size".into(),
        "4".into(),
    ])
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("--batch-size is not a grid flag"),
        "{e:#}"
    );
    let argv = ["det_train compare", "--norms", "gn"]
        .map(String::from)
        .to_vec();
    let args: det_train::compare::CompareArgs = det_train::cli::parse(argv)?;
    let cells = keel::train::grid::Cell::group([("gn".to_string(), 2, s)]);
    let md = det_train::compare::results_md(&args, &cells, 1.0, &candle::Device::Cpu);
    assert!(
        md.contains("final val mAP@.5 (mean ± std)") && md.contains("| gn | 2 |"),
        "{md}"
    );
    Ok(())
}

/// det_train's own defaults (AdamW, 50 warmup steps, clip at 5, an evaluation every 350
/// steps) hold for a run, `bench` and `compare` alike, over keel's shared loop flags.
#[test]
fn det_train_defaults_hold_for_run_bench_and_compare() -> anyhow::Result<()> {
    use det_train::cli::{parse, Cli};
    let check = |c: &det_train::cli::DetConfig| {
        let t = &c.train;
        assert_eq!(t.optimizer, keel::optim::OptimizerKind::AdamW);
        assert_eq!(
            (t.warmup_steps, t.clip_grad, t.eval_every, t.ckpt_every),
            (50, Some(5.0), 350, 350)
        );
    };
    let argv = |s: &str| -> Vec<String> { s.split_whitespace().map(String::from).collect() };
    check(&parse::<Cli>(argv("det_train"))?.config());
    check(
        &parse::<det_train::bench::BenchArgs>(argv("det_train"))?
            .run
            .config(),
    );
    check(
        &parse::<det_train::compare::CompareArgs>(argv("det_train"))?
            .run
            .config(),
    );
    Ok(())
}

/// `--help` prints the usage to stdout and exits 0 for the trainer and each subcommand
/// (`compare --help` printed it as an error and exited 1).
#[test]
fn help_exits_0_for_every_subcommand() -> anyhow::Result<()> {
    for sub in [&[][..], &["compare"][..], &["bench"][..]] {
        let args: Vec<String> = std::iter::once("det_train")
            .chain(sub.iter().copied())
            .chain(["--help"])
            .map(String::from)
            .collect();
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["--exact", "child_process", "--nocapture"])
            .env("DET_TRAIN_CHILD_ARGS", serde_json::to_string(&args)?)
            .output()?;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stdout.contains("Usage:"), "{args:?}: {stdout}");
        assert!(!stderr.contains("error"), "{args:?}: {stderr}");
    }
    Ok(())
}
