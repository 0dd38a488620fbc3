//! `det_train bench --vs-torch` (issue 15, Targets): keel's FCOS step beside the PyTorch
//! eager twin (examples/det_train/torch_twin.py) on the same init weights and batch, with
//! the parameter counts, the state-dict names and the first two steps' losses checked; the flags
//! the twin cannot mirror are refused before anything runs; a twin that drifted is caught.
//! The example's modules are compiled in, as tests/det_train.rs does.
use std::path::PathBuf;

#[allow(dead_code)] // reason: the binary's `main`
#[path = "../examples/det_train/main.rs"]
mod det_train;

use det_train::bench::{self, BenchArgs};

/// A tiny bench: 64-pixel images, a 0.05 M-parameter detector, one warm-up and one timed
/// step (two losses to compare).
fn bench_args(extra: &str) -> anyhow::Result<BenchArgs> {
    let steps = if extra.contains("--bench-steps") {
        ""
    } else {
        "--bench-steps 1"
    };
    let line = format!(
        "det_train --device cpu --image-size 64 --width 4 --fpn 8 --head-convs 1 --batch-size 2 \
         --bench-warmup 1 {steps} {extra}"
    );
    det_train::cli::parse(line.split_whitespace().map(String::from).collect())
}

/// Whether python3 with torch is missing (then the twin's tests say so and pass).
fn torch_missing() -> bool {
    let found = std::process::Command::new("python3")
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: python3 with torch not found (pip install torch)");
    }
    !found
}

/// A fresh temp path for this process and `name`.
fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keel-det-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Both sides run, with equal parameter counts (checked inside `bench`, which also fails
/// when the losses of the first two steps differ by more than 1e-4), and the JSON holds both
/// timings.
#[test]
fn bench_vs_torch_reports_both_sides_with_equal_params() -> anyhow::Result<()> {
    if torch_missing() {
        return Ok(());
    }
    let d = tmp("json");
    std::fs::create_dir_all(&d)?;
    for norm in ["gn", "bn"] {
        let json = d.join(format!("{norm}.json"));
        let r = bench::run(&bench_args(&format!(
            "--vs-torch --norm {norm} --json {}",
            json.display()
        ))?)?;
        let t = r.torch.as_ref().expect("torch timing");
        assert!(t.median_ms > 0.0 && r.keel.median_ms > 0.0, "{r:?}");
        assert!(r.keel.peak_mib > 0.0, "{r:?}");
        let ratio = r.ratio.expect("ratio");
        assert!((ratio - r.keel.median_ms / t.median_ms).abs() < 1e-12);
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
        assert_eq!(v["params"].as_u64(), Some(r.params as u64));
        assert_eq!(v["torch"]["median_ms"].as_f64(), Some(t.median_ms));
        assert!(r
            .config
            .starts_with(&format!("det FCOS P3-P5 {norm} width 4")));
    }
    std::fs::remove_dir_all(&d)?;
    Ok(())
}

#[test]
fn bench_refuses_what_the_twin_cannot_mirror() -> anyhow::Result<()> {
    for (extra, want) in [
        (
            "--vs-torch --norm ws-gn",
            "not --norm ws-gn; use --norm gn or bn",
        ),
        ("--vs-torch --norm gn:2", "not --norm gn:2"),
        ("--vs-torch --optimizer sgd", "use --optimizer adamw"),
        ("--vs-torch --amp f16", "f32 only, not --amp f16"),
        ("--vs-torch --accum-steps 2", "--accum-steps 1"),
        ("--vs-torch --ema-decay 0.9", "--ema-decay 0"),
        ("--bench-steps 0", "--bench-steps must be at least 1"),
        (
            "--vs-torch --backbone resnet18",
            "twin encoder only, not --backbone resnet18",
        ),
    ] {
        let t0 = std::time::Instant::now();
        let err = format!("{:#}", bench::run(&bench_args(extra)?).unwrap_err());
        assert!(err.contains(want), "{extra}: {err}");
        // Refused before keel's side is built or timed.
        assert!(t0.elapsed().as_secs_f64() < 5.0, "{extra}: refused late");
    }
    Ok(())
}

/// A twin that no longer computes det_train's loss, or updates the weights otherwise, or has
/// other parameters (a state-dict name keel's init does not have), or cannot run, fails the
/// bench with the reason.
#[test]
fn bench_vs_torch_catches_a_twin_that_drifted() -> anyhow::Result<()> {
    if torch_missing() {
        return Ok(());
    }
    let d = tmp("drift");
    std::fs::create_dir_all(&d)?;
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let twin = std::fs::read_to_string(examples.join("det_train/torch_twin.py"))?;
    // The drifted copy finds the twins' shared module beside itself.
    std::fs::copy(examples.join("twin_common.py"), d.join("twin_common.py"))?;
    let alpha = "sigmoid_focal_loss(cls, one_hot, 0.25, 2.0";
    let extra_param = "self.scale = nn.Parameter(torch.ones(1))";
    let lr = "lr=a.lr,";
    for (from, to, want) in [
        (alpha, alpha.replace("0.25", "0.5"), "first-step loss"),
        // The same forward, another update: only the second step's loss can tell.
        (lr, "lr=a.lr * 0.5,".to_string(), "second-step loss"),
        (
            extra_param,
            format!("{extra_param}; self.extra = nn.Parameter(torch.ones(1))"),
            "keel's names and the twin's differ",
        ),
    ] {
        assert!(twin.contains(from), "torch_twin.py has no {from:?}");
        let script = d.join("drifted.py");
        std::fs::write(&script, twin.replace(from, &to))?;
        let args = format!("--vs-torch --twin-script {}", script.display());
        let err = format!("{:#}", bench::run(&bench_args(&args)?).unwrap_err());
        assert!(err.contains(want), "{to}: {err}");
    }
    let err = format!(
        "{:#}",
        bench::run(&bench_args("--vs-torch --python /nonexistent/python")?).unwrap_err()
    );
    assert!(err.contains("cannot run /nonexistent/python"), "{err}");
    std::fs::remove_dir_all(&d)?;
    Ok(())
}
