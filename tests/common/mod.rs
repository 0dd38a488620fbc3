//! Helpers shared by the seg_train CLI test files (each includes the example's modules
//! itself with `#[path]`; these helpers only handle directories, arguments and logs).
#![allow(dead_code)] // reason: each test file uses a subset

use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh path under the temp dir for a run's --out (removed first if it exists).
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keel-seg-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Tiny, fast settings for a CPU smoke run.
pub fn tiny(out: &Path, steps: usize) -> Vec<String> {
    let s = format!(
        "seg_train --quiet --device cpu --norm gn --width 4 --fpn 8 --image-size 32 --train-size 16 --val-size 8 \
         --batch-size 2 --steps {steps} --warmup-steps 2 --lr 0.05 --eval-every 10 --ckpt-every 10 --keep-last 2 --out {}",
        out.display()
    );
    s.split_whitespace().map(String::from).collect()
}

/// The records of kind `kind` ("step", "eval") of a run's log.jsonl.
pub fn records(out: &Path, kind: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == kind)
        .collect()
}

/// The step records of a run's log.jsonl: (step, loss).
pub fn step_losses(out: &Path) -> Vec<(u64, f64)> {
    records(out, "step")
        .iter()
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// The body of each test file's `child_process` test: when `SEG_TRAIN_CHILD_ARGS` is set
/// (this binary was re-executed by [`child`]), runs seg_train's entry point `run` on those
/// arguments and exits like the binary (1 and the error on stderr on failure); otherwise
/// returns at once.
pub fn child_main(run: fn(Vec<String>) -> anyhow::Result<()>) {
    if let Ok(args) = std::env::var("SEG_TRAIN_CHILD_ARGS") {
        let args: Vec<String> = serde_json::from_str(&args).unwrap();
        let code = match run(args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("seg_train: error: {e:#}");
                1
            }
        };
        std::process::exit(code);
    }
}

/// This test binary re-executed as seg_train (its `child_process` test runs `cli::run` on
/// the arguments in `SEG_TRAIN_CHILD_ARGS` and exits like the binary).
pub fn child(args: &[String], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "child_process",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    c.env("SEG_TRAIN_CHILD_ARGS", serde_json::to_string(args).unwrap());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// `args` with `--flag value` pairs appended.
pub fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}
