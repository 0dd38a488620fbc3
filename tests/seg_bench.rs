//! `seg_train bench`: the step timer, its JSON, the twin checks (issue 13 item 1).
//! Compiles the example's modules like tests/seg_train.rs does.
use clap::Parser;

#[allow(dead_code)] // reason: the binary's `main` and items only the binary uses
#[path = "../examples/seg_train/main.rs"]
mod seg_train;

use seg_train::bench::{self, BenchArgs};
use seg_train::cli::{Cli, Command};

fn bench_args(extra: &str) -> BenchArgs {
    let steps = if extra.contains("--steps") {
        ""
    } else {
        "--steps 3"
    };
    let line = format!(
        "seg_train bench --device cpu --width 4 --fpn 8 --image-size 32 --batch-size 2 --warmup 1 {steps} {extra}"
    );
    match Cli::try_parse_from(line.split_whitespace())
        .unwrap()
        .command
    {
        Some(Command::Bench(b)) => b,
        other => panic!("parsed {other:?}"),
    }
}

fn has_torch() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn bench_times_the_step_and_writes_json() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("keel-seg-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let json = dir.join("bench.json");
    let r = bench::run(&bench_args(&format!("--json {}", json.display())))?;
    assert!(
        r.keel.median_ms > 0.0 && r.keel.min_ms <= r.keel.median_ms,
        "{r:?}"
    );
    // The heap grows during a step (activations, gradients): the counter must see it.
    assert!(r.keel.peak_mib > 0.0, "{r:?}");
    assert!(r.params > 0 && r.torch.is_none() && r.ratio.is_none());
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    assert_eq!(v["params"].as_u64(), Some(r.params as u64));
    assert_eq!(v["keel"]["median_ms"].as_f64(), Some(r.keel.median_ms));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn bench_refuses_what_the_twin_cannot_mirror() {
    for (extra, want) in [
        ("--vs-torch --norm ws-gn", "--norm ws-gn"),
        ("--vs-torch --optimizer adamw", "--optimizer sgd"),
        ("--vs-torch --amp f16", "f32 only"),
        ("--vs-torch --accum-steps 2", "accumulation"),
        ("--steps 0", "at least 1"),
    ] {
        let err = bench::run(&bench_args(extra)).unwrap_err().to_string();
        assert!(err.contains(want), "{extra}: {err}");
    }
}

/// The twin must be the same network: the parameter counts are compared inside `bench`, so
/// this fails if torch_twin.py and keel::models::seg::SegNet drift apart.
#[test]
fn bench_vs_torch_runs_the_twin_side_by_side() -> anyhow::Result<()> {
    if !has_torch() {
        eprintln!("skipped: python3 with torch not found (pip install torch)");
        return Ok(());
    }
    for norm in ["gn", "bn"] {
        let r = bench::run(&bench_args(&format!("--vs-torch --norm {norm}")))?;
        let t = r.torch.as_ref().expect("torch timing");
        assert!(t.median_ms > 0.0);
        let ratio = r.ratio.expect("ratio");
        assert!((ratio - r.keel.median_ms / t.median_ms).abs() < 1e-12);
    }
    let err = bench::run(&bench_args("--vs-torch --python /nonexistent/python"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot run /nonexistent/python"), "{err}");
    Ok(())
}
